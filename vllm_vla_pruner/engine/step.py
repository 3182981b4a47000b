"""What the worker knows about the batch of the step being run.

vLLM calls ``model.forward`` with flat token rows only. The runner hooks in
``vllm_vla_pruner.patches.runner_hooks`` publish, just before each forward, which requests
the rows belong to (in ``query_start_loc`` order) and their pruning plans, and record the
``CommonAttentionMetadata`` each KV group's metadata builder was given, so the model can build
compacted metadata for layers >= K with the backend's own builder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepRequest:
    req_id: str
    plan: dict[str, Any] | None
    max_tokens: int


@dataclass
class StepContext:
    runner: Any
    requests: list[StepRequest]
    common_metadata: dict[int, Any] = field(default_factory=dict)  # KV group id -> metadata


_current: StepContext | None = None
_last_common_metadata: dict[int, Any] = {}


def set_current(ctx: StepContext | None) -> None:
    global _current
    _current = ctx


def current() -> StepContext | None:
    """The step being run, or None for dummy/profile runs (which take the plain path)."""
    return _current


_recording = True


def record_common_metadata(group_id: int, cm: Any) -> None:
    if _recording:
        _last_common_metadata[group_id] = cm


@contextmanager
def not_recorded() -> Iterator[None]:
    """Builds made by the pruned decoder itself are not the runner's step metadata."""
    global _recording
    _recording = False
    try:
        yield
    finally:
        _recording = True


def recorded_common_metadata() -> dict[int, Any]:
    return dict(_last_common_metadata)
