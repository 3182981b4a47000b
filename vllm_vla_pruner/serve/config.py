"""Fleet configuration: one YAML/JSON file says what to serve, on how many replicas, how.

The same file runs on a laptop (local Ray, loopback) and on a multi-node cluster (set
``ray.address: auto`` after ``ray start``). Validation is strict (unknown keys are errors)
because a typo in ``num_cpus`` or ``keep_ratio`` would otherwise silently fall back to a
default and the fleet would be sized or pruned differently than the operator thinks.

Example (YAML)::

    model: {preset: tiny}            # or {path: /ckpt/openvla-7b}
    replicas: 2                      # or an `autoscaling:` block
    replica: {num_cpus: 1, max_ongoing_requests: 16}
    routing: {num_virtual_nodes: 100, num_fallback_replicas: 1}
    pruning: {method: none, keep_ratio: 0.25}
    http: {host: 127.0.0.1, port: 8000}
    auth: {api_key_env: VLA_FLEET_API_KEY}   # the key itself: in that environment variable
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "AuthSettings",
    "AutoscalingSettings",
    "FleetConfig",
    "FleetConfigError",
    "load_config",
    "parse_config",
]

PRESETS = ("tiny", "bench")
#: Where ``fleet up`` looks for the ingress's API key unless ``auth.api_key_env`` says otherwise.
DEFAULT_API_KEY_ENV = "VLA_FLEET_API_KEY"


class FleetConfigError(ValueError):
    """A config file that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """Exactly one of ``path`` (a checkpoint directory) or ``preset`` (built on first use)."""

    path: str | None = None
    preset: Literal["tiny", "bench"] | None = None
    seed: int = 0
    #: Where presets are built; default ~/.cache/vla-pruner/checkpoints/<preset>-seed<seed>.
    cache_dir: str | None = None
    served_model_name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of model.path or model.preset")
        return self

    def checkpoint_dir(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        root = Path(self.cache_dir or Path.home() / ".cache" / "vla-pruner" / "checkpoints")
        return root.expanduser() / f"{self.preset}-seed{self.seed}"


class ReplicaSettings(_Strict):
    """Per engine replica: Ray resources and the overload threshold."""

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0)
    #: Requests a replica takes at once; beyond it the router tries the fallback replica.
    max_ongoing_requests: int = Field(default=16, ge=1)
    #: Seconds between Serve's health checks (a dead engine is replaced after this).
    health_check_period_s: float = Field(default=2.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=5.0, ge=0)
    #: Extra vLLM engine arguments (AsyncEngineArgs names), e.g. {max_num_seqs: 8}.
    engine: dict[str, Any] = Field(default_factory=dict)
    #: Extra environment variables of the replica processes.
    env: dict[str, str] = Field(default_factory=dict)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling (replaces ``replicas``)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=4.0, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError("autoscaling.initial_replicas must be in [min, max]")
        return self


class RoutingSettings(_Strict):
    """Consistent-hash routing on the robot session id."""

    num_virtual_nodes: int = Field(default=100, ge=1)
    #: Successor replicas tried when the primary is full or gone (0: strict affinity).
    num_fallback_replicas: int = Field(default=1, ge=0)


class IngressSettings(_Strict):
    num_cpus: float = Field(default=0.1, ge=0)
    #: Bound on one action request end to end, retries included.
    request_timeout_s: float = Field(default=60.0, gt=0)
    #: Replica calls per request when a replica dies or is unreachable (1: no retry).
    max_attempts: int = Field(default=3, ge=1, le=10)
    #: Sessions idle longer than this no longer count as active.
    session_window_s: float = Field(default=60.0, gt=0)


class HttpSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    route_prefix: str = "/"

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


class MetricsSettings(_Strict):
    #: Each replica serves /metrics on its own port: bind address. Loopback unless set
    #: (0.0.0.0 on a cluster so that Prometheus on another machine can scrape it).
    replica_host: str = "127.0.0.1"
    #: 0: a free port per replica (the ingress lists them at GET /v1/fleet/replicas).
    replica_port: int = Field(default=0, ge=0, le=65535)
    #: How often a replica pulls the worker's pruning counters.
    report_interval_s: float = Field(default=2.0, gt=0)


class AuthSettings(_Strict):
    """The ingress's API key, with vLLM's ``--api-key`` semantics (``Authorization: Bearer``).

    The key is read from the environment of the process that deploys the fleet, never from
    this file (configs get committed); whether a fleet may run without one is decided in
    ``serve.auth.resolve_api_key``.
    """

    #: Environment variable holding the key; set and non-empty: every route but /health and
    #: /metrics needs it.
    api_key_env: str = DEFAULT_API_KEY_ENV
    #: Serve a non-loopback ``http.host`` without a key (something else guards the port).
    allow_unauthenticated: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key: do not put the key in the config; export it in the variable named "
                f"by auth.api_key_env (default {DEFAULT_API_KEY_ENV})"
            )
        return data

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be an environment variable name (letters, digits, '_')")
        return v


class RaySettings(_Strict):
    #: None: start a local Ray (loopback only); "auto" or "ip:port": join a cluster.
    address: str | None = None
    #: Logical CPUs of the local Ray (None: enough for the configured replicas).
    num_cpus: float | None = Field(default=None, gt=0)
    namespace: str = "vla-fleet"


class FleetConfig(_Strict):
    name: str = Field(default="vla-fleet", min_length=1, max_length=64)
    model: ModelSettings
    replicas: int | None = Field(default=None, ge=1)
    autoscaling: AutoscalingSettings | None = None
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    #: Engine-wide pruning defaults (vla_pruner settings: method, keep_ratio, layer, ...).
    pruning: dict[str, Any] = Field(default_factory=dict)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_" for c in v):
            raise ValueError("use letters, digits, '-' and '_' only")
        return v

    @field_validator("pruning")
    @classmethod
    def _pruning(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Checked against the engine's own settings so a typo fails here, not in a replica."""
        from dataclasses import fields, replace

        from vllm_vla_pruner.engine.settings import (
            PruningSettings,
            validate_keep_ratio,
            validate_method,
        )

        known = {f.name for f in fields(PruningSettings)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid: {sorted(known)}")
        if "method" in v:
            validate_method(v["method"], "method")
        if "keep_ratio" in v:
            validate_keep_ratio(v["keep_ratio"], "keep_ratio")
        try:
            replace(PruningSettings(), **v)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return dict(v)

    @model_validator(mode="after")
    def _scale(self) -> FleetConfig:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give either replicas or autoscaling, not both")
        if self.replicas is None and self.autoscaling is None:
            self.replicas = 1
        return self

    # -- derived

    def replica_count(self) -> int:
        """Replicas at start (autoscaling: initial or min, at least 1)."""
        if self.autoscaling is None:
            return int(self.replicas or 1)
        a = self.autoscaling
        return max(1, a.initial_replicas if a.initial_replicas is not None else a.min_replicas)

    def max_replica_count(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else int(self.replicas or 1)

    def local_num_cpus(self) -> float:
        """Logical CPUs a local Ray needs: every replica at max scale plus the ingress."""
        if self.ray.num_cpus is not None:
            return self.ray.num_cpus
        need = self.max_replica_count() * self.replica.num_cpus + self.ingress.num_cpus
        return float(max(2, int(need + 0.999) + 1))


def _error_text(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(config)"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def parse_config(data: Any, overrides: dict[str, Any] | None = None) -> FleetConfig:
    """A decoded mapping -> validated config; :class:`FleetConfigError` names bad keys."""
    if not isinstance(data, dict):
        raise FleetConfigError("fleet config must be a mapping at the top level")
    if overrides:
        data = _merge(data, overrides)
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as exc:
        raise FleetConfigError(_error_text(exc)) from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> FleetConfig:
    """Read YAML (``.yaml``/``.yml``) or JSON; relative ``model.path`` is relative to the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise FleetConfigError(f"cannot read fleet config {p}: {exc}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml/json syntax errors
        raise FleetConfigError(f"{p}: not valid {p.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    cfg = parse_config(data if data is not None else {}, overrides)
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().is_absolute():
        cfg.model.path = str((p.parent / cfg.model.path).resolve())
    return cfg
