"""The engine-core side of pruning: one object per scheduler that owns every request's plan.

It plans each request when it enters the scheduler, tells the pruned KV group's manager how
many slots a request does not need, takes the worker's outcomes from each step's output, and
names the requests whose forward did not prune as planned, so the scheduler can fail them
instead of answering them as if pruned. Pure Python: the patches in
``vllm_vla_pruner.patches.scheduler_plan`` connect it to vLLM's ``Scheduler``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_vla_pruner.engine.plan import ActionChunk, PruneOutcome, PruningPlan, PruningResult
from vllm_vla_pruner.engine.planner import FrameCounter, make_plan
from vllm_vla_pruner.engine.settings import (
    REQUEST_KEYS,
    InvalidPruningSetting,
    PruningSettings,
    validate_request_args,
)

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    plan: PruningPlan | None  # None: the request's settings were invalid (it will be failed)
    outcome: PruneOutcome | None = None


@dataclass
class SchedulerPruning:
    """Plans, pruned KV slots and outcomes of the requests one scheduler holds."""

    settings: PruningSettings
    frames: FrameCounter = field(init=False)
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False)
    _chunks: dict[str, ActionChunk] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.frames = FrameCounter(self.settings.max_sessions, self.settings.idle_timeout_s)

    # ------------------------------------------------------------------ admission

    def plan(
        self,
        request_id: str,
        extra_args: Mapping[str, Any] | None,
        session_id: str | None,
        visual_span: tuple[int, int] | None,
        request_seed: int | None,
    ) -> PruningPlan | None:
        """Fix the request's plan (None: nothing to prune or pruning not asked for)."""
        extra = dict(extra_args or {})
        asked = any(k in extra for k in REQUEST_KEYS)
        if visual_span is None or (not asked and self.settings.method == "none"):
            return None
        try:  # validated in the API process; a request that skipped it must not crash here
            validate_request_args({k: v for k, v in extra.items() if k in REQUEST_KEYS})
        except InvalidPruningSetting as exc:
            self.refuse(request_id, str(exc))
            return None
        start, length = visual_span
        plan = make_plan(extra, session_id, start, length, self.settings, self.frames, request_seed)
        self._entries[request_id] = _Entry(plan)
        return plan

    def refuse(self, request_id: str, reason: str) -> None:
        """Fail the request at its first step, unpruned (its KV is sized in full)."""
        logger.error("vla_pruner: request %s refused: %s", request_id, reason)
        self._entries[request_id] = _Entry(None)

    def pruned_slots(self, request_id: str) -> int:
        """P for the pruned KV group's manager (0 for requests that are not pruned)."""
        entry = self._entries.get(request_id)
        return entry.plan.pruned_slots if entry is not None and entry.plan is not None else 0

    # ------------------------------------------------------------------ step outputs

    def take_outcomes(
        self, scheduled: Iterable[str], outcomes: Mapping[str, PruneOutcome] | None
    ) -> list[str]:
        """Record the step's worker outcomes; return the requests that were planned to be
        pruned, were run this step, and have no outcome saying they were pruned (to be
        failed). Call before the scheduler processes the step (it may release requests)."""
        for req_id, outcome in (outcomes or {}).items():
            entry = self._entries.get(req_id)
            if entry is not None:
                entry.outcome = outcome
        failed = []
        for req_id in scheduled:
            entry = self._entries.get(req_id)
            if entry is None:
                continue
            if entry.plan is None:  # invalid settings: failed, never run as if asked
                failed.append(req_id)
            elif entry.plan.prune and (entry.outcome is None or not entry.outcome.pruned):
                failed.append(req_id)
        return failed

    def take_chunks(self, chunks: Mapping[str, ActionChunk] | None) -> None:
        """Keep the step's action chunks until their requests are released."""
        self._chunks.update(chunks or {})

    def release_chunk(self, request_id: str) -> ActionChunk | None:
        return self._chunks.pop(request_id, None)

    # ------------------------------------------------------------------ release

    def release(self, request_id: str) -> PruningResult | None:
        """Forget the request; return what the client is told about it."""
        entry = self._entries.pop(request_id, None)
        if entry is None or entry.plan is None:
            return None
        plan = entry.plan
        return PruningResult(
            method=plan.method,
            keep_ratio=plan.keep_ratio,
            warmup=plan.warmup,
            planned_keep=plan.num_keep,
            outcome=entry.outcome,
        )

    def __len__(self) -> int:
        return len(self._entries)
