"""Who may do what: API keys, the operator role, and the network checks for a server without keys (loopback
clients, Host allow-list against DNS rebinding, WebSocket Origin). Plain Python and one small ASGI middleware;
the rules are unit-tested without Ray (tests/ingress/test_hostile_web.py runs them against the real app)."""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import urlsplit

from serve_app import protocol
from serve_app.config import AuthConfig
from serve_app.errors import WS_CLOSE, ErrorCode, ServiceError
from serve_app.sessions.session_store import owner_of

BEARER_PROTOCOL_PREFIX = "bearer."  # browsers offer ["da3.v1", "bearer.<key>"]; only da3.v1 is echoed
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _matches(token: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every key: timing says nothing about which key matched."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest((token or "").encode(), key.encode())
    return bool(token) and ok


def bearer_token(headers) -> str | None:
    """The key from `Authorization: Bearer` or a `bearer.<key>` WebSocket subprotocol. Never from the URL: URLs
    end up in access logs, proxies and browser history."""
    h = headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    for proto in headers.get("sec-websocket-protocol", "").split(","):
        if proto.strip().startswith(BEARER_PROTOCOL_PREFIX):
            return proto.strip()[len(BEARER_PROTOCOL_PREFIX):]
    return None


def host_name(host_header: str | None) -> str | None:
    """The name part of a Host header ("a.b:80" -> "a.b", "[::1]:80" -> "::1"); None if malformed."""
    if not host_header:
        return None
    h = host_header.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else None
    name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return name or None


def is_loopback(addr: str | None) -> bool:
    if not addr:
        return False
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return addr == "localhost"


class AccessPolicy:
    def __init__(self, auth: AuthConfig, cors_origins: list[str] | None = None):
        self.auth = auth
        self.keys = auth.resolved_keys() if auth.mode == "api_key" else []
        self.operator_keys = auth.resolved_operator_keys()
        self.cors_origins = list(cors_origins or [])
        hosts = auth.allowed_hosts
        if hosts is None:  # loopback names without keys (DNS rebinding), any name with keys
            hosts = list(LOOPBACK_HOSTS) if auth.mode == "none" else ["*"]
        self.allowed_hosts = [h.lower() for h in hosts]

    # --- keys and roles -----------------------------------------------------------------------------------
    def owner(self, token: str | None) -> str | None:
        """The owner fingerprint of a valid key (operator keys are user keys too); None without auth."""
        if self.auth.mode == "none":
            return None
        if not (_matches(token, self.keys) | _matches(token, self.operator_keys)):
            raise ServiceError(ErrorCode.UNAUTHORIZED, "missing or invalid API key", fatal=True)
        return owner_of(token)

    def is_operator(self, token: str | None) -> bool:
        """An operator key; without auth and without operator keys every (loopback, by default) client is one."""
        if self.operator_keys:
            return _matches(token, self.operator_keys)
        return self.auth.mode == "none"

    def require_operator(self, token: str | None) -> None:
        if self.is_operator(token):
            return
        self.owner(token)  # a missing or wrong key is 401; a valid user key is 403
        raise ServiceError(ErrorCode.FORBIDDEN, "this route needs an operator key (auth.operator_keys)",
                           fatal=True, details={"reason": "operator"})

    # --- network ------------------------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        name = host_name(host_header)
        if name is None:
            return False
        return any(name == p or (p.startswith("*.") and name.endswith(p[1:])) for p in self.allowed_hosts)

    def client_allowed(self, client_addr: str | None) -> bool:
        """Without keys only loopback clients, unless auth.allow_remote says otherwise."""
        return self.auth.mode != "none" or self.auth.allow_remote or is_loopback(client_addr)

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """A browser's WebSocket Origin: same origin (its host:port is the Host header), or one of cors_origins.
        No Origin header: not a browser, nothing to check."""
        if origin is None:
            return True
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        return bool(netloc) and host_header is not None and netloc == host_header.strip().lower()

    def refusal(self, scope: dict) -> ServiceError | None:
        """Why a request (HTTP or WebSocket) is refused before any route sees it, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if not self.host_allowed(host):
            return ServiceError(ErrorCode.FORBIDDEN, "Host header not allowed on this server (auth.allowed_hosts)",
                                fatal=True, details={"reason": "host"})
        client = scope.get("client")
        if not self.client_allowed(client[0] if client else None):
            return ServiceError(ErrorCode.FORBIDDEN, "this server has no API keys and takes loopback clients only "
                                "(auth.allow_remote)", fatal=True, details={"reason": "remote_client"})
        if scope["type"] == "websocket" and not self.origin_allowed(headers.get("origin"), host):
            return ServiceError(ErrorCode.FORBIDDEN, "WebSocket Origin not allowed (cors_origins)", fatal=True,
                                details={"reason": "origin"})
        return None


class AccessMiddleware:
    """Refuses requests `AccessPolicy.refusal` names: HTTP 403 with the error body; a WebSocket is accepted, told
    the error, and closed with 4403, like every other refused stream."""

    def __init__(self, app, policy: AccessPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        exc = self.policy.refusal(scope)
        if exc is None:
            return await self.app(scope, receive, send)
        body = {"error": exc.to_dict()}
        if scope["type"] == "http":
            data = json.dumps(body).encode()
            await send({"type": "http.response.start", "status": exc.http_status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        err = protocol.msg_error(exc.code, exc.message, fatal=True, details=exc.details)
        await send({"type": "websocket.send", "text": json.dumps(err, separators=(",", ":"))})
        await send({"type": "websocket.close", "code": WS_CLOSE[exc.code], "reason": exc.code.value})
