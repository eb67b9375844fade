"""``harmonifuse serve``: an OpenAI-compatible HTTP service and a browser page for the model.

- :mod:`.app`: the FastAPI app (:func:`create_app` takes a loaded model-like object or a loader);
- :mod:`.worker`: the bounded queue and the one inference thread that batches requests;
- :mod:`.upload`: multipart uploads streamed to a temporary file under a size limit;
- :mod:`.responses`: answers in the OpenAI formats (json, text, verbose_json, srt, vtt);
- :mod:`.server`: uvicorn with a graceful SIGTERM (drain, exit 0) and the bind policy;
- :mod:`.command`: the command line options (kept free of heavy imports);
- ``page/index.html``: the static page served at ``/``.

Nothing here is imported by ``harmonifuse`` itself: FastAPI and uvicorn load only when serving.
"""
