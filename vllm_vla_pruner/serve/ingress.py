"""``VLAIngress``: the fleet's HTTP front (FastAPI), one replica.

- ``POST /v1/actions``: validated here (garbage never reaches an engine) by the endpoint's own
  validator with the served model's inputs (AR: ``image``; OFT / pi0: the chunk form with
  ``images``, ``state``, ``execute_steps``, ...), then sent to the replica that owns the
  robot's session (``serve.routing``: consistent hashing on the
  body's ``session_id`` or the ``X-Session-ID`` header; ``serve.forward``: retry on the
  session's next replica if one dies, within the request's time bound). Every response,
  errors included, names who answered in ``X-VLA-Replica``.
- WebSocket ``/`` and ``/openpi``: openpi's policy protocol (``serve.openpi``), each
  connection one robot episode kept on its session's replica like HTTP requests.
- ``GET /health`` (also ``/healthz``), ``GET /v1/actions/info``, ``GET /metrics`` (the
  ingress's Prometheus metrics), ``GET /v1/fleet/replicas`` (replica ids, actor names,
  per-replica metrics URLs), ``GET /v1/fleet/metrics_targets`` (the same as Prometheus
  HTTP service discovery) and ``GET /v1/fleet/sessions`` (which replica each robot lives on).

With an API key (``serve.auth``) every route but ``/health(z)`` and ``/metrics`` needs it. The
FastAPI app is built per ingress replica (Serve's ``__serve_build_asgi_app__``) so that the
key's digest and the routes are plain attributes of this object, not module state.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from ray import serve

from vllm_vla_pruner.api.json_body import parse_json_body
from vllm_vla_pruner.api.protocol import (
    SESSION_ID_HEADER,
    ApiError,
    RequestContext,
    check_session_id,
)
from vllm_vla_pruner.metrics import CONTENT_TYPE_LATEST, IngressMetrics, render
from vllm_vla_pruner.serve import discovery
from vllm_vla_pruner.serve.auth import ApiKeyMiddleware
from vllm_vla_pruner.serve.forward import ReplicaForwarder
from vllm_vla_pruner.serve.sessions import SessionTable

__all__ = ["ATTEMPTS_HEADER", "OPENPI_PATHS", "REPLICA_HEADER", "FleetIngress"]

REPLICA_HEADER = "X-VLA-Replica"
ATTEMPTS_HEADER = "X-VLA-Attempts"
#: What ``X-VLA-Replica`` says when the ingress answered by itself (no engine involved).
INGRESS = "ingress"
#: Where robots running openpi-client connect (``WebsocketClientPolicy(host, port)``: ``/``).
OPENPI_PATHS = ("/", "/openpi")


def _error(err: ApiError, attempts: int = 0) -> JSONResponse:
    headers = {REPLICA_HEADER: INGRESS}
    if attempts:
        headers[ATTEMPTS_HEADER] = str(attempts)
    return JSONResponse(status_code=err.status, content=err.to_dict(), headers=headers)


@serve.ingress()
class FleetIngress:
    """HTTP front of the fleet; see the module docstring for the routes.

    ``settings``: ``request_timeout_s``, ``max_attempts``, ``session_window_s`` and
    ``api_key_sha256`` (hex digest of the key; None: no key), built by ``serve.app``.
    """

    def __init__(self, engine: Any, settings: dict[str, Any] | None = None) -> None:
        from vllm_vla_pruner.api.service import ServiceLimits

        s = dict(settings or {})
        self.app_name = serve.get_replica_context().app_name
        self.metrics = IngressMetrics()
        self.forwarder = ReplicaForwarder(
            engine,
            timeout_s=float(s.get("request_timeout_s", 60.0)),
            max_attempts=int(s.get("max_attempts", 3)),
            on_retry=lambda reason: self.metrics.retries.labels(reason).inc(),
        )
        self.sessions = SessionTable(float(s.get("session_window_s", 60.0)))
        self.api_key_sha256: str | None = s.get("api_key_sha256")
        self.limits = ServiceLimits()
        self._validation: RequestContext | None = None  # see _request_context
        self._openpi: Any = None  # the openpi WebSocket server, built on first connection

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on the replica after ``__init__``: the app and its routes."""
        app = FastAPI(title="vla-pruner fleet", docs_url=None, redoc_url=None, openapi_url=None)
        for path, endpoint, method in self._routes():
            app.add_api_route(path, endpoint, methods=[method])
        # openpi's WebSocket policy protocol at the root path (openpi-client's default) and a
        # named one; the key is checked by the protocol (openpi-client sends 'Api-Key <key>').
        for path in OPENPI_PATHS:
            app.add_api_websocket_route(path, self.openpi)
        if self.api_key_sha256:
            app.add_middleware(
                ApiKeyMiddleware,
                digest=self.api_key_sha256,
                on_reject=self._unauthorized,
                headers={REPLICA_HEADER: INGRESS},
            )
        return app

    def _routes(self) -> list[tuple[str, Any, str]]:
        return [
            ("/v1/actions", self.actions, "POST"),
            ("/health", self.health, "GET"),
            ("/healthz", self.health, "GET"),  # openpi's health route
            ("/v1/actions/info", self.info, "GET"),
            ("/metrics", self.prometheus, "GET"),
            ("/v1/fleet/replicas", self.replicas, "GET"),
            ("/v1/fleet/metrics_targets", self.metrics_targets, "GET"),
            ("/v1/fleet/sessions", self.session_map, "GET"),
        ]

    def _unauthorized(self, path: str) -> None:
        """Count a 401 (unknown paths under one label: a scanner must not add series)."""
        route = path if path in {r[0] for r in self._routes()} else "other"
        self.metrics.requests.labels(route, "401").inc()
        self.metrics.errors.labels(route, "401", "unauthorized").inc()

    # -- helpers

    async def _request_context(self) -> RequestContext:
        """The served model's inputs and allowed values (pruners, unnorm keys, cameras, state
        size, chunk, flow) exactly as the replicas' ``ActionService`` gives them to the
        single-server endpoint: one validator and one context decide everywhere.

        Asked of a replica once per ingress replica (every replica of the application serves
        the one checkpoint of the config's ``model``, as the openpi backend also assumes);
        503 while no replica answers, as forwarding the request would.
        """
        if self._validation is None:
            try:
                out = await self.forwarder.call("info")
            except Exception as exc:  # noqa: BLE001 - timeout or no replica yet
                raise ApiError(
                    503, f"no replica answered: {type(exc).__name__}", type="unavailable"
                ) from None
            self._validation = out["validation"]
        return self._validation

    async def _parse(self, body: bytes, header: str | None) -> tuple[dict[str, Any], str | None]:
        """Body bytes -> (decoded body, session id), or the 4xx naming the field."""
        data = parse_json_body(body)  # 400 for non-JSON before any replica is asked
        req = (await self._request_context()).parse(data)
        sid = req.session_id
        if sid is None and header is not None:
            try:
                sid = check_session_id(header.strip())
            except ValueError as exc:
                raise ApiError(
                    422, f"{SESSION_ID_HEADER} header: {exc}", field="session_id"
                ) from None
        return data, sid

    # -- routes

    async def actions(self, request: Request) -> Response:
        from vllm_vla_pruner.api.endpoint import read_body_limited

        t0 = time.perf_counter()
        route = "/v1/actions"
        self.metrics.in_flight.inc()
        try:
            header = request.headers.get(SESSION_ID_HEADER)
            try:
                body = await read_body_limited(request, self.limits.max_body_bytes)
                data, sid = await self._parse(body, header)
            except ApiError as err:
                self.metrics.observe(route, err.status, time.perf_counter() - t0, err.type)
                return _error(err)
            st = self.sessions.next_frame(sid) if sid is not None else None
            fwd = await self.forwarder.predict(data, header, sid, st.seq if st else None)
            if fwd.error is not None:
                err = fwd.error
                self.metrics.observe(route, err.status, time.perf_counter() - t0, err.type)
                return _error(err, attempts=fwd.attempts)
            result = fwd.result or {}
            status = int(result["status"])
            replica = str(result.get("replica") or "")
            body_out = result["body"]
            if status < 400:
                self.metrics.replica_requests.labels(replica).inc()
                if st is not None and self.sessions.served(st, replica):
                    self.metrics.reroutes.inc()
            err_type = None
            if status >= 400 and isinstance(body_out, dict):
                err_type = (body_out.get("error") or {}).get("type")
            self.metrics.observe(route, status, time.perf_counter() - t0, err_type)
            return JSONResponse(
                status_code=status,
                content=body_out,
                headers={REPLICA_HEADER: replica, ATTEMPTS_HEADER: str(fwd.attempts)},
            )
        finally:
            self.metrics.in_flight.dec()
            self.metrics.active_sessions.set(self.sessions.active())

    async def openpi(self, websocket: WebSocket) -> None:
        """One robot speaking openpi: the single-server loop over :class:`FleetBackend`."""
        if self._openpi is None:
            from vllm_vla_pruner.api.openpi.server import OpenpiServer
            from vllm_vla_pruner.serve.openpi import FleetBackend

            try:
                out = await self.forwarder.call("info")
            except Exception:  # noqa: BLE001 - no replica yet: refuse, the robot retries
                await websocket.close(code=1013, reason="no engine replica is ready")
                return
            tokens = [bytes.fromhex(self.api_key_sha256)] if self.api_key_sha256 else []
            backend = FleetBackend(out["info"], self.forwarder, self.sessions)
            self._openpi = OpenpiServer(backend, tokens=tokens)
        await self._openpi.serve(websocket)

    async def health(self) -> Response:
        self.metrics.requests.labels("/health", "200").inc()
        return JSONResponse({"status": "ok", "app": self.app_name})

    async def info(self) -> Response:
        t0 = time.perf_counter()
        try:
            out = await self.forwarder.call("info")
        except Exception as exc:  # noqa: BLE001 - timeout or no replica
            err = ApiError(503, f"no replica answered: {type(exc).__name__}", type="unavailable")
            self.metrics.observe("/v1/actions/info", 503, time.perf_counter() - t0, err.type)
            return _error(err)
        self.metrics.observe("/v1/actions/info", 200, time.perf_counter() - t0)
        return JSONResponse(out["info"], headers={REPLICA_HEADER: out["replica"]})

    async def prometheus(self) -> Response:
        self.metrics.active_sessions.set(self.sessions.active())
        return Response(render(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def replicas(self) -> Response:
        reps = await asyncio.to_thread(discovery.live_replicas, self.app_name)
        return JSONResponse({"replicas": reps})

    async def metrics_targets(self) -> Response:
        """Prometheus HTTP service discovery: every live replica's metrics port."""
        reps = await asyncio.to_thread(discovery.live_replicas, self.app_name)
        return JSONResponse(discovery.metrics_targets(self.app_name, reps))

    async def session_map(self) -> Response:
        return JSONResponse(self.sessions.snapshot())
