"""What the worker knows about the batch of the step being run.

vLLM calls ``model.forward`` with flat token rows only. The runner hooks in
``vllm_vla_pruner.patches.runner_hooks`` publish, just before each forward, which requests
the rows belong to (in ``query_start_loc`` order) and their pruning plans, and record the
``CommonAttentionMetadata`` each KV group's metadata builder was given, so the model can build
compacted metadata for layers >= K with the backend's own builder. They publish into the
model's :class:`StepChannel`, which the model's pruned decoder owns (one per model replica).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vllm_vla_pruner.engine.plan import ActionChunk, PruneOutcome, PruningPlan


@dataclass(frozen=True)
class StepRequest:
    req_id: str
    plan: PruningPlan | None
    max_tokens: int
    num_prompt_tokens: int  # a (re)prefill with more rows than this is a recompute
    state: tuple[float, ...] | None = None  # robot state for parallel-decoding models (OFT)
    noise_seed: int | None = None  # flow-matching models (pi0): the starting noise's seed
    num_steps: int | None = None  # flow-matching models: Euler steps (None: the checkpoint's)
    invalid: str | None = None  # a per-request setting that failed its check (never guessed)


@dataclass
class StepContext:
    runner: Any
    requests: list[StepRequest]
    common_metadata: dict[int, Any] = field(default_factory=dict)  # KV group id -> metadata


class StepChannel:
    """Runner hooks -> pruned decoder (the step's requests) and back (their outcomes)."""

    def __init__(self) -> None:
        self.current: StepContext | None = None
        self._common_metadata: dict[int, Any] = {}
        self._recording = True
        self._outcomes: dict[str, PruneOutcome] = {}
        self._chunks: dict[str, ActionChunk] = {}

    # -- runner -> decoder

    def record_common_metadata(self, group_id: int, cm: Any) -> None:
        if self._recording:
            self._common_metadata[group_id] = cm

    def recorded_common_metadata(self) -> dict[int, Any]:
        return dict(self._common_metadata)

    @contextmanager
    def not_recorded(self) -> Iterator[None]:
        """Builds made by the pruned decoder itself are not the runner's step metadata."""
        self._recording = False
        try:
            yield
        finally:
            self._recording = True

    @contextmanager
    def step(self, ctx: StepContext) -> Iterator[None]:
        self.current = ctx
        try:
            yield
        finally:
            self.current = None

    # -- decoder -> runner (the step's output)

    def report(self, req_id: str, outcome: PruneOutcome) -> None:
        self._outcomes[req_id] = outcome

    def take_outcomes(self) -> dict[str, PruneOutcome]:
        out, self._outcomes = self._outcomes, {}
        return out

    def report_chunk(self, req_id: str, chunk: ActionChunk) -> None:
        self._chunks[req_id] = chunk

    def take_chunks(self) -> dict[str, ActionChunk]:
        out, self._chunks = self._chunks, {}
        return out
