"""Prometheus metrics for the action API: the HTTP front (ingress) and the engine replicas.

Plain ``prometheus_client``, no Ray import, so the single-server endpoint can reuse it. Each
metric set lives in its own ``CollectorRegistry`` (several sets can coexist in one process,
e.g. in tests); :func:`start_metrics_server` serves a registry on its own HTTP port, and
:func:`render` turns one into a ``/metrics`` response body for a route of an existing app.

Counters that only the vLLM worker knows (scoring/selection time, warm-up frames, ...) come
from its cumulative ``vla_pruner_report``; :meth:`ReplicaMetrics.observe_worker_report` turns
successive snapshots into counter increments (a drop means the worker restarted: the new
value is taken as the increment).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "IngressMetrics",
    "LATENCY_BUCKETS_S",
    "ModelDims",
    "ReplicaMetrics",
    "flops_saved",
    "layer_flops",
    "prefill_flops",
    "render",
    "start_metrics_server",
    "flow_chunk_flops",
    "vit_flops",
]

#: Robot control loops run at 1-50 Hz: resolve 5 ms .. 10 s.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class ModelDims:
    """The decoder shapes the FLOPs estimate needs (Llama-style)."""

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    head_dim: int | None = None  # None: hidden // num_heads

    @classmethod
    def from_config(cls, cfg: Any) -> ModelDims:
        """From an OpenVLA config (dict or HF object); the LLM part is ``text_config``."""

        def get(obj: Any, key: str, default: Any = None) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(key, default)
            return getattr(obj, key, default)

        text = get(cfg, "text_config") or cfg
        hidden = int(get(text, "hidden_size"))
        heads = int(get(text, "num_attention_heads"))
        head_dim = get(text, "head_dim")
        return cls(
            hidden=hidden,
            intermediate=int(get(text, "intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(get(text, "num_key_value_heads") or heads),
            num_layers=int(get(text, "num_hidden_layers")),
            head_dim=int(head_dim) if head_dim else None,
        )


def _widths(dims: ModelDims) -> tuple[int, int, float]:
    """(query width, kv width, matmul FLOPs per token of one layer's projections and MLP)."""
    h = dims.hidden
    d = dims.head_dim or h // dims.num_heads
    q_width, kv_width = dims.num_heads * d, dims.num_kv_heads * d
    return q_width, kv_width, 2 * (2 * h * q_width + 2 * h * kv_width + 3 * h * dims.intermediate)


def layer_flops(dims: ModelDims, tokens: int, bidirectional: bool = False) -> float:
    """FLOPs of one decoder layer over a ``tokens``-row prefill (2 per multiply-add).

    Per token: q/o projections ``2*2*h*Hq*D``, k/v ``2*2*h*Hkv*D``, gated MLP (SwiGLU,
    GeGLU) ``2*3*h*I``; attention: QK^T and AV, ``2*2*Hq*D`` per (query, visible key) pair:
    ``n(n+1)/2`` pairs causal, ``n^2`` for a bidirectional block (pi0's prefix).
    """
    n = int(tokens)
    q_width, _, per_token = _widths(dims)
    pairs = n * n if bidirectional else n * (n + 1) / 2
    return float(n * per_token + 2 * 2 * q_width * pairs)


def prefill_flops(
    dims: ModelDims, tokens: int, kept_tokens: int, layer_k: int, bidirectional: bool = False
) -> float:
    """Decoder FLOPs of one prefill: layers < K see ``tokens`` rows, layers >= K
    ``kept_tokens`` (``tokens`` minus the pruned visual tokens)."""
    return layer_k * layer_flops(dims, tokens, bidirectional) + (
        dims.num_layers - layer_k
    ) * layer_flops(dims, kept_tokens, bidirectional)


def vit_flops(width: int, mlp: int, depth: int, tokens: int) -> float:
    """One ViT tower over ``tokens`` patches: 4 d x d projections, a 2-layer MLP, full
    attention (never pruned: the visual tokens are made before the LM)."""
    n = int(tokens)
    per_token = 2 * (4 * width * width + 2 * width * mlp)
    return float(depth * (n * per_token + 2 * 2 * width * n * n))


def flow_chunk_flops(
    lm: ModelDims,
    expert: ModelDims,
    tokens: int,
    kept_tokens: int,
    layer_k: int,
    suffix: int,
    steps: int,
    vision: float = 0.0,
    heads_per_step: float = 0.0,
) -> dict[str, float]:
    """A pi0-style chunk: the bidirectional prefix prefill (:func:`prefill_flops`), then
    ``steps`` expert passes over ``suffix`` rows that attend to the prefix keys of each layer
    (all ``tokens`` before layer K, ``kept_tokens`` from K on) and to the suffix;
    ``vision``: the towers' FLOPs, ``heads_per_step``: the action/time projections'.
    Returns the parts and their ``total``."""
    prefix = prefill_flops(lm, tokens, kept_tokens, layer_k, bidirectional=True)
    q_width, _, per_token = _widths(expert)
    keys = layer_k * tokens + (expert.num_layers - layer_k) * kept_tokens
    per_step = (
        expert.num_layers * (suffix * per_token + 2 * 2 * q_width * suffix * suffix)
        + 2 * 2 * q_width * suffix * keys
        + heads_per_step
    )
    denoise = float(steps * per_step)
    return {
        "vision": float(vision),
        "prefix": prefix,
        "denoise": denoise,
        "total": float(vision) + prefix + denoise,
    }


def flops_saved(
    num_visual: int,
    num_keep: int,
    dims: ModelDims,
    layers_after_k: int,
    seq_len: int | None = None,
) -> float:
    """Estimated prefill FLOPs not spent because ``num_visual - num_keep`` tokens skip the
    last ``layers_after_k`` decoder layers (:func:`layer_flops`: the attention term of the
    tokens that stay shrinks too). ``seq_len`` defaults to the visual tokens plus BOS."""
    pruned = max(0, int(num_visual) - int(num_keep))
    if pruned == 0 or layers_after_k <= 0:
        return 0.0
    total = int(seq_len) if seq_len else int(num_visual) + 1
    return layers_after_k * (layer_flops(dims, total) - layer_flops(dims, total - pruned))


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (body of a ``/metrics`` response)."""
    return generate_latest(registry)


def start_metrics_server(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
    """Serve ``registry`` on ``host:port`` (0: a free port) from a daemon thread.

    Returns ``(server, port)``; ``server.shutdown()`` stops it. The replicas use this because
    a Ray Serve deployment that is not the ingress has no HTTP route of its own.
    """
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)


class IngressMetrics:
    """HTTP-side view: requests, errors, end-to-end latency, retries and re-routes."""

    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = "vla") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{prefix}_ingress_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.errors = Counter(
            f"{prefix}_ingress_errors",
            "Failed HTTP requests (status >= 400) by route, status and error type.",
            ["route", "status", "type"],
            registry=r,
        )
        self.latency = Histogram(
            f"{prefix}_ingress_request_latency_seconds",
            "End-to-end request latency at the ingress, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{prefix}_ingress_requests_in_flight", "Requests being handled.", registry=r
        )
        self.retries = Counter(
            f"{prefix}_ingress_retries",
            "Replica calls retried after a replica died or was unreachable.",
            ["reason"],
            registry=r,
        )
        self.reroutes = Counter(
            f"{prefix}_ingress_session_reroutes",
            "Requests of a session served by a different replica than its previous one.",
            registry=r,
        )
        self.active_sessions = Gauge(
            f"{prefix}_ingress_active_sessions",
            "Robot sessions seen within the activity window.",
            registry=r,
        )
        self.replica_requests = Counter(
            f"{prefix}_ingress_replica_requests",
            "Successful action requests by serving replica.",
            ["replica"],
            registry=r,
        )

    def observe(self, route: str, status: int, seconds: float, err_type: str | None = None):
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(max(0.0, seconds))
        if status >= 400:
            self.errors.labels(route, str(status), err_type or "error").inc()


class ReplicaMetrics:
    """Engine-replica view: action requests, engine latency, pruning effect, worker counters."""

    _WORKER_COUNTERS = {
        "steps_pruned": "Engine steps that pruned at least one request.",
        "requests_pruned": "Requests whose visual tokens were pruned (worker count).",
        "warmup_frames": "Frames run unpruned to fill a session's temporal history.",
        "history_missing": "Pruned frames whose expected action history was gone (worker).",
        "recomputed": "Re-prefills after preemption; their action attention is not recorded.",
        "visual_tokens_total": "Visual tokens entering pruned requests (worker count).",
        "visual_tokens_kept": "Visual tokens kept for layers >= K (worker count).",
        "select_seconds": "Time spent scoring and selecting visual tokens in the worker.",
    }

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        prefix: str = "vla",
        replica: str = "",
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.replica = replica
        self.requests = Counter(
            f"{prefix}_replica_requests",
            "Action requests handled by this replica, by status code.",
            ["status"],
            registry=r,
        )
        self.errors = Counter(
            f"{prefix}_replica_errors",
            "Failed action requests by status and error type.",
            ["status", "type"],
            registry=r,
        )
        self.latency = Histogram(
            f"{prefix}_replica_request_latency_seconds",
            "Time inside the replica (decode image, engine, un-normalise).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{prefix}_replica_requests_in_flight", "Requests in this replica.", registry=r
        )
        self.visual_total = Counter(
            f"{prefix}_visual_tokens_total",
            "Visual tokens of served requests.",
            ["method"],
            registry=r,
        )
        self.visual_kept = Counter(
            f"{prefix}_visual_tokens_kept",
            "Visual tokens kept after layer K for served requests.",
            ["method"],
            registry=r,
        )
        self.flops_saved = Counter(
            f"{prefix}_flops_saved",
            "Estimated decoder FLOPs saved by pruning (see metrics.flops_saved).",
            registry=r,
        )
        self.warmup = Counter(
            f"{prefix}_warmup_frames",
            "Served frames that ran unpruned to warm up a session's temporal history.",
            registry=r,
        )
        self.pruned = Counter(
            f"{prefix}_pruned_requests", "Served requests that were pruned.", registry=r
        )
        self.history_evicted = Counter(
            f"{prefix}_history_evicted_frames",
            "Pruned frames whose robot's action history should have been warm but was gone "
            "(session limit, idle timeout, worker restart): pruned by the semantic half alone.",
            registry=r,
        )
        self.forced_resets = Counter(
            f"{prefix}_session_history_resets",
            "Sessions whose temporal history was restarted because frames went elsewhere.",
            registry=r,
        )
        self.active_sessions = Gauge(
            f"{prefix}_replica_active_sessions",
            "Robot sessions this replica served within the activity window.",
            registry=r,
        )
        self.worker_sessions = Gauge(
            f"{prefix}_worker_sessions", "Sessions with temporal history in the worker.", registry=r
        )
        self.worker = {
            k: Counter(f"{prefix}_worker_{k}", doc, registry=r)
            for k, doc in self._WORKER_COUNTERS.items()
        }
        self.info = Gauge(
            f"{prefix}_replica_info", "Constant 1, labelled with the replica id.", ["replica"],
            registry=r,
        )  # fmt: skip
        self.info.labels(replica or "unknown").set(1)
        self._last_worker: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe_request(self, status: int, seconds: float, err_type: str | None = None) -> None:
        self.requests.labels(str(status)).inc()
        self.latency.observe(max(0.0, seconds))
        if status >= 400:
            self.errors.labels(str(status), err_type or "error").inc()

    def observe_pruning(
        self,
        method: str | None,
        num_visual: int | None,
        num_keep: int | None,
        warmup: bool | None,
        dims: ModelDims | None,
        layers_after_k: int | None,
        seq_len: int | None = None,
        history_evicted: bool | None = None,
    ) -> float:
        """Count one served frame's pruning (the worker-reported counts of the response);
        returns the FLOPs it saved (estimate)."""
        label = method or "default"
        if history_evicted:
            self.history_evicted.inc()
        if num_visual:
            self.visual_total.labels(label).inc(num_visual)
            self.visual_kept.labels(label).inc(num_visual if num_keep is None else num_keep)
        if warmup:
            self.warmup.inc()
        saved = 0.0
        if num_visual and num_keep is not None and num_keep < num_visual:
            self.pruned.inc()
            if dims is not None and layers_after_k:
                saved = flops_saved(num_visual, num_keep, dims, layers_after_k, seq_len)
                self.flops_saved.inc(saved)
        return saved

    def observe_report(
        self, pruning: Any, dims: ModelDims | None = None, layers_after_k: int | None = None
    ) -> float:
        """One response's ``PruningReport`` (counts the worker's forward reported)."""
        return self.observe_pruning(
            pruning.method,
            pruning.visual_tokens_total,
            pruning.visual_tokens_kept,
            pruning.warmup,
            dims,
            layers_after_k,
            history_evicted=pruning.history_evicted,
        )

    def observe_worker_report(self, report: Mapping[str, Any]) -> None:
        """One ``vla_pruner_report`` snapshot (cumulative) -> counter increments."""
        stats = report.get("stats") or {}
        with self._lock:
            for key, counter in self.worker.items():
                value = stats.get(key)
                if not isinstance(value, (int, float)):
                    continue
                prev = self._last_worker.get(key, 0.0)
                delta = value - prev if value >= prev else value  # worker restarted
                if delta > 0:
                    counter.inc(delta)
                self._last_worker[key] = float(value)
        sessions = report.get("sessions")
        if isinstance(sessions, (int, float)):
            self.worker_sessions.set(sessions)
