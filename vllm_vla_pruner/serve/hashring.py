"""Consistent-hash ring: robot session id -> ranked replicas (primary, then fallbacks).

Why consistent hashing: a robot's temporal pruning history lives in one engine replica, so
its frames must keep landing there; when a replica leaves, only the sessions it owned move
(to their next replica clockwise) and everybody else stays put. Pure Python and Ray-free so
the routing rule is unit-testable; ``serve.routing`` plugs it into Ray Serve's router.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Hashable, Iterable

__all__ = ["HashRing", "key_hash"]

DEFAULT_VIRTUAL_NODES = 100


def key_hash(key: str) -> int:
    """64-bit hash, identical in every process and Python version (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Ring of ``virtual_nodes`` points per member; members are any hashable with a stable
    ``str`` (the router uses Ray's replica unique id)."""

    def __init__(
        self, members: Iterable[Hashable] = (), virtual_nodes: int = DEFAULT_VIRTUAL_NODES
    ) -> None:
        if not isinstance(virtual_nodes, int) or virtual_nodes <= 0:
            raise ValueError(f"virtual_nodes must be a positive int, got {virtual_nodes!r}")
        self.virtual_nodes = virtual_nodes
        self._members: frozenset[Hashable] = frozenset()
        self._hashes: list[int] = []
        self._owners: list[Hashable] = []
        self.rebuild(members)

    @property
    def members(self) -> frozenset[Hashable]:
        return self._members

    def __len__(self) -> int:
        return len(self._members)

    def rebuild(self, members: Iterable[Hashable], name=str) -> bool:
        """Set the member set; returns False (and keeps the ring) when it did not change."""
        new = frozenset(members)
        if new == self._members and self._hashes:
            return False
        points = sorted(
            (key_hash(f"{name(m)}#{i}"), name(m), m) for m in new for i in range(self.virtual_nodes)
        )
        self._hashes = [p[0] for p in points]
        self._owners = [p[2] for p in points]
        self._members = new
        return True

    def ranked(self, key: str, count: int | None = None) -> list[Hashable]:
        """Owner of ``key`` then distinct successors clockwise, ``count`` in all (None: all)."""
        n = len(self._hashes)
        if n == 0:
            return []
        want = len(self._members) if count is None else min(count, len(self._members))
        start = bisect.bisect_right(self._hashes, key_hash(key)) % n
        out: list[Hashable] = []
        seen: set[Hashable] = set()
        for off in range(n):
            owner = self._owners[(start + off) % n]
            if owner not in seen:
                seen.add(owner)
                out.append(owner)
                if len(out) >= want:
                    break
        return out

    def owner(self, key: str) -> Hashable | None:
        ranked = self.ranked(key, 1)
        return ranked[0] if ranked else None
