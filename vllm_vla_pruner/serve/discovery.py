"""Where the replicas' metrics are served and how the ingress finds them.

A non-ingress Serve deployment has no HTTP route, so each engine replica serves its
Prometheus metrics on a port of its own (loopback unless ``metrics.replica_host`` says
otherwise) and registers its description, ``metrics_url`` included, in Ray's internal KV.
The ingress lists the entries whose actor is still alive (``GET /v1/fleet/replicas``) and
offers them to Prometheus as HTTP service discovery (``GET /v1/fleet/metrics_targets``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from vllm_vla_pruner.metrics import start_metrics_server

__all__ = [
    "KV_NAMESPACE",
    "SERVE_NAMESPACE",
    "live_replicas",
    "metrics_targets",
    "register_replica",
    "serve_replica_metrics",
    "unregister_replica",
]

logger = logging.getLogger("ray.serve")

KV_NAMESPACE = "vla_fleet"
#: Ray namespace of Serve's replica actors (their names resolve there).
SERVE_NAMESPACE = "serve"


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def _key(app: str, replica: str) -> bytes:
    return f"{app}/{replica}".encode()


def node_ip() -> str:
    """The raylet's address (ray.util's guess is the host's outward IP in a worker)."""
    import ray

    try:
        return ray._private.worker.global_worker.node_ip_address
    except Exception:  # noqa: BLE001
        return ray.util.get_node_ip_address()


def serve_replica_metrics(registry: Any, host: str, port: int) -> tuple[Any, str]:
    """Start the replica's metrics server; returns (server, the URL Prometheus scrapes)."""
    try:
        server, bound = start_metrics_server(registry, host, port)
    except OSError:  # a fixed port taken (two replicas on one node): any free port
        server, bound = start_metrics_server(registry, host)
    shown = node_ip() if host in ("0.0.0.0", "::", "") else host
    return server, f"http://{shown}:{bound}/metrics"


def register_replica(app: str, replica: str, entry: dict[str, Any]) -> None:
    """Publish a replica's description; discovery is best effort, serving is not."""
    try:
        _kv()._internal_kv_put(
            _key(app, replica), json.dumps(entry).encode(), overwrite=True, namespace=KV_NAMESPACE
        )
    except Exception:  # noqa: BLE001
        logger.warning("could not register replica %s in the KV", replica)


def unregister_replica(app: str, replica: str) -> None:
    try:
        _kv()._internal_kv_del(_key(app, replica), namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - Ray may be going down already
        pass


def live_replicas(app: str) -> list[dict[str, Any]]:
    """Registered replicas whose actor is still alive (killed ones drop out)."""
    import ray

    kv = _kv()
    out = []
    for key in kv._internal_kv_list(f"{app}/".encode(), namespace=KV_NAMESPACE):
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


def metrics_targets(app: str, replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prometheus HTTP service discovery entries, one per replica."""
    targets = []
    for r in replicas:
        hostport = r["metrics_url"].split("://", 1)[1].split("/", 1)[0]
        labels = {"job": "vla-replica", "replica": r["replica"], "app": app}
        targets.append({"targets": [hostport], "labels": labels})
    return targets
