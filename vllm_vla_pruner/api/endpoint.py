"""``/v1/actions`` on vLLM's OpenAI-compatible server, as a ``vllm.endpoint_plugins`` entry.

vLLM loads this only when ``VLLM_PLUGINS`` names ``vla_pruner`` (the same name enables the
``vllm.general_plugins`` entry that registers the model), calls :meth:`attach_router` while
building the app and :meth:`init_state` once the engine is up. The body is read and parsed
here rather than by FastAPI so that size limits, unknown fields and wrong types all come
back in one error shape, ``{"error": {"field", "message", "type"}}``, never FastAPI's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from vllm_vla_pruner.api.json_body import parse_json_body
from vllm_vla_pruner.api.protocol import (
    SESSION_ID_HEADER,
    ActionChunkResponse,
    ActionRequest,
    ActionResponse,
    ApiError,
    InfoResponse,
)
from vllm_vla_pruner.api.service import ActionService, ServiceLimits

__all__ = ["ActionEndpointPlugin", "handle_action_body", "read_body_limited"]

logger = logging.getLogger(__name__)

STATE_KEY = "vla_action_service"


async def read_body_limited(request: Request, limit: int) -> bytes:
    """The request body, or 413 naming ``image`` (the only field that can be that big)."""
    too_big = ApiError(
        413,
        f"image: request body larger than {limit} bytes; send a smaller (compressed) image",
        field="image",
        type="payload_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(service: ActionService, body: bytes) -> ActionRequest:
    """JSON bytes -> validated request; 400 for non-JSON or a nesting bomb, 422 naming the
    field otherwise."""
    return service.request_context().parse(parse_json_body(body))


async def handle_action_body(
    service: ActionService, body: bytes, session_header: str | None = None
) -> ActionResponse | ActionChunkResponse:
    """Body bytes -> response; shared by this route and the Ray Serve ingress."""
    req = parse_body(service, body)
    return await service.predict(req, session_header)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content=err.to_dict())


async def _until_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _service(request: Request) -> ActionService:
    service = getattr(request.app.state, STATE_KEY, None)
    if service is None:
        raise ApiError(503, "the action service is not initialised", type="unavailable")
    return service


def build_router() -> APIRouter:
    router = APIRouter(tags=["actions"])

    @router.post(
        "/v1/actions",
        response_model=ActionResponse | ActionChunkResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ActionRequest.model_json_schema()}},
            }
        },
    )
    async def create_action(raw_request: Request) -> Any:
        """One camera frame + instruction -> one action (AR OpenVLA), or every camera view +
        state + instruction -> an action chunk (OpenVLA-OFT)."""
        t0 = time.perf_counter()
        response = await _create_action(raw_request)
        _observe(raw_request, response, time.perf_counter() - t0)
        return response

    async def _create_action(raw_request: Request) -> Any:
        try:
            service = _service(raw_request)
            body = await read_body_limited(raw_request, service.limits.max_body_bytes)
            req = parse_body(service, body)
        except ApiError as err:
            return _error_response(err)
        work = asyncio.ensure_future(
            service.predict(req, raw_request.headers.get(SESSION_ID_HEADER))
        )
        gone = asyncio.ensure_future(_until_disconnect(raw_request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            # Client gone: cancelling aborts the engine request (see ActionService.predict).
            work.cancel()
            return _error_response(ApiError(499, "client disconnected", type="cancelled"))
        try:
            resp = work.result()
        except ApiError as err:
            if err.status >= 500:
                logger.warning("/v1/actions failed: %s", err.message)
            return _error_response(err)
        except Exception as exc:  # noqa: BLE001 - never leak a bare 500 without the JSON shape
            logger.exception("/v1/actions crashed")
            return _error_response(
                ApiError(500, f"internal error: {type(exc).__name__}", type="internal")
            )
        out = JSONResponse(content=resp.model_dump(mode="json"))
        out.vla_response = resp  # for the metrics, read in _observe
        return out

    @router.get("/v1/actions/info", response_model=InfoResponse)
    async def action_info(raw_request: Request) -> Any:
        """Model, action dimension per unnorm_key, visual tokens, pruners, limits."""
        try:
            return JSONResponse(content=_service(raw_request).info().model_dump(mode="json"))
        except ApiError as err:
            return _error_response(err)

    return router


METRICS_KEY = "vla_pruner_metrics"
_METRICS: Any = None


def _server_metrics() -> Any:
    """One metric set per process, in the default registry vLLM's /metrics exports."""
    global _METRICS
    if _METRICS is None:
        import prometheus_client

        from vllm_vla_pruner.metrics import ReplicaMetrics

        _METRICS = ReplicaMetrics(registry=prometheus_client.REGISTRY, replica="vllm-server")
    return _METRICS


class ActionEndpointPlugin:
    """The ``vla_pruner`` endpoint plugin (vllm/plugins/endpoint_plugins/interface.py)."""

    name = "vla_pruner"
    # Needs a generating engine; never loaded on vLLM's engine-less render server.
    required_tasks = ("generate",)

    def __init__(self, limits: ServiceLimits | None = None) -> None:
        self.limits = limits

    def attach_router(self, app: FastAPI) -> None:
        from vllm_vla_pruner.api.openpi.server import build_openpi_router

        app.include_router(build_router())
        # openpi's WebSocket policy protocol (/, /openpi) and GET /healthz on the same server.
        app.include_router(build_openpi_router())

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:  # defensive: required_tasks already excludes render
            logger.warning("vla_pruner: no engine client; /v1/actions will answer 503")
            return
        names = getattr(args, "served_model_name", None) or [getattr(args, "model", None)]
        service = ActionService.from_engine_client(
            engine_client,
            served_model_names=[n for n in names if n],
            limits=self.limits,
            pruning_defaults=_pruning_defaults(engine_client),
        )
        setattr(state, STATE_KEY, service)
        setattr(state, METRICS_KEY, _server_metrics())
        from vllm_vla_pruner.api.openpi.server import init_openpi_state

        init_openpi_state(state, service, engine_client, args)
        logger.info(
            "vla_pruner: /v1/actions ready (model %s, action dims %s, %d visual tokens)",
            service.served_model_names[0],
            service.action_dims,
            service.num_visual,
        )


def _observe(raw_request: Request, response: Any, seconds: float) -> None:
    """Prometheus: request count/latency/errors, pruning effect, the worker's counters.

    The metrics live in prometheus_client's default registry, which vLLM's own ``/metrics``
    route exports, so one scrape shows vLLM's and the plugin's series together.
    """
    metrics = getattr(raw_request.app.state, METRICS_KEY, None)
    if metrics is None:
        return
    status = int(getattr(response, "status_code", 200))
    err_type = None
    if status >= 400:
        try:
            err_type = json.loads(response.body).get("error", {}).get("type")
        except (ValueError, AttributeError):
            err_type = "error"
    metrics.observe_request(status, seconds, err_type)
    resp = getattr(response, "vla_response", None)
    if resp is not None and resp.pruning is not None:
        metrics.observe_report(resp.pruning)
    engine = getattr(raw_request.app.state, "engine_client", None)
    now = time.monotonic()
    if engine is not None and now - getattr(metrics, "_vla_polled", 0.0) > 5.0:
        metrics._vla_polled = now
        asyncio.ensure_future(_poll_worker(engine, metrics))


async def _poll_worker(engine: Any, metrics: Any) -> None:
    try:
        reports = await engine.collective_rpc("vla_pruner_report")
    except Exception:  # noqa: BLE001 - metrics must never fail a request
        return
    if reports and reports[0]:
        metrics.observe_worker_report(reports[0])


def _pruning_defaults(engine_client: Any) -> dict[str, Any]:
    """Server-wide pruning defaults: the checkpoint's recommendation (config.json) overridden
    by ``--additional-config '{"vla_pruner": {...}}'``."""
    try:
        from vllm_vla_pruner.engine.settings import PruningSettings

        settings = PruningSettings.from_vllm_config(engine_client.vllm_config)
    except Exception:  # noqa: BLE001 - informational only; the engine applies its own
        logger.debug("could not read pruning defaults", exc_info=True)
        return {}
    return {
        "method": settings.method,
        "keep_ratio": settings.keep_ratio,
        "layer": settings.layer,
        "window": settings.window,
    }
