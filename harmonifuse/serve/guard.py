"""Who may use the service, checked before a request reaches an endpoint.

Without an API key, ``Host`` and ``Origin`` must name this server (or the allow-lists): a page
elsewhere, or one that rebinds its DNS name to 127.0.0.1, cannot use the service through its
visitor's browser. With a key, one ``Authorization: Bearer KEY`` header whose UTF-8 key matches,
compared in constant time. While the server drains, 503.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from harmonifuse.serve.errors import ApiError, overloaded, unauthorized

HEALTH_PATHS = ("/health", "/health/ready")
PAGE_PATHS = ("/",)  # a static page: a browser cannot attach a bearer token to opening it; its API calls can


class Guard:
    """Before a request reaches an endpoint: without an API key, its Host and Origin must name this
    server (a page elsewhere, or a DNS-rebinding one, cannot use the service through the browser);
    with one, a single ``Authorization: Bearer KEY`` (all but the health endpoints and the page);
    and 503 while draining."""

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in HEALTH_PATHS:
            error = None
            settings = self.service.settings
            key = settings.api_key
            if not key:
                error = _check_origin(scope, settings)
            elif scope["path"] not in PAGE_PATHS:
                error = _check_key([v for k, v in scope["headers"] if k == b"authorization"], key)
            if error is None and self.service.draining:
                error = overloaded("the server is shutting down; retry on another instance", 5, "shutting_down")
                error.headers["Connection"] = "close"
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _check_key(headers: list[bytes], key: str) -> ApiError | None:
    """One ``Authorization: Bearer KEY`` header whose key matches (UTF-8, compared in constant time)."""
    import hmac

    if len(headers) > 1:
        return ApiError(400, "send one `Authorization` header, not several", param=None,
                        code="duplicate_authorization")
    scheme, _, given = (headers[0] if headers else b"").partition(b" ")
    if scheme.lower() != b"bearer" or not given.strip():
        return unauthorized("missing API key: send the header `Authorization: Bearer KEY`")
    if not hmac.compare_digest(given.strip(), key.encode("utf-8")):
        return unauthorized("incorrect API key")
    return None


def _names_server(authority: str, scope, allowed: tuple[str, ...]) -> bool:
    """Whether ``authority`` (``host[:port]``) names the address this connection reached, one of
    its loopback names, or an entry of ``allowed`` (``host`` or ``host:port``; ``*``: any)."""
    from harmonifuse.serve.server import is_loopback

    if "*" in allowed:
        return True
    authority = authority.strip().lower()
    if not authority:
        return False
    if authority in allowed:
        return True
    host, port = _split_authority(authority)
    if host in allowed:
        return True
    server_host, server_port = (scope.get("server") or ("", None))
    server_host = str(server_host).lower()
    if port is not None and server_port is not None and port != int(server_port):
        return False  # the name protects against rebinding; a missing port is the client's shorthand
    names = {server_host.strip("[]")}
    if is_loopback(server_host):
        names |= {"localhost", "127.0.0.1", "::1"}
    return host in names


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):  # [::1]:8000
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port = authority.split(":")
    else:
        host, port = authority, ""
    return host, int(port) if port.isdigit() else None


def _check_origin(scope, settings) -> ApiError | None:
    """Host and (when sent) Origin against this server's address and the allow-lists."""
    headers = [(k, v) for k, v in scope["headers"] if k in (b"host", b"origin")]
    hosts = [v.decode("latin-1") for k, v in headers if k == b"host"]
    origins = [v.decode("latin-1") for k, v in headers if k == b"origin"]
    if len(hosts) != 1 or not _names_server(hosts[0], scope, settings.allowed_hosts):
        return ApiError(403, f"the Host header {hosts[0] if hosts else '(none)'!r} does not name this server; "
                             "behind a proxy, start the server with --allowed-host NAME", code="host_not_allowed")
    if origins and (len(origins) > 1 or not _origin_allowed(origins[0], scope, settings)):
        return ApiError(403, f"requests from the page at {origins[0]!r} are not allowed: without an API key only "
                             "this server's own page may call it; start the server with --allowed-origin ORIGIN, "
                             "or with --api-key", code="origin_not_allowed")
    return None


def _origin_allowed(origin: str, scope, settings) -> bool:
    origin = origin.strip().lower()
    if "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and _names_server(parts.netloc, scope, settings.allowed_hosts)
