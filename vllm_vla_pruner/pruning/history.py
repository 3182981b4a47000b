"""Per-episode history of action-importance scores, with temporal smoothing.

Consecutive control steps attend to nearly the same regions, so the last ``window`` frames'
action scores predict the current frame's (spec section 3). The store is keyed by robot
episode (session id) and bounded twice over - LRU beyond ``max_sessions`` and an idle
timeout - so a fleet of robots that come and go cannot grow memory without bound. The engine
pushes from its step loop while the API may reset episodes, hence the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .checks import require_finite

__all__ = ["ActionHistory", "decay_weights"]


def decay_weights(num: int, gamma: float) -> Tensor:
    """Normalised weights for ``num`` frames, newest first: ``gamma^i / sum_j gamma^j``.

    This is the paper's order (newest frame weighted most); the OpenVLA reference code
    reverses it, which we deliberately do not copy.
    """
    w = torch.tensor([gamma**i for i in range(num)], dtype=torch.float32)
    return w / w.sum()


@dataclass
class _Session:
    frames: deque[Tensor]
    last_access: float
    length: int = field(default=-1)


class ActionHistory:
    """Bounded, thread-safe store of the last ``window`` action-score frames per episode.

    Warm-up: :meth:`estimate` is ``None`` until ``window`` frames exist (the frame then runs
    unpruned and only feeds the history). :meth:`push` and :meth:`estimate` count as use
    (refresh LRU order and idle time); :meth:`num_frames`, :meth:`is_warm`, ``len``,
    ``in`` and :meth:`sessions` only peek. Every call first drops sessions idle for longer
    than ``idle_timeout_s`` (``math.inf`` disables the timeout).
    """

    def __init__(
        self,
        window: int = 3,
        gamma: float = 0.8,
        max_sessions: int = 4096,
        idle_timeout_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not (0.0 < gamma <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        if not idle_timeout_s > 0 or math.isnan(idle_timeout_s):
            raise ValueError(f"idle_timeout_s must be > 0, got {idle_timeout_s!r}")
        self.window = window
        self.gamma = float(gamma)
        self.max_sessions = max_sessions
        self.idle_timeout_s = float(idle_timeout_s)
        self._clock = clock
        self._weights = decay_weights(window, self.gamma)
        # Ordered by last use, least recently used first.
        self._store: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def weights(self) -> Tensor:
        """The ``[window]`` normalised weights, newest frame first."""
        return self._weights.clone()

    # -- internals (caller holds the lock) ---------------------------------------------------
    def _expire(self, now: float) -> None:
        deadline = now - self.idle_timeout_s
        while self._store:
            sid, sess = next(iter(self._store.items()))
            if sess.last_access > deadline:
                break
            del self._store[sid]

    def _touch(self, session_id: str, sess: _Session, now: float) -> None:
        sess.last_access = now
        self._store.move_to_end(session_id)

    # -- public API -------------------------------------------------------------------------
    def push(self, session_id: str, scores: Tensor) -> None:
        """Append the newest frame's action scores ``[M]`` for ``session_id``.

        Raises ValueError if ``scores`` is not a 1-D tensor (or, with debug checks on, not
        finite), or if its length differs from the frames already stored for this session (a
        different model or image size inside one episode is a caller bug, and mixing lengths
        would misalign tokens). The engine pushes from inside the forward.
        """
        if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
            raise ValueError("scores must be a non-empty 1-D tensor [M]")
        require_finite("scores", scores)
        frame = scores.detach().to(torch.float32).clone()
        with self._lock:
            now = self._clock()
            self._expire(now)
            sess = self._store.get(session_id)
            if sess is None:
                while len(self._store) >= self.max_sessions:
                    self._store.popitem(last=False)
                sess = _Session(frames=deque(maxlen=self.window), last_access=now)
                self._store[session_id] = sess
            elif sess.length != frame.numel():
                raise ValueError(
                    f"scores for session {session_id!r} have {frame.numel()} entries, but its "
                    f"stored frames have {sess.length}; call reset() for a new episode"
                )
            sess.length = frame.numel()
            sess.frames.append(frame)
            self._touch(session_id, sess, now)

    def estimate(self, session_id: str) -> Tensor | None:
        """Decayed window average S_hat ``[M]`` (newest weight ``gamma^0``), or ``None`` while
        fewer than ``window`` frames exist (warm-up) or the session is unknown."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            sess = self._store.get(session_id)
            if sess is None:
                return None
            self._touch(session_id, sess, now)
            if len(sess.frames) < self.window:
                return None
            frames = list(sess.frames)
        newest_first = torch.stack(frames[::-1])  # [w, M]
        w = self._weights.to(newest_first.device)
        return (w.unsqueeze(1) * newest_first).sum(dim=0)

    def num_frames(self, session_id: str) -> int:
        """Frames currently held for ``session_id`` (0 if unknown or expired)."""
        with self._lock:
            self._expire(self._clock())
            sess = self._store.get(session_id)
            return 0 if sess is None else len(sess.frames)

    def is_warm(self, session_id: str) -> bool:
        """True once ``window`` frames exist, i.e. the next frame may be pruned."""
        return self.num_frames(session_id) >= self.window

    def reset(self, session_id: str) -> None:
        """Forget ``session_id``'s frames (new episode). Unknown ids are a no-op."""
        with self._lock:
            self._expire(self._clock())
            self._store.pop(session_id, None)

    def clear(self) -> None:
        """Forget every session."""
        with self._lock:
            self._store.clear()

    def sessions(self) -> list[str]:
        """Live session ids, least recently used first."""
        with self._lock:
            self._expire(self._clock())
            return list(self._store)

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._store)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            self._expire(self._clock())
            return session_id in self._store
