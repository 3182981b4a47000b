"""Scheduler-side pruning plan: decided once per request, before any KV is allocated.

The scheduler must know up front how many KV slots layers >= K need, so the number of kept
visual tokens (and whether this frame is a warm-up frame) is fixed here, in the engine-core
process, as a :class:`~vllm_vla_pruner.engine.plan.PruningPlan` that travels to the worker.
The worker then decides *which* tokens to keep at layer K, always exactly ``num_keep``.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict
from typing import Any

from vllm_vla_pruner.engine.plan import PruningPlan
from vllm_vla_pruner.engine.settings import (
    KEY_KEEP_RATIO,
    KEY_METHOD,
    KEY_NEW_EPISODE,
    KEY_SESSION,
    PruningSettings,
)
from vllm_vla_pruner.pruning import budget_for, needs_action_history


class FrameCounter:
    """Frames seen per robot episode, bounded like the worker's history (LRU + idle timeout)."""

    def __init__(self, max_sessions: int, idle_timeout_s: float) -> None:
        self._frames: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._max = max_sessions
        self._idle = idle_timeout_s
        self._lock = threading.Lock()

    def next_frame(self, session: str, new_episode: bool) -> int:
        """Count this frame and return how many frames of the episode came before it."""
        now = time.monotonic()
        with self._lock:
            count, last = self._frames.pop(session, (0, now))
            if new_episode or now - last > self._idle:
                count = 0
            self._frames[session] = (count + 1, now)
            while len(self._frames) > self._max:
                self._frames.popitem(last=False)
            return count

    def __len__(self) -> int:
        return len(self._frames)


def random_seed(session: str | None, frame: int, request_seed: int | None = None) -> int:
    """Seed of the ``random`` pruner: the client's ``SamplingParams.seed`` if set; else one per
    robot frame (session, frame index), so a robot gets a new subset every frame and a run
    replays exactly; else 0 (a request without a session is one frame on its own)."""
    if request_seed is not None:
        return int(request_seed)
    if session:
        return zlib.crc32(f"{session}#{frame}".encode())
    return 0


def make_plan(
    extra_args: dict[str, Any] | None,
    session_id: str | None,
    visual_start: int,
    num_visual: int,
    settings: PruningSettings,
    frames: FrameCounter,
    request_seed: int | None = None,
) -> PruningPlan:
    """The request's pruning plan; ``prune`` False means this frame runs unpruned."""
    args = extra_args or {}
    method = args.get(KEY_METHOD, settings.method)
    keep_ratio = float(args.get(KEY_KEEP_RATIO, settings.keep_ratio))
    session = session_id or args.get(KEY_SESSION)
    new_episode = bool(args.get(KEY_NEW_EPISODE, False))
    history = needs_action_history(method)
    prior = frames.next_frame(session, new_episode) if session else 0
    # Warm-up (paper and reference code): until `window` frames of action history exist the
    # frame runs unpruned and only fills the history. Without a session there is no history:
    # the method then uses its semantic half from the first frame on.
    warmup = bool(session) and history and prior < settings.window
    num_keep = num_visual if method == "none" else budget_for(num_visual, keep_ratio)
    prune = method != "none" and not warmup and num_keep < num_visual
    return PruningPlan(
        method=method,
        keep_ratio=1.0 if method == "none" else keep_ratio,
        num_visual=num_visual,
        visual_start=visual_start,
        num_keep=num_keep if prune else num_visual,
        prune=prune,
        warmup=warmup,
        session=session,
        new_episode=new_episode,
        track_actions=bool(session) and history,
        expects_history=prune and bool(session) and history,
        seed=random_seed(session, prior, request_seed),
    )
