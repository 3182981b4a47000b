"""The fleet as a Ray Serve application: R engine replicas behind one HTTP ingress.

``VLAEngine`` (R replicas) each own a vLLM ``AsyncLLM`` with the plugin and an
``ActionService``; ``VLAIngress`` (FastAPI) answers the robots:

- ``POST /v1/actions``: validated here (garbage never reaches an engine), then sent to the
  replica that owns the robot's session (``serve.routing``: consistent hashing on the
  body's ``session_id`` or the ``X-Session-ID`` header, fallback replicas when the owner is
  full or gone). Every response, errors included, names the serving replica in
  ``X-VLA-Replica``. A replica that dies mid-request is retried on the session's next
  replica within the request's time bound; if none answers in time the robot gets a 503/504
  with ``{"error": {...}}`` at once, never a hang.
- ``GET /health``, ``GET /v1/actions/info``, ``GET /metrics`` (the ingress's Prometheus
  metrics), ``GET /v1/fleet/replicas`` (replica ids, actor names, per-replica metrics URLs),
  ``GET /v1/fleet/metrics_targets`` (the same as Prometheus HTTP service discovery) and
  ``GET /v1/fleet/sessions`` (which replica each robot lives on).

Temporal history: pruning state for a robot lives in the engine that served its last
frames. The ingress numbers each session's frames; a replica that sees a gap (frames went to
another replica while this one was full or the session moved back) restarts the robot's
history as a new episode, so stale history is never mixed in; a replica new to a session
warms it up by itself (the engine's frame counter starts at zero).

Metrics of the replicas are served by each replica on its own port (a non-ingress Serve
deployment has no HTTP route); they register ``metrics_url`` in Ray's internal KV, which is
how the ingress lists them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from vllm_vla_pruner.api.protocol import (
    SESSION_ID_HEADER,
    ApiError,
    check_session_id,
    parse_action_request,
)
from vllm_vla_pruner.metrics import (
    CONTENT_TYPE_LATEST,
    IngressMetrics,
    ModelDims,
    ReplicaMetrics,
    render,
    start_metrics_server,
)

__all__ = [
    "ENGINE_DEPLOYMENT",
    "INGRESS_DEPLOYMENT",
    "REPLICA_HEADER",
    "EngineReplica",
    "FleetIngress",
    "build_app",
    "replica_env",
]

logger = logging.getLogger("ray.serve")

ENGINE_DEPLOYMENT = "VLAEngine"
INGRESS_DEPLOYMENT = "VLAIngress"
REPLICA_HEADER = "X-VLA-Replica"
ATTEMPTS_HEADER = "X-VLA-Attempts"
KV_NAMESPACE = "vla_fleet"
SERVE_NAMESPACE = "serve"
MAX_TRACKED_SESSIONS = 65536


def replica_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the engine replicas: the plugin must load in the replica process and in
    vLLM's engine-core/worker subprocesses (they inherit it)."""
    from vllm_vla_pruner.server_defaults import cpu_safe_env

    env: dict[str, str] = {}
    cpu_safe_env(env)
    # vLLM's automatic CPU binding pins every engine's worker to the same first core; with
    # several replicas on one node they would all share it. Let the OS spread them instead
    # (a config's replica env can set explicit cores per node).
    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    env.update(extra or {})
    return env


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _kv_key(app: str, replica: str) -> bytes:
    return f"{app}/{replica}".encode()


# ----------------------------------------------------------------------------- replica


class EngineReplica:
    """One vLLM engine with the plugin; Serve routes robot sessions to it."""

    def __init__(
        self,
        model_dir: str,
        engine_overrides: dict[str, Any] | None = None,
        pruning: dict[str, Any] | None = None,
        served_model_name: str | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_port: int = 0,
        report_interval_s: float = 2.0,
        session_window_s: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> None:
        for k, v in replica_env(env).items():
            os.environ.setdefault(k, v)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from vllm_vla_pruner.api.service import ActionService
        from vllm_vla_pruner.engine.local import engine_kwargs
        from vllm_vla_pruner.engine.settings import PruningSettings

        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.replica_id = ctx.replica_id.unique_id
        self.actor_name = ctx.replica_id.to_full_id_str()
        self.pruning = dict(pruning or {})
        overrides = dict(engine_overrides or {})
        if served_model_name:
            overrides.setdefault("served_model_name", served_model_name)
        kwargs = engine_kwargs(model_dir, pruning=self.pruning, **overrides)
        t0 = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.start_s = time.perf_counter() - t0
        # What the engine runs: the paper's defaults, the checkpoint's, then this fleet's.
        settings = PruningSettings.from_vllm_config(self.engine.vllm_config)
        self.service = ActionService.from_engine_client(
            self.engine, pruning_defaults=asdict(settings)
        )
        self.dims = ModelDims.from_config(self.service.config)
        self.layers_after_k = max(0, self.dims.num_layers - settings.layer)
        self.metrics = ReplicaMetrics(replica=self.replica_id)
        try:
            self._metrics_server, port = start_metrics_server(
                self.metrics.registry, metrics_host, metrics_port
            )
        except OSError:  # a fixed port taken (two replicas on one node): any free port
            self._metrics_server, port = start_metrics_server(self.metrics.registry, metrics_host)
        import ray

        try:  # the raylet's address (ray.util's guess is the host's outward IP in a worker)
            node_ip = ray._private.worker.global_worker.node_ip_address
        except Exception:  # noqa: BLE001
            node_ip = ray.util.get_node_ip_address()
        shown = node_ip if metrics_host in ("0.0.0.0", "::", "") else metrics_host
        self.metrics_url = f"http://{shown}:{port}/metrics"
        self.report_interval_s = report_interval_s
        self.session_window_s = session_window_s
        self._sessions: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._poller: asyncio.Task | None = None
        self.last_report: dict[str, Any] = {}
        self.describe_dict = {
            "replica": self.replica_id,
            "actor_name": self.actor_name,
            "metrics_url": self.metrics_url,
            "node_ip": node_ip,
            "pid": os.getpid(),
            "engine_start_s": round(self.start_s, 2),
        }
        try:
            _kv()._internal_kv_put(
                _kv_key(self.app_name, self.replica_id),
                json.dumps(self.describe_dict).encode(),
                overwrite=True,
                namespace=KV_NAMESPACE,
            )
        except Exception:  # noqa: BLE001 - discovery is best effort, serving is not
            logger.warning("could not register replica %s in the KV", self.replica_id)
        logger.info("VLA engine replica %s ready in %.1f s", self.replica_id, self.start_s)

    # -- background worker report

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_reports())

    async def _poll_reports(self) -> None:
        while True:
            try:
                await self.refresh_report()
            except Exception:  # noqa: BLE001 - keep polling; the engine may be busy
                logger.debug("vla_pruner_report failed", exc_info=True)
            await asyncio.sleep(self.report_interval_s)

    async def refresh_report(self) -> dict[str, Any]:
        reports = await asyncio.wait_for(self.engine.collective_rpc("vla_pruner_report"), 10.0)
        report = dict(reports[0]) if reports else {}
        self.metrics.observe_worker_report(report)
        self.last_report = report
        return report

    # -- session bookkeeping

    def _track(self, sid: str, seq: int | None) -> bool:
        """Record the session's frame number; True when frames went elsewhere since the last
        one seen here (history is stale: restart it)."""
        now = time.monotonic()
        last = self._sessions.pop(sid, None)
        stale = last is not None and seq is not None and seq > last[0] + 1
        self._sessions[sid] = (seq if seq is not None else (last[0] + 1 if last else 0), now)
        while len(self._sessions) > MAX_TRACKED_SESSIONS:
            self._sessions.popitem(last=False)
        cutoff = now - self.session_window_s
        self.metrics.active_sessions.set(sum(1 for _, t in self._sessions.values() if t >= cutoff))
        return stale

    # -- Serve entry points

    async def predict(
        self, body: dict[str, Any], session_header: str | None = None, seq: int | None = None
    ) -> dict[str, Any]:
        """One action request; never raises: returns {status, body, replica}."""
        self._ensure_poller()
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        status, err_type = 200, None
        try:
            req = parse_action_request(body, **self.service.validation_context())
            sid = self.service.resolve_session(req, session_header)
            if sid is not None and self._track(sid, seq) and not req.new_episode:
                self.metrics.forced_resets.inc()
                req = req.model_copy(update={"new_episode": True})
            resp = await self.service.predict(req, session_header)
            p = resp.pruning
            self.metrics.observe_pruning(
                p.method,
                p.visual_tokens_total,
                p.visual_tokens_kept,
                p.warmup,
                self.dims,
                self.layers_after_k,
            )
            out = resp.model_dump(mode="json")
        except ApiError as err:
            status, err_type, out = err.status, err.type, err.to_dict()
        except Exception as exc:  # noqa: BLE001 - always answer in the error shape
            logger.exception("VLA replica %s: predict crashed", self.replica_id)
            err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="internal")
            status, err_type, out = 500, err.type, err.to_dict()
        finally:
            self.metrics.in_flight.dec()
        self.metrics.observe_request(status, time.perf_counter() - t0, err_type)
        return {"status": status, "body": out, "replica": self.replica_id}

    async def info(self) -> dict[str, Any]:
        self._ensure_poller()
        return {"info": self.service.info().model_dump(mode="json"), **self.describe_dict}

    async def describe(self) -> dict[str, Any]:
        self._ensure_poller()
        return {**self.describe_dict, "report": self.last_report}

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead engine makes the replica unhealthy (replaced)."""
        self._ensure_poller()
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine of replica {self.replica_id} is dead")

    def __del__(self) -> None:
        try:
            _kv()._internal_kv_del(_kv_key(self.app_name, self.replica_id), namespace=KV_NAMESPACE)
        except Exception:  # noqa: BLE001
            pass
        try:
            self._metrics_server.shutdown()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------- ingress

app = FastAPI(title="vla-pruner fleet", docs_url=None, redoc_url=None)


@dataclass
class _Session:
    seq: int = 0
    replica: str | None = None
    last_seen: float = 0.0
    requests: int = 0


def _error(err: ApiError, replica: str = "ingress", attempts: int = 0) -> JSONResponse:
    """Errors the ingress answers itself name it as the replica (no engine was involved)."""
    headers = {REPLICA_HEADER: replica}
    if attempts:
        headers[ATTEMPTS_HEADER] = str(attempts)
    return JSONResponse(status_code=err.status, content=err.to_dict(), headers=headers)


def _retryable(exc: BaseException) -> str | None:
    """Why a replica call may succeed elsewhere (the replica died / is unreachable)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, ActorDiedError):
        return "replica_died"
    if isinstance(exc, ActorUnavailableError):
        return "replica_unavailable"
    if isinstance(exc, RayActorError):
        return "replica_died"
    if isinstance(exc, BackPressureError):
        return "backpressure"
    if isinstance(exc, DeploymentUnavailableError):
        return "deployment_unavailable"
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RayActorError):
        return "replica_died"
    return None


async def _await(response: Any) -> Any:
    return await response


def live_replicas(app_name: str) -> list[dict[str, Any]]:
    """Replicas registered in Ray's KV whose actor is still alive (killed ones drop out)."""
    import ray

    kv = _kv()
    out = []
    for key in kv._internal_kv_list(f"{app_name}/".encode(), namespace=KV_NAMESPACE):
        raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if not raw:
            continue
        entry = json.loads(raw)
        try:
            ray.get_actor(entry["actor_name"], namespace=SERVE_NAMESPACE)
        except ValueError:
            kv._internal_kv_del(key, namespace=KV_NAMESPACE)
            continue
        out.append(entry)
    return sorted(out, key=lambda e: e["replica"])


# Helpers above the class: @serve.ingress snapshots the globals the routes use.
@serve.ingress(app)
class FleetIngress:
    """HTTP front of the fleet; see the module docstring for the routes."""

    def __init__(self, engine: Any, settings: dict[str, Any] | None = None) -> None:
        from vllm_vla_pruner.api.service import ServiceLimits, available_pruners

        s = dict(settings or {})
        self.engine = engine
        self.app_name = serve.get_replica_context().app_name
        self.timeout_s = float(s.get("request_timeout_s", 60.0))
        self.max_attempts = int(s.get("max_attempts", 3))
        self.session_window_s = float(s.get("session_window_s", 60.0))
        self.limits = ServiceLimits()
        self.pruners = available_pruners() or None
        self.metrics = IngressMetrics()
        self.sessions: OrderedDict[str, _Session] = OrderedDict()

    # -- helpers

    def _session(self, sid: str) -> _Session:
        st = self.sessions.pop(sid, None) or _Session()
        self.sessions[sid] = st
        while len(self.sessions) > MAX_TRACKED_SESSIONS:
            self.sessions.popitem(last=False)
        return st

    def _active_sessions(self) -> int:
        cutoff = time.monotonic() - self.session_window_s
        return sum(1 for s in self.sessions.values() if s.last_seen >= cutoff)

    def _parse(self, body: bytes, header: str | None) -> tuple[dict[str, Any], str | None]:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", field=None) from None
        req = parse_action_request(data, pruners=self.pruners)
        sid = req.session_id
        if sid is None and header is not None:
            try:
                sid = check_session_id(header.strip())
            except ValueError as exc:
                raise ApiError(
                    422, f"{SESSION_ID_HEADER} header: {exc}", field="session_id"
                ) from None
        return data, sid

    async def _call_replica(
        self, data: dict[str, Any], header: str | None, sid: str | None, seq: int | None
    ) -> tuple[dict[str, Any] | None, ApiError | None, int]:
        """Send to the session's replica; retry on the next one if it died. Bounded."""
        deadline = time.monotonic() + self.timeout_s
        last: str = ""
        for attempt in range(1, self.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            handle = self.engine.options(session_id=sid) if sid else self.engine
            response = handle.predict.remote(data, header, seq)
            try:
                return await asyncio.wait_for(_await(response), remaining), None, attempt
            except asyncio.TimeoutError:
                response.cancel()
                return (
                    None,
                    ApiError(
                        504,
                        f"no replica answered within {self.timeout_s:g} s "
                        f"(attempt {attempt}); request cancelled",
                        type="timeout",
                    ),
                    attempt,
                )
            except Exception as exc:  # noqa: BLE001 - classified below
                reason = _retryable(exc)
                if reason is None:
                    logger.exception("fleet ingress: replica call failed")
                    err = ApiError(
                        500, f"replica call failed: {type(exc).__name__}", type="internal"
                    )
                    return None, err, attempt
                self.metrics.retries.labels(reason).inc()
                last = f"{reason}: {type(exc).__name__}"
                logger.warning("fleet ingress: attempt %d for session %s: %s", attempt, sid, last)
                await asyncio.sleep(min(0.1 * 2**attempt, max(0.0, deadline - time.monotonic())))
        err = ApiError(
            503,
            f"no replica could serve the request after {self.max_attempts} attempt(s) "
            f"({last or 'time bound reached'}); retry later",
            type="replica_unavailable",
        )
        return None, err, self.max_attempts

    # -- routes

    @app.post("/v1/actions")
    async def actions(self, request: Request) -> Response:
        from vllm_vla_pruner.api.endpoint import read_body_limited

        t0 = time.perf_counter()
        route = "/v1/actions"
        self.metrics.in_flight.inc()
        try:
            header = request.headers.get(SESSION_ID_HEADER)
            try:
                body = await read_body_limited(request, self.limits.max_body_bytes)
                data, sid = self._parse(body, header)
            except ApiError as err:
                self.metrics.observe(route, err.status, time.perf_counter() - t0, err.type)
                return _error(err)
            seq = None
            st = None
            if sid is not None:
                st = self._session(sid)
                st.seq += 1
                seq = st.seq
                st.last_seen = time.monotonic()
            result, err, attempts = await self._call_replica(data, header, sid, seq)
            if err is not None:
                self.metrics.observe(route, err.status, time.perf_counter() - t0, err.type)
                return _error(err, attempts=attempts)
            status = int(result["status"])
            replica = str(result.get("replica") or "")
            body_out = result["body"]
            if status < 400:
                self.metrics.replica_requests.labels(replica).inc()
                if st is not None:
                    if st.replica is not None and st.replica != replica:
                        self.metrics.reroutes.inc()
                    st.replica = replica
                    st.requests += 1
            err_type = None
            if status >= 400 and isinstance(body_out, dict):
                err_type = (body_out.get("error") or {}).get("type")
            self.metrics.observe(route, status, time.perf_counter() - t0, err_type)
            return JSONResponse(
                status_code=status,
                content=body_out,
                headers={REPLICA_HEADER: replica, ATTEMPTS_HEADER: str(attempts)},
            )
        finally:
            self.metrics.in_flight.dec()
            self.metrics.active_sessions.set(self._active_sessions())

    @app.get("/health")
    async def health(self) -> Response:
        self.metrics.requests.labels("/health", "200").inc()
        return JSONResponse({"status": "ok", "app": self.app_name})

    @app.get("/v1/actions/info")
    async def info(self) -> Response:
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(_await(self.engine.info.remote()), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - timeout or no replica
            err = ApiError(503, f"no replica answered: {type(exc).__name__}", type="unavailable")
            self.metrics.observe("/v1/actions/info", 503, time.perf_counter() - t0, err.type)
            return _error(err)
        self.metrics.observe("/v1/actions/info", 200, time.perf_counter() - t0)
        return JSONResponse(out["info"], headers={REPLICA_HEADER: out["replica"]})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        self.metrics.active_sessions.set(self._active_sessions())
        return Response(render(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/fleet/replicas")
    async def replicas(self) -> Response:
        return JSONResponse({"replicas": await asyncio.to_thread(live_replicas, self.app_name)})

    @app.get("/v1/fleet/metrics_targets")
    async def metrics_targets(self) -> Response:
        """Prometheus HTTP service discovery: the ingress and every live replica."""
        reps = await asyncio.to_thread(live_replicas, self.app_name)
        targets = []
        for r in reps:
            hostport = r["metrics_url"].split("://", 1)[1].split("/", 1)[0]
            labels = {"job": "vla-replica", "replica": r["replica"], "app": self.app_name}
            targets.append({"targets": [hostport], "labels": labels})
        return JSONResponse(targets)

    @app.get("/v1/fleet/sessions")
    async def session_map(self) -> Response:
        now = time.monotonic()
        return JSONResponse(
            {
                sid: {
                    "replica": s.replica,
                    "requests": s.requests,
                    "idle_s": round(now - s.last_seen, 3),
                }
                for sid, s in self.sessions.items()
            }
        )


# ----------------------------------------------------------------------------- build


def build_app(cfg: Any, model_dir: str | Path | None = None) -> Any:
    """FleetConfig -> a bound Serve application (ingress over the engine deployment)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from vllm_vla_pruner.serve.routing import ROUTER_CLASS

    model_dir = str(model_dir or cfg.model.checkpoint_dir())
    rep = cfg.replica
    actor_options: dict[str, Any] = {
        "num_cpus": rep.num_cpus,
        "runtime_env": {"env_vars": replica_env(rep.env)},
    }
    if rep.num_gpus:
        actor_options["num_gpus"] = rep.num_gpus
    if rep.memory_gb:
        actor_options["memory"] = int(rep.memory_gb * (1 << 30))
    scale: dict[str, Any]
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        scale = {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=a.min_replicas,
                max_replicas=a.max_replicas,
                initial_replicas=a.initial_replicas,
                target_ongoing_requests=a.target_ongoing_requests,
                upscale_delay_s=a.upscale_delay_s,
                downscale_delay_s=a.downscale_delay_s,
            )
        }
    else:
        scale = {"num_replicas": cfg.replica_count()}
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options=actor_options,
        max_ongoing_requests=rep.max_ongoing_requests,
        health_check_period_s=rep.health_check_period_s,
        health_check_timeout_s=rep.health_check_timeout_s,
        graceful_shutdown_timeout_s=rep.graceful_shutdown_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={
                "num_virtual_nodes": cfg.routing.num_virtual_nodes,
                "num_fallback_replicas": cfg.routing.num_fallback_replicas,
            },
        ),
        **scale,
    )
    ingress = serve.deployment(
        FleetIngress,
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
    )
    engine_app = engine.bind(
        model_dir,
        dict(rep.engine),
        dict(cfg.pruning),
        cfg.model.served_model_name,
        cfg.metrics.replica_host,
        cfg.metrics.replica_port,
        cfg.metrics.report_interval_s,
        cfg.ingress.session_window_s,
        dict(rep.env),
    )
    return ingress.bind(
        engine_app,
        {
            "request_timeout_s": cfg.ingress.request_timeout_s,
            "max_attempts": cfg.ingress.max_attempts,
            "session_window_s": cfg.ingress.session_window_s,
        },
    )
