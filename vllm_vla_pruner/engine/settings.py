"""Pruning settings: server-wide defaults (engine flag) and per-request overrides.

Server defaults come from vLLM's own ``--additional-config '{"vla_pruner": {...}}'``, which
reaches every engine process, over the checkpoint's recommendation (a ``"vla_pruner"`` object
in its config.json, e.g. the pruning layers tuned for a shallow model). Per-request
settings travel in ``SamplingParams.extra_args`` (``vllm_xargs`` on the OpenAI routes) under
the ``vla_*`` keys below, so any vLLM client can set them; the session id is vLLM's own
per-request ``session_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, fields, replace
from typing import Any

from vllm_vla_pruner.pruning import PRUNERS

# Per-request keys in SamplingParams.extra_args.
KEY_METHOD = "vla_pruner"
KEY_KEEP_RATIO = "vla_keep_ratio"
KEY_NEW_EPISODE = "vla_new_episode"
KEY_SESSION = "vla_session_id"  # fallback when the client cannot set vLLM's session_id
KEY_PLAN = "vla_plan"  # written by the scheduler hook, read by the worker; never by clients
REQUEST_KEYS = (KEY_METHOD, KEY_KEEP_RATIO, KEY_NEW_EPISODE, KEY_SESSION)
# Flow-matching models (pi0): the seed of the request's starting noise (a chunk is
# reproducible with it) and the number of Euler steps (default: the checkpoint's).
KEY_NOISE_SEED = "vla_noise_seed"
KEY_NUM_STEPS = "vla_num_steps"
FLOW_KEYS = (KEY_NOISE_SEED, KEY_NUM_STEPS)
MAX_FLOW_STEPS = 100  # 10x pi0's default: one request's steps stall its whole batch
#: Longest accepted session id (``vla_session_id``, the body's ``session_id``, X-Session-ID).
MAX_SESSION_ID_CHARS = 256


@dataclass(frozen=True)
class PruningSettings:
    """Engine-wide pruning configuration (defaults are the paper's)."""

    method: str = "none"  # default pruner for requests that do not name one
    keep_ratio: float = 0.25
    layer: int = 3  # K: layers >= K see only kept visual tokens
    action_layer: int | None = None  # None: the middle layer, L // 2
    window: int = 3
    gamma: float = 0.8
    semantic_rows: str = "all"
    max_sessions: int = 4096
    idle_timeout_s: float = 900.0
    # Layers >= K in their own KV cache group(s) sized for the pruned length (saves memory).
    separate_kv_group: bool = True

    def action_layer_for(self, num_layers: int) -> int:
        return num_layers // 2 if self.action_layer is None else self.action_layer

    def check(self, num_layers: int) -> PruningSettings:
        if not 1 <= self.layer < num_layers:
            raise ValueError(f"vla_pruner.layer must be in [1, {num_layers - 1}], got {self.layer}")
        if not 0 <= self.action_layer_for(num_layers) < num_layers:
            raise ValueError(f"vla_pruner.action_layer must be in [0, {num_layers - 1}]")
        validate_method(self.method, "vla_pruner.method")
        validate_keep_ratio(self.keep_ratio, "vla_pruner.keep_ratio")
        if self.window < 1 or not 0 < self.gamma <= 1:
            raise ValueError("vla_pruner.window must be >= 1 and gamma in (0, 1]")
        return self

    @classmethod
    def resolve(
        cls, checkpoint: dict[str, Any] | None = None, operator: dict[str, Any] | None = None
    ) -> PruningSettings:
        """The paper's defaults, then the checkpoint's recommendation (``"vla_pruner"`` in its
        config.json: layers tuned for that model), then the operator's settings."""
        merged: dict[str, Any] = {}
        for source, raw in (("checkpoint config.json", checkpoint), ("operator", operator)):
            raw = dict(raw or {})
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise ValueError(
                    f"unknown vla_pruner settings {unknown} from the {source}; "
                    f"valid: {sorted(known)}"
                )
            merged.update(raw)
        return replace(cls(), **merged)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> PruningSettings:
        extra = getattr(vllm_config, "additional_config", None) or {}
        model_config = getattr(vllm_config, "model_config", None)
        hf_config = getattr(model_config, "hf_config", None)
        return cls.resolve(getattr(hf_config, "vla_pruner", None), extra.get("vla_pruner"))


class InvalidPruningSetting(ValueError):
    """A pruning setting a client or operator got wrong; ``field`` names it, ``reason`` says
    what is wrong without the name (for callers that report the field their own way)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# The one set of checks for per-request settings: the /v1/actions body (api/protocol.py), the
# extra_args of every route (patches/api_validation.py) and the operator's settings use these.


def validate_method(
    method: Any, field: str = KEY_METHOD, allowed: Collection[str] | None = None
) -> str:
    """A pruner of the registry (and of ``allowed``, when a caller offers fewer)."""
    valid = sorted(PRUNERS if allowed is None else set(allowed) & set(PRUNERS))
    if not isinstance(method, str) or method not in valid:
        raise InvalidPruningSetting(field, f"unknown pruning method {method!r}; valid: {valid}")
    return method


def validate_keep_ratio(ratio: Any, field: str = KEY_KEEP_RATIO) -> float:
    """A JSON number in (0, 1]: ``"0.5"`` and ``true`` are client bugs, NaN is refused."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InvalidPruningSetting(field, f"keep_ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def validate_new_episode(value: Any, field: str = KEY_NEW_EPISODE) -> bool:
    """A boolean, strictly: ``"yes"`` or ``1`` would silently keep or reset a robot's history."""
    if not isinstance(value, bool):
        raise InvalidPruningSetting(field, f"must be a boolean, got {value!r}")
    return value


def validate_session_id(value: Any, field: str = KEY_SESSION) -> str:
    """Session ids end up in logs, metrics labels and routing hashes: short and printable."""
    if not isinstance(value, str):
        raise InvalidPruningSetting(field, f"must be a string, got {type(value).__name__}")
    if not value or len(value) > MAX_SESSION_ID_CHARS:
        raise InvalidPruningSetting(field, f"must be 1..{MAX_SESSION_ID_CHARS} characters")
    if not value.isprintable():
        raise InvalidPruningSetting(field, "must contain printable characters only")
    return value


def validate_noise_seed(value: Any, field: str = KEY_NOISE_SEED) -> int:
    """A JSON integer in [0, 2**63): the seed of a flow-matching request's starting noise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidPruningSetting(field, f"must be an integer in [0, 2**63), got {value!r}")
    return value


def validate_num_steps(value: Any, field: str = KEY_NUM_STEPS) -> int:
    """Euler steps of a flow-matching request: an integer in [1, MAX_FLOW_STEPS]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FLOW_STEPS:
        raise InvalidPruningSetting(
            field, f"must be an integer in [1, {MAX_FLOW_STEPS}], got {value!r}"
        )
    return value


#: Each per-request key and its check.
REQUEST_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    KEY_METHOD: validate_method,
    KEY_KEEP_RATIO: validate_keep_ratio,
    KEY_NEW_EPISODE: validate_new_episode,
    KEY_SESSION: validate_session_id,
    KEY_NOISE_SEED: validate_noise_seed,
    KEY_NUM_STEPS: validate_num_steps,
}


def validate_request_args(extra_args: dict[str, Any] | None) -> None:
    """Reject bad per-request pruning settings before they reach the engine."""
    if not extra_args:
        return
    if KEY_PLAN in extra_args:
        raise InvalidPruningSetting(KEY_PLAN, "is set by the engine, not by clients")
    for key, check in REQUEST_VALIDATORS.items():
        if key in extra_args:
            check(extra_args[key])
