"""The HTTP service: OpenAI's audio transcription API, ``/v1/audio/analyze``, health and a page.

:func:`create_app` takes a loaded model-like object (anything with ``analyze``, ``load_arrays``
and ``config.encoder.max_seconds``, such as :class:`harmonifuse.model.HarmoniFuse`) or a
``loader`` that returns one. With a loader the app answers at once: ``/health`` is 200, and
``/health/ready`` and the audio endpoints are 503 until the model is loaded in the background.

A request's path: it takes a slot of the inference worker's bounded queue (:mod:`.worker`; a
full queue is 503 before the body is read); the upload streams to a temporary file under the
size limit and the upload timeouts (:mod:`.upload`); the form is checked; the file's header is
checked against the decoding limits (rate, channels, decoded size) before a sample is decoded;
a thread decodes it, at most ``decode_concurrency`` at once; the job joins the queue, charged
one slot per encoder window of audio, and the worker batches it with others; the handler waits
for the answer, its client's disconnect or the deadline (504), whichever comes first. A job
nobody waits for leaves the queue, or stops its batch at the next checkpoint once no job in it
is wanted. :mod:`.guard` decides who may use the service (key, Host, Origin) before any of this;
:mod:`.protocol` guards the connection below (header timeout, connection cap).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response

from harmonifuse.serve import responses
from harmonifuse.serve.errors import SERVER, ApiError, error_body, overloaded
from harmonifuse.serve.guard import Guard
from harmonifuse.serve.upload import MB, Upload, read_upload
from harmonifuse.serve.worker import Closed, DeadlineExceeded, InferenceWorker, QueueFull

log = logging.getLogger("harmonifuse.serve")

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
       "media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServeSettings:
    model_id: str = "harmonifuse"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_upload_mb: float = 25.0
    max_seconds: float | None = 900.0  # None or 0: no limit (long recordings are cut at pauses)
    timeout: float = 300.0  # seconds from the end of the upload to the answer
    batch_wait: float = 0.005
    threads: int | None = None  # torch threads of the inference worker (None: torch's default)
    # what an upload's header may declare (harmonifuse.audio.HeaderLimits), checked before decoding
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_decoded_mb: float | None = 350.0  # float32 samples: 15 min of 48 kHz stereo is 330 MB
    decode_concurrency: int = 2  # uploads decoded at once
    # slow clients (harmonifuse.serve.protocol for the connection, .upload for the body)
    header_timeout: float = 10.0  # seconds for a request line and headers to arrive
    idle_timeout: float = 15.0  # seconds between two pieces of a body, else 408
    upload_timeout: float = 120.0  # seconds for a whole body, else 408
    keep_alive: float = 5.0  # seconds an idle kept-alive connection stays open
    max_connections: int = 128  # open connections; more are answered 503 and closed
    # without an API key: Host and Origin must name this server (or these, for a proxy; "*": any)
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # the network thread, and the decoding threads it starts, this much nicer than inference: a flood
    # of connections or uploads takes CPU from them, not from answering the requests already queued
    io_nice: int = 10

    def __post_init__(self) -> None:
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts)
        self.allowed_origins = tuple(o.strip().lower().rstrip("/") for o in self.allowed_origins)

    @property
    def limit_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def header_limits(self):
        from harmonifuse.audio import HeaderLimits

        return HeaderLimits(self.max_sample_rate, self.max_channels, self.max_decoded_mb)


@dataclass
class Service:
    settings: ServeSettings
    worker: InferenceWorker
    model: Any = None
    load_error: str | None = None
    draining: bool = False
    tmpdir: str | None = None
    on_load_failed: Callable[[], None] | None = None
    started: float = field(default_factory=time.time)
    decode_slots: asyncio.Semaphore | None = None

    def status(self) -> str:
        if self.draining:
            return "shutting down"
        if self.load_error:
            return "failed"
        return "ready" if self.model is not None else "loading"


class ClientGone(Exception):
    pass


# -- audio -------------------------------------------------------------------------------------------

AUDIO_FIXES = (
    ("too short", "send at least 0.1 s of audio"),
    ("NaN/inf", "re-export the recording: it holds invalid samples"),
    ("silent", "check the microphone or the recording's level: it holds no sound"),
)
AUDIO_FIX = "send a WAV, FLAC, OGG or MP3 recording (the page at / converts what a browser can play to WAV)"


def audio_error(error: Exception, upload: Upload, tmpdir: str | None) -> ApiError:
    """An AudioError as a 400 whose message names the client's file, not the server's copy."""
    problem = getattr(error, "problem", None) or str(error)
    if upload.path is not None:
        problem = problem.replace(str(upload.path), upload.filename)
    if tmpdir:
        problem = re.sub(re.escape(tmpdir) + r"[^\s'\"]*", upload.filename, problem)
    fix = next((fix for key, fix in AUDIO_FIXES if key in problem), AUDIO_FIX)
    return ApiError(400, f"{upload.filename}: {problem}; {fix}", param="file", code="invalid_audio")


LIMIT_FLAGS = {"sample_rate": ("--max-sample-rate", "sample_rate_too_high"),
               "channels": ("--max-channels", "too_many_channels"),
               "decoded_mb": ("--max-decoded-mb", "audio_too_large")}


def decode(service: Service, upload: Upload) -> tuple[Any, float]:
    """The audio to queue (a 16 kHz array, or the file's path for a recording longer than the
    encoder's window, which the model reads in blocks) and its duration in seconds. The header is
    checked against the service's limits before a sample is decoded."""
    import soundfile as sf

    from harmonifuse.audio import AudioError, AudioTooLarge, check_header

    model, settings = service.model, service.settings
    path = str(upload.path)
    try:
        info = sf.info(path)
    except Exception as error:  # noqa: BLE001 - libsndfile's own words, path removed
        raise audio_error(AudioError(path, f"not a readable audio file ({error})", ""), upload,
                          service.tmpdir) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise ApiError(400, f"{upload.filename}: audio file contains no samples; {AUDIO_FIX}", param="file",
                       code="invalid_audio")
    try:
        check_header(path, info, settings.header_limits)
    except AudioTooLarge as error:
        flag, code = LIMIT_FLAGS[error.limit]
        raise ApiError(400, f"{upload.filename}: refused before decoding: {error.problem} ({flag}); {error.fix}",
                       param="file", code=code) from None
    duration = info.frames / info.samplerate
    if settings.max_seconds and duration > settings.max_seconds:
        raise ApiError(400, f"{upload.filename}: the audio is {duration:.1f} s long, over this server's limit of "
                            f"{settings.max_seconds:g} s (--max-seconds); cut it into parts of at most "
                            f"{settings.max_seconds:g} s and send them one by one, or ask the operator to raise "
                            "--max-seconds (0 lifts the limit)", param="file", code="audio_too_long")
    if duration > model.config.encoder.max_seconds:
        return path, duration  # long: read in blocks and cut at pauses by model.analyze
    try:
        return model.load_arrays([path])[0], duration
    except AudioError as error:
        raise audio_error(error, upload, service.tmpdir) from None


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux: per thread; threads it starts inherit it)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError as error:
        log.warning("could not lower the network thread's priority (%s); hostile traffic may slow inference", error)


# -- the app -----------------------------------------------------------------------------------------

def create_app(model: Any = None, *, loader: Callable[[], Any] | None = None,
               settings: ServeSettings | None = None) -> FastAPI:
    """The service for ``model``, or for the model ``loader()`` returns (loaded in a thread at startup)."""
    if (model is None) == (loader is None):
        raise ValueError("give a model or a loader")
    settings = settings or ServeSettings()
    worker = InferenceWorker(max_batch=settings.max_batch, max_queue=settings.max_queue,
                             batch_wait=settings.batch_wait, threads=settings.threads)
    service = Service(settings, worker, decode_slots=asyncio.Semaphore(settings.decode_concurrency))
    page = _page(settings)

    def load() -> None:
        try:
            loaded = loader()
        except Exception as error:  # noqa: BLE001 - reported by readiness and the exit status
            log.exception("the model failed to load")
            service.load_error = f"{type(error).__name__}: {error}"
            if service.on_load_failed:
                service.on_load_failed()
            return
        worker.start(loaded)
        service.model = loaded
        log.info("model %s loaded; ready", settings.model_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.tmpdir = tempfile.mkdtemp(prefix="harmonifuse-serve-")
        if model is not None:
            worker.start(model)
            service.model = model
        else:
            threading.Thread(target=load, name="harmonifuse-load", daemon=True).start()
        lower_priority(settings.io_nice)  # after the inference thread's parent started: it keeps its own
        try:
            yield
        finally:
            service.draining = True
            await run_in_threadpool(worker.close, settings.timeout)
            shutil.rmtree(service.tmpdir, ignore_errors=True)

    app = FastAPI(title="HarmoniFuse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(Guard, service=service)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            message, code = f"no such endpoint: {request.method} {request.url.path}; see GET /v1/models", "not_found"
        elif error.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(error.detail), None
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return JSONResponse(error_body("the request is malformed", "invalid_request_error", None, "invalid_request"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(error_body("internal server error; the server's log has the details", SERVER, None,
                                       "internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> Response:
        status = service.status()
        body = {"status": status, "model": settings.model_id, "waiting": worker.waiting, "running": worker.running,
                "arriving": worker.arriving, "max_queue": settings.max_queue, "max_batch": settings.max_batch}
        if status == "ready":
            return JSONResponse(body)
        if status == "failed":
            body["error"] = "the model failed to load; the server's log has the details"
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    def model_object() -> dict:
        return {"id": settings.model_id, "object": "model", "created": int(service.started),
                "owned_by": "harmonifuse"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str) -> dict:
        if model_id != settings.model_id:
            raise not_found(model_id, settings.model_id)
        return model_object()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await answer(request, service, "transcription")

    @app.post("/v1/audio/analyze")
    async def analyze(request: Request) -> Response:
        return await answer(request, service, "analysis")

    return app


def not_found(model_id: str, served: str) -> ApiError:
    return ApiError(404, f"the model `{model_id}` does not exist on this server; it serves `{served}` "
                         "(GET /v1/models lists it)", param="model", code="model_not_found")


def _page(settings: ServeSettings) -> str:
    html = resources.files("harmonifuse.serve").joinpath("page/index.html").read_text(encoding="utf-8")
    record_seconds = settings.limit_bytes / 32_000 - 1  # what a 16 kHz 16-bit WAV of the limit holds
    if settings.max_seconds:
        record_seconds = min(record_seconds, settings.max_seconds)
    config = {"model": settings.model_id, "maxSeconds": int(max(1, record_seconds)),
              "maxUploadMB": settings.max_upload_mb, "auth": bool(settings.api_key)}
    return html.replace("/*CONFIG*/{}", json.dumps(config).replace("</", "<\\/"))


async def answer(request: Request, service: Service, kind: str) -> Response:
    settings, worker = service.settings, service.worker
    began = time.monotonic()
    if service.model is None:
        if service.load_error:
            raise ApiError(503, "the model failed to load; the server's log has the details", SERVER, None,
                           "model_unavailable")
        raise overloaded("the model is still loading; retry shortly (GET /health/ready says when it is ready)", 5,
                         "model_loading")
    try:  # a queue slot before the body is read: a full queue costs the client no upload
        worker.arrive()  # and the worker may wait a moment for this request to join its next batch
    except QueueFull as full:
        raise _busy(settings, full) from None
    except Closed:
        raise overloaded("the server is shutting down; retry on another instance", 5, "shutting_down") from None
    upload, job = Upload(), None
    try:
        try:
            upload = await read_upload(request, settings.limit_bytes, service.tmpdir,
                                       idle_timeout=settings.idle_timeout, upload_timeout=settings.upload_timeout)
        except ClientDisconnect:
            return Response(status_code=499)
        form = upload.fields
        if upload.path is None:
            raise ApiError(400, "no audio: send the recording as the multipart field `file`, "
                                "e.g. curl -F file=@clip.wav", param="file", code="missing_file")
        if upload.size == 0:
            raise ApiError(400, f"{upload.filename}: the uploaded file is empty (0 bytes); send a recording",
                           param="file", code="invalid_audio")
        if form.get("model") and form["model"] != settings.model_id:
            raise not_found(form["model"], settings.model_id)
        response_format = form.get("response_format") or "json"
        if kind == "transcription" and response_format not in responses.RESPONSE_FORMATS:
            raise ApiError(400, f"response_format `{response_format}` is not one of "
                                f"{', '.join(responses.RESPONSE_FORMATS)}", param="response_format",
                           code="invalid_value")
        _check_options(form)
        received = time.monotonic()
        async with service.decode_slots:
            audio, duration = await run_in_threadpool(decode, service, upload)
        decoded = time.monotonic()
        cost = math.ceil(duration / service.model.config.encoder.max_seconds)  # encoder windows of work
        try:
            job = worker.submit(audio, upload.filename, decoded + settings.timeout, arrived=True, cost=cost)
        except QueueFull as full:
            raise _busy(settings, full) from None
        except Closed:
            raise overloaded("the server is shutting down; retry on another instance", 5, "shutting_down") from None
        try:
            result = await wait_for(request, worker, job, decoded + settings.timeout)
        except ClientGone:
            return Response(status_code=499)
        except DeadlineExceeded:
            raise _timeout(settings) from None
        except ValueError as error:  # AudioError from the model: the file decoded but cannot be used
            from harmonifuse.audio import AudioError

            if isinstance(error, AudioError):
                raise audio_error(error, upload, service.tmpdir) from None
            raise
    finally:
        if job is None:
            worker.depart()  # refused before it was queued (submit counts a queued one)
            upload.close()
        else:  # a running batch may still read a long recording's file
            job.future.add_done_callback(lambda _: upload.close())
    total_ms = round((time.monotonic() - began) * 1000, 1)
    headers = {"openai-processing-ms": str(int(total_ms))}
    if kind == "transcription":
        out = responses.transcription(result, response_format)
        out.headers.update(headers)
        return out
    timings = {"upload_ms": round((received - began) * 1000, 1), "decode_ms": round((decoded - received) * 1000, 1),
               "queue_ms": round((job.started - job.enqueued) * 1000, 1),
               "inference_ms": round((job.finished - job.started) * 1000, 1), "total_ms": total_ms,
               "batch_size": job.batch_size}
    return JSONResponse({"object": "audio.analysis", "model": settings.model_id, "file": upload.filename, **result,
                         "timings": timings}, headers=headers)


def _check_options(form: dict) -> None:
    """OpenAI's optional fields: ``temperature`` in [0, 1] and ``language`` English (the model's
    decoding is deterministic, so temperature changes nothing; ``prompt`` is accepted and unused)."""
    if form.get("temperature"):
        try:
            temperature = float(form["temperature"])
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, f"temperature must be a number from 0 to 1, got {form['temperature']!r}",
                           param="temperature", code="invalid_value")
    language = (form.get("language") or "").strip().lower()
    if language and language not in ("en", "eng", "english"):
        raise ApiError(400, f"this model transcribes English only; send language=en or leave it out "
                            f"(got {form['language']!r})", param="language", code="unsupported_language")


def _busy(settings: ServeSettings, full: QueueFull) -> ApiError:
    return overloaded(f"the server is busy: its queue of {settings.max_queue} (--max-queue) is full; retry in "
                      f"{full.retry_after} s (Retry-After)", full.retry_after)


def _timeout(settings: ServeSettings) -> ApiError:
    return ApiError(504, f"no answer within this server's {settings.timeout:g} s deadline (--timeout): the queue was "
                         "long or the recording long; retry later or send a shorter recording", SERVER, None, "timeout")


async def wait_for(request: Request, worker: InferenceWorker, job, deadline: float) -> dict:
    """The job's answer; ClientGone when the client disconnects first, DeadlineExceeded at the
    deadline. Either way a job still waiting leaves the queue."""
    answer = asyncio.wrap_future(job.future)
    answer.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception not retrieved"
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    worker.cancel(job)
    if gone in done:
        log.info("client went away; %s %s", "dropped from the queue" if job.future.cancelled()
                 else "its answer is discarded", job.name)
        raise ClientGone
    raise DeadlineExceeded


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
