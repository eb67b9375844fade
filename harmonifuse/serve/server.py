"""Running the app under uvicorn: the bind policy, and a SIGTERM that drains.

On SIGTERM (or Ctrl+C) the server stops accepting connections, answers 503 to new requests on
connections already open, lets every request in flight finish (within the request timeout plus a
margin), stops the inference worker and exits with status 0. A model that fails to load stops
the server with status 1.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading

import uvicorn

log = logging.getLogger("harmonifuse.serve")


class BindRefused(Exception):
    pass


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]")
    if name.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_bind(host: str, port: int, api_key: str | None, insecure: bool) -> None:
    """Refuse a non-loopback address without an API key unless ``insecure``."""
    if is_loopback(host) or api_key or insecure:
        return
    raise BindRefused(f"refusing to listen on {host}:{port} without an API key: anyone who can reach it could use "
                      "the model. Set --api-key KEY (or HARMONIFUSE_API_KEY) so callers must send "
                      "`Authorization: Bearer KEY`, or pass --insecure to serve without one (or keep the default "
                      "--host 127.0.0.1)")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT marks the app as draining and exits 0 afterwards
    (uvicorn re-raises the signal once shut down, which would end the process with 128 + 15)."""

    def __init__(self, config: uvicorn.Config, service) -> None:
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("signal %s: draining (no new requests; %d waiting and %d running will be answered)",
                     signal.Signals(sig).name, self.service.worker.waiting, self.service.worker.running)
        self.service.draining = True
        super().handle_exit(sig, frame)


def server_for(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> DrainingServer:
    from harmonifuse.serve.protocol import ConnectionLimits, protocol_for

    service = app.state.service
    settings = service.settings
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.timeout + 30, server_header=False,
                            http=protocol_for(ConnectionLimits(settings.header_timeout, settings.max_connections)),
                            timeout_keep_alive=settings.keep_alive)
    server = DrainingServer(config, service)

    def stop() -> None:
        server.should_exit = True

    service.on_load_failed = stop
    return server


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        sockets: list[socket.socket] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit status (0, or 1 when the model failed to load)."""
    server = server_for(app, host=host, port=port, log_level=log_level)
    server.run(sockets=sockets)
    return 1 if app.state.service.load_error else 0
