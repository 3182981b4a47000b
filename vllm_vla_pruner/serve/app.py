"""The fleet as a Ray Serve application: R engine replicas behind one HTTP ingress.

``build_app(config)`` is the entry: it turns a ``FleetConfig`` into the two deployments,

- ``VLAEngine`` (``serve.replica.EngineReplica``, R replicas or autoscaled), routed to by
  session (``serve.routing``), each serving its metrics on its own port
  (``serve.discovery``);
- ``VLAIngress`` (``serve.ingress.FleetIngress``, one replica: it numbers each session's
  frames, ``serve.sessions``), guarded by the API key when one is set (``serve.auth``).

Temporal history: pruning state for a robot lives in the engine that served its last
frames; a replica that sees a gap in a session's frame numbers restarts its history as a new
episode, so stale history is never mixed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve

from vllm_vla_pruner.serve.auth import key_digest, resolve_api_key
from vllm_vla_pruner.serve.config import FleetConfig
from vllm_vla_pruner.serve.ingress import FleetIngress
from vllm_vla_pruner.serve.replica import EngineReplica, replica_env

__all__ = ["ENGINE_DEPLOYMENT", "INGRESS_DEPLOYMENT", "build_app"]

ENGINE_DEPLOYMENT = "VLAEngine"
INGRESS_DEPLOYMENT = "VLAIngress"


def _scale(cfg: FleetConfig) -> dict[str, Any]:
    """Fixed replica count, or Serve's autoscaler."""
    from ray.serve.config import AutoscalingConfig

    if cfg.autoscaling is None:
        return {"num_replicas": cfg.replica_count()}
    a = cfg.autoscaling
    return {
        "autoscaling_config": AutoscalingConfig(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            initial_replicas=a.initial_replicas,
            target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
        )
    }


def build_app(
    cfg: FleetConfig,
    model_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """FleetConfig -> a bound Serve application (ingress over the engine deployment).

    ``environ`` (default ``os.environ``) holds the API key; a fleet that may not run without
    one raises ``FleetConfigError`` here, before anything is deployed.
    """
    from ray.serve.config import RequestRouterConfig

    from vllm_vla_pruner.serve.routing import ROUTER_CLASS

    key = resolve_api_key(cfg, environ)
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
        **_scale(cfg),
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
            "api_key_sha256": key_digest(key) if key else None,
        },
    )
