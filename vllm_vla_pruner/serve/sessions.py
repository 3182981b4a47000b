"""Per-robot bookkeeping that keeps temporal pruning history honest across replicas.

The ingress numbers each session's frames (:class:`SessionTable`) and sends the number with
the request; a replica remembers the last number it served (:class:`FrameGaps`) and sees a
gap when frames went to another replica meanwhile (the session's replica was full, or the
session moved and came back). Such history is stale and is restarted as a new episode.
Both tables are bounded LRUs: a fleet serving robots for weeks must not grow without end.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_TRACKED_SESSIONS", "FrameGaps", "IngressSession", "SessionTable"]

#: Sessions remembered per table; the least recently seen are forgotten first.
MAX_TRACKED_SESSIONS = 65536


@dataclass
class IngressSession:
    """What the ingress knows about one robot."""

    seq: int = 0
    replica: str | None = None
    last_seen: float = 0.0
    requests: int = 0


class SessionTable:
    """The ingress's view: frame numbers and the replica that last served each robot."""

    def __init__(self, window_s: float, max_sessions: int = MAX_TRACKED_SESSIONS) -> None:
        self.window_s = window_s
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, IngressSession] = OrderedDict()

    def next_frame(self, sid: str) -> IngressSession:
        """Number the session's next frame (``.seq``) and mark it recently seen."""
        st = self.sessions.pop(sid, None) or IngressSession()
        self.sessions[sid] = st
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        st.seq += 1
        st.last_seen = time.monotonic()
        return st

    @staticmethod
    def served(st: IngressSession, replica: str) -> bool:
        """Record a successful answer; True when the robot moved to another replica."""
        moved = st.replica is not None and st.replica != replica
        st.replica = replica
        st.requests += 1
        return moved

    def active(self) -> int:
        """Sessions seen within the window."""
        cutoff = time.monotonic() - self.window_s
        return sum(1 for s in self.sessions.values() if s.last_seen >= cutoff)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/fleet/sessions``: where each robot lives."""
        now = time.monotonic()
        return {
            sid: {
                "replica": s.replica,
                "requests": s.requests,
                "idle_s": round(now - s.last_seen, 3),
            }
            for sid, s in self.sessions.items()
        }


class FrameGaps:
    """A replica's view: the last frame number served here per session."""

    def __init__(self, window_s: float, max_sessions: int = MAX_TRACKED_SESSIONS) -> None:
        self.window_s = window_s
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def stale(self, sid: str, seq: int | None) -> bool:
        """Record the session's frame number; True when frames went elsewhere since the last
        one seen here (its history is stale: restart it)."""
        now = time.monotonic()
        last = self._last.pop(sid, None)
        gap = last is not None and seq is not None and seq > last[0] + 1
        self._last[sid] = (seq if seq is not None else (last[0] + 1 if last else 0), now)
        while len(self._last) > self.max_sessions:
            self._last.popitem(last=False)
        return gap

    def active(self) -> int:
        """Sessions served here within the window."""
        cutoff = time.monotonic() - self.window_s
        return sum(1 for _, t in self._last.values() if t >= cutoff)
