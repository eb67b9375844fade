"""The connection below the app: uvicorn's h11 protocol with the guards an untrusted network needs.

uvicorn bounds the header size (h11, 16 KB) and closes a kept-alive connection idle for
``timeout_keep_alive``, but a connection that never finishes its headers stays open, a cap on
connections (``limit_concurrency``) only answers once a request arrives, and its refusals are
plain text. Here, as nginx does with ``client_header_timeout`` and ``limit_conn``:

- a request line and headers must arrive within ``header_timeout`` seconds of the connection (or
  of the previous answer on a kept-alive one), else 408 and the connection is closed;
- past ``max_connections`` open connections, a new one is answered 503 (Retry-After) and closed
  at once;
- a malformed request, or headers over the size limit (431), is answered in OpenAI's error shape.

The body's own timeouts (between chunks, and overall) are the app's (:mod:`.upload`), which can
answer them with a proper 408.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from harmonifuse.serve.errors import INVALID, SERVER, error_body

log = logging.getLogger("harmonifuse.serve")

REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_connections: int = 128
    max_header_bytes: int = 16 * 1024


def raw_error(status: int, message: str, code: str, type_: str = INVALID, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response with an OpenAI-shaped body, closing the connection
    (written before or instead of a request, where h11 has no response to send)."""
    body = json.dumps(error_body(message, type_, None, code)).encode()
    head = [f"HTTP/1.1 {status} {REASONS[status]}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _RememberingConnection(h11.Connection):
    """h11's connection, remembering the status its last protocol error suggests (431: too large)."""

    error_status = 400

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as error:
            self.error_status = error.error_status_hint
            raise


class GuardedH11Protocol(H11Protocol):
    def __init__(self, *args, limits: ConnectionLimits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.conn = _RememberingConnection(h11.SERVER, limits.max_header_bytes)
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refused a connection: %d open, the limit is %d (--max-connections)",
                        len(self.connections) - 1, self.limits.max_connections)
            self._refuse(raw_error(503, f"the server has {self.limits.max_connections} connections open "
                                        "(--max-connections); retry shortly", "too_many_connections", SERVER,
                                   retry_after=1))
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()  # the headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()  # the next request on this kept-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self.conn.error_status == 431:
            body = raw_error(431, f"the request's headers are larger than {self.limits.max_header_bytes // 1024} KB; "
                                  "send fewer or shorter headers", "headers_too_large")
        else:
            body = raw_error(400, "the request is not valid HTTP/1.1", "invalid_http_request")
        self._refuse(body)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return  # a request is under way (pipelined), or the connection is already going
        idle = self.conn.trailing_data[0] == b""
        self._refuse(raw_error(408, f"no complete request within {self.limits.header_timeout:g} s "
                                    f"({'nothing was sent' if idle else 'the headers were still arriving'}; "
                                    "--header-timeout)", "header_timeout"))

    def _refuse(self, response: bytes) -> None:
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def protocol_for(limits: ConnectionLimits):
    """The protocol class uvicorn's ``Config(http=...)`` takes, with ``limits`` bound."""
    return functools.partial(GuardedH11Protocol, limits=limits)
