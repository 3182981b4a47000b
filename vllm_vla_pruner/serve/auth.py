"""API key of the fleet ingress, with vLLM's ``--api-key`` semantics.

A request carries ``Authorization: Bearer <key>``; anything else gets 401 in the API's error
shape. ``/health`` and ``/metrics`` stay open, as on vLLM's server (load balancers and
Prometheus probe them without credentials; they expose no model and run no inference).

Whether a fleet may start without a key is decided once, in :func:`resolve_api_key`:

- a key in the environment variable named by ``auth.api_key_env``: enforced, wherever the
  fleet listens;
- no key and ``http.host`` a loopback address: open, as before (only this machine can
  connect, which is what a laptop fleet or a benchmark wants);
- no key and any other host: **refused** unless ``auth.allow_unauthenticated: true``.
  vLLM itself starts open on 0.0.0.0 when no key is given; a fleet that accepts camera
  frames and drives robots should not become reachable by the whole network by omission,
  and saying so once in the config (e.g. behind an authenticating gateway) is cheap.

Only the SHA-256 digest of the key leaves the deploying process: it is what the ingress
deployment receives, so the key never sits in Ray's deployment metadata.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vllm_vla_pruner.api.protocol import ApiError
from vllm_vla_pruner.serve.config import FleetConfig, FleetConfigError

__all__ = [
    "OPEN_PATHS",
    "ApiKeyMiddleware",
    "client_headers",
    "is_loopback",
    "key_digest",
    "resolve_api_key",
]

logger = logging.getLogger(__name__)

#: Routes that answer without a key (vLLM guards /v1 and leaves /health and /metrics open).
OPEN_PATHS = frozenset({"/health", "/healthz", "/metrics"})


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a hostname: may resolve to anything
        return False


def resolve_api_key(cfg: FleetConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The key the ingress must demand, or None (open); raises when open is not allowed."""
    env = os.environ if environ is None else environ
    name = cfg.auth.api_key_env
    key = env.get(name) or None
    if key is not None:
        return key
    host = cfg.http.host
    if is_loopback(host):
        return None
    if cfg.auth.allow_unauthenticated:
        logger.warning(
            "fleet %s listens on %s without an API key (auth.allow_unauthenticated)",
            cfg.name,
            host,
        )
        return None
    raise FleetConfigError(
        f"http.host: {host} is reachable from other machines and no API key is set; "
        f"export {name}=<key> (auth.api_key_env) before deploying, or set "
        "auth.allow_unauthenticated: true if something else guards the port"
    )


def key_digest(key: str) -> str:
    """What the ingress stores instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def client_headers(cfg: FleetConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers a client of this fleet sends (the key from the same variable, if set)."""
    env = os.environ if environ is None else environ
    key = env.get(cfg.auth.api_key_env)
    return {"Authorization": f"Bearer {key}"} if key else {}


class ApiKeyMiddleware:
    """Pure ASGI: every request outside :data:`OPEN_PATHS` needs a matching bearer token."""

    def __init__(
        self,
        app: ASGIApp,
        digest: str,
        on_reject: Callable[[str], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.digest = bytes.fromhex(digest)
        self.on_reject = on_reject
        self.headers = {"WWW-Authenticate": "Bearer", **(headers or {})}

    def authorized(self, headers: Headers) -> bool:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self.digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Lifespan and websocket (no such route: FastAPI refuses it) pass; so does CORS's
        # OPTIONS, as in vLLM.
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in OPEN_PATHS or self.authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(path)
        err = ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            type="unauthorized",
        )
        response = JSONResponse(err.to_dict(), status_code=401, headers=self.headers)
        await response(scope, receive, send)
