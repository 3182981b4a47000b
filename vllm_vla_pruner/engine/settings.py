"""Pruning settings: server-wide defaults (engine flag) and per-request overrides.

Server defaults come from vLLM's own ``--additional-config '{"vla_pruner": {...}}'``, which
reaches every engine process, over the checkpoint's recommendation (a ``"vla_pruner"`` object
in its config.json, e.g. the pruning layers tuned for a shallow model). Per-request
settings travel in ``SamplingParams.extra_args`` (``vllm_xargs`` on the OpenAI routes) under
the ``vla_*`` keys below, so any vLLM client can set them; the session id is vLLM's own
per-request ``session_id``.
"""

from __future__ import annotations

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
    """A pruning setting a client or operator got wrong; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def validate_method(method: Any, field: str = KEY_METHOD) -> str:
    if not isinstance(method, str) or method not in PRUNERS:
        raise InvalidPruningSetting(
            field, f"unknown pruning method {method!r}; valid: {sorted(PRUNERS)}"
        )
    return method


def validate_keep_ratio(ratio: Any, field: str = KEY_KEEP_RATIO) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise InvalidPruningSetting(field, f"keep_ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


def validate_request_args(extra_args: dict[str, Any] | None) -> None:
    """Reject bad per-request pruning settings before they reach the engine."""
    if not extra_args:
        return
    if KEY_PLAN in extra_args:
        raise InvalidPruningSetting(KEY_PLAN, "is set by the engine, not by clients")
    if KEY_METHOD in extra_args:
        validate_method(extra_args[KEY_METHOD])
    if KEY_KEEP_RATIO in extra_args:
        validate_keep_ratio(extra_args[KEY_KEEP_RATIO])
    if KEY_NEW_EPISODE in extra_args and not isinstance(extra_args[KEY_NEW_EPISODE], bool):
        raise InvalidPruningSetting(KEY_NEW_EPISODE, "must be a boolean")
    if KEY_SESSION in extra_args and not isinstance(extra_args[KEY_SESSION], str):
        raise InvalidPruningSetting(KEY_SESSION, "must be a string")
