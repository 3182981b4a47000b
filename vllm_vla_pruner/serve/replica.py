"""``VLAEngine``: one vLLM engine with the plugin, one of the fleet's R replicas.

Each replica owns an ``AsyncLLM`` and an ``ActionService``, answers the ingress's
``predict`` calls (never raising: errors come back in the API's shape), restarts a robot's
history when its frames went elsewhere meanwhile (``serve.sessions.FrameGaps``), pulls the
worker's pruning counters for its metrics, and fails Serve's health check when its engine
died (Serve then replaces it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from ray import serve

from vllm_vla_pruner.api.protocol import ApiError
from vllm_vla_pruner.metrics import ModelDims, ReplicaMetrics
from vllm_vla_pruner.serve import discovery
from vllm_vla_pruner.serve.sessions import FrameGaps

__all__ = ["EngineReplica", "replica_env"]

logger = logging.getLogger("ray.serve")


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
        self._metrics_server, self.metrics_url = discovery.serve_replica_metrics(
            self.metrics.registry, metrics_host, metrics_port
        )
        self.report_interval_s = report_interval_s
        self.frames = FrameGaps(session_window_s)
        self._poller: asyncio.Task | None = None
        self.last_report: dict[str, Any] = {}
        self.describe_dict = {
            "replica": self.replica_id,
            "actor_name": self.actor_name,
            "metrics_url": self.metrics_url,
            "node_ip": discovery.node_ip(),
            "pid": os.getpid(),
            "engine_start_s": round(self.start_s, 2),
        }
        discovery.register_replica(self.app_name, self.replica_id, self.describe_dict)
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
            req = self.service.request_context().parse(body)
            sid = self.service.resolve_session(req, session_header)
            if sid is not None:
                stale = self.frames.stale(sid, seq)
                self.metrics.active_sessions.set(self.frames.active())
                if stale and not req.new_episode:
                    self.metrics.forced_resets.inc()
                    req = req.model_copy(update={"new_episode": True})
            resp = await self.service.predict(req, session_header)
            self.metrics.observe_report(resp.pruning, self.dims, self.layers_after_k)
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
        """``/v1/actions/info``'s body, who answered, and ``validation``: the typed
        ``RequestContext`` of this model, so that the ingress validates bodies exactly
        as this replica (and the single-server endpoint) does."""
        self._ensure_poller()
        return {
            "info": self.service.info().model_dump(mode="json"),
            "validation": self.service.request_context(),
            **self.describe_dict,
        }

    async def describe(self) -> dict[str, Any]:
        self._ensure_poller()
        return {**self.describe_dict, "report": self.last_report}

    async def check_health(self) -> None:
        """Serve's periodic probe: a dead engine makes the replica unhealthy (replaced)."""
        self._ensure_poller()
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine of replica {self.replica_id} is dead")

    def __del__(self) -> None:
        steps = (
            lambda: discovery.unregister_replica(self.app_name, self.replica_id),
            lambda: self._metrics_server.shutdown(),
            lambda: self.engine.shutdown(),
        )
        for step in steps:  # each may be missing when the constructor failed half-way
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
