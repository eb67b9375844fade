"""A multipart upload, streamed to a temporary file while its size is counted.

The ``file`` part goes to disk chunk by chunk; the other form fields (``model``,
``response_format``, ...) are kept as text up to :data:`FIELDS_LIMIT` bytes in all. A request
whose ``Content-Length`` is over the limit is refused before a byte of its body is read; one that
does not announce its length (chunked) is refused as soon as the count passes the limit. Either
way the server holds at most one network chunk of it in memory. A body that stalls for
``idle_timeout`` seconds between two chunks (a slow client, or a Content-Length that promises more
than is sent), or takes longer than ``upload_timeout`` in all, is answered 408 and its
connection closed.
"""
from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from harmonifuse.serve.errors import ApiError

FIELDS_LIMIT = 64 * 1024  # bytes of form fields other than the file, and of part headers
MB = 1024 * 1024


class TooLarge(Exception):
    pass


class FieldsTooLarge(Exception):
    pass


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None  # the uploaded file's bytes, on disk
    filename: str = "audio"
    size: int = 0

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, f"the upload is larger than this server's limit of {limit_bytes / MB:g} MB "
                         "(--max-upload-mb); send a shorter recording or a compressed format (FLAC, OGG, MP3), "
                         "or ask the operator to raise --max-upload-mb", param="file", code="file_too_large")


def fields_too_large() -> ApiError:
    return ApiError(413, f"the form fields other than `file` (and the part headers) are larger than "
                         f"{FIELDS_LIMIT // 1024} KB; send short values (a `prompt` of a few sentences)",
                    param=None, code="fields_too_large")


def too_slow(seconds: float, idle: bool) -> ApiError:
    what = (f"no part of the body arrived for {seconds:g} s (--idle-timeout)" if idle
            else f"the body took longer than {seconds:g} s to arrive (--upload-timeout)")
    return ApiError(408, f"upload timed out: {what}; check the connection and send it again, or a smaller "
                         "(compressed) file", param="file", code="upload_timeout", headers={"Connection": "close"})


def _safe_name(name: str) -> str:
    """The client's file name for messages: its last path part, printable, at most 100 characters."""
    name = re.split(r"[\\/]", name)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:100] or "audio"


async def read_upload(request: Request, limit_bytes: int, directory: str | os.PathLike, *,
                      idle_timeout: float | None = None, upload_timeout: float | None = None) -> Upload:
    """The form of ``request``, its ``file`` part written to a new file in ``directory``.

    Raises:
        ApiError: 400 when the body is not multipart/form-data, 413 when the file (or the whole
            body) exceeds ``limit_bytes`` or the other fields :data:`FIELDS_LIMIT`, 408 when the
            body stalls ``idle_timeout`` seconds or takes over ``upload_timeout`` in all.
        ClientDisconnect: the client went away during the upload.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "send the audio as multipart/form-data with the recording in the `file` field, "
                            "e.g. curl -F file=@clip.wav", param="file", code="invalid_content_type")
    body_limit = limit_bytes + FIELDS_LIMIT
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > body_limit:
        raise too_large(limit_bytes)

    upload = Upload()
    state: dict = {"headers": {}, "field": b"", "value": b"", "name": None, "out": None, "text": None,
                   "field_bytes": 0}

    def on_part_begin() -> None:
        state.update(headers={}, name=None, out=None, text=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["field_bytes"] += len(state["field"]) + len(state["value"])
        if state["field_bytes"] > FIELDS_LIMIT:
            raise FieldsTooLarge
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state.update(field=b"", value=b"")

    def on_headers_finished() -> None:
        _, options = parse_options_header(state["headers"].get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        state["name"] = name
        if name == "file" and upload.path is None:
            filename = _safe_name(options.get(b"filename", b"audio").decode("utf-8", "replace"))
            suffix = Path(filename).suffix.lower()
            fd, path = tempfile.mkstemp(prefix="upload-", suffix=suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix)
                                        else "", dir=directory)
            upload.path, upload.filename = Path(path), filename
            state["out"] = os.fdopen(fd, "wb")
        elif b"filename" not in options:
            state["text"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["out"] is not None:
            upload.size += end - start
            if upload.size > limit_bytes:
                raise TooLarge
            state["out"].write(data[start:end])
        elif state["text"] is not None:
            state["field_bytes"] += end - start
            if state["field_bytes"] > FIELDS_LIMIT:
                raise FieldsTooLarge
            state["text"] += data[start:end]

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None
        elif state["text"] is not None and state["name"]:
            upload.fields[state["name"]] = state["text"].decode("utf-8", "replace")

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    received = 0
    try:
        async for chunk in _timed(request.stream(), idle_timeout, upload_timeout):
            received += len(chunk)
            if received > body_limit:
                raise TooLarge
            parser.write(chunk)
        parser.finalize()
    except TooLarge:
        _abandon(upload, state)
        raise too_large(limit_bytes) from None
    except FieldsTooLarge:
        _abandon(upload, state)
        raise fields_too_large() from None
    except ClientDisconnect:
        _abandon(upload, state)
        raise
    except ApiError:
        _abandon(upload, state)
        raise
    except Exception as error:  # noqa: BLE001 - a malformed body, named without internals
        _abandon(upload, state)
        raise ApiError(400, f"the multipart body could not be parsed ({type(error).__name__}); send the audio "
                            "as multipart/form-data with the recording in the `file` field",
                       param="file", code="invalid_multipart") from None
    if state["out"] is not None:  # the body ended inside the file part
        _abandon(upload, state)
        raise ApiError(400, "the upload ended before the file was complete; send it again",
                       param="file", code="incomplete_upload")
    return upload


async def _timed(chunks, idle_timeout: float | None, upload_timeout: float | None):
    """``chunks`` (an async iterator) under the two timeouts (ApiError 408)."""
    ends = None if upload_timeout is None else time.monotonic() + upload_timeout
    iterator = chunks.__aiter__()
    while True:
        left = None if ends is None else ends - time.monotonic()
        waits = [w for w in (idle_timeout, left) if w is not None]
        wait = min(waits) if waits else None
        if wait is not None and wait <= 0:
            raise too_slow(upload_timeout, idle=False)
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), wait)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            idle = ends is None or time.monotonic() < ends
            raise too_slow(idle_timeout if idle else upload_timeout, idle=idle) from None
        yield chunk


def _abandon(upload: Upload, state: dict) -> None:
    if state.get("out") is not None:
        state["out"].close()
        state["out"] = None
    upload.close()
