"""Ray Serve request router: session affinity by consistent hashing, with fallbacks.

Built on Ray 2.60's ``ConsistentHashRouter`` (ray/serve/experimental/consistent_hash_router.py),
which already does the parts that are hard to get right inside Serve's routing loop: ranked
candidates (primary, then ``num_fallback_replicas`` successors) tried in order, a replica that
rejects (its ``max_ongoing_requests`` is full: overloaded) passed over for the next one, and a
routing task that never drops a popped request. This subclass changes two things:

- the ring is ``serve.hashring.HashRing`` (blake2b, no mmh3 dependency), the same
  code the unit tests check for stable assignment and minimal movement;
- a replica whose actor died is taken off the ring at once (Ray's version only skips it in
  lookups until the controller's next broadcast), so its sessions settle on their successor
  immediately and stay there.

The routing key is the request's ``session_id`` (the ingress sets it with
``handle.options(session_id=...)`` from the body's ``session_id`` or ``X-Session-ID``);
requests without one hash on their request id, i.e. spread uniformly.
"""

from __future__ import annotations

import logging

from ray.serve._private.common import ReplicaID
from ray.serve._private.constants import SERVE_LOGGER_NAME
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from vllm_vla_pruner.serve.hashring import HashRing

__all__ = ["ROUTER_CLASS", "SessionAffinityRouter"]

logger = logging.getLogger(SERVE_LOGGER_NAME)

#: Import path for ``RequestRouterConfig(request_router_class=...)``.
ROUTER_CLASS = "vllm_vla_pruner.serve.routing.SessionAffinityRouter"


def _ring_name(replica_id: ReplicaID) -> str:
    # unique_id, not the full id: stable across controller restarts.
    return replica_id.unique_id


class SessionAffinityRouter(ConsistentHashRouter):
    """Consistent hashing on session id over :class:`HashRing`; see the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        self._ring: HashRing | None = None
        super().__init__(*args, **kwargs)
        if self._ring is None:
            self._ring = HashRing(virtual_nodes=self._num_virtual_nodes)

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state(**kwargs)
        self._ring = HashRing(virtual_nodes=self._num_virtual_nodes)
        if self._replica_set_snapshot:
            self._ring.rebuild(self._replica_set_snapshot, name=_ring_name)

    def _rebuild_ring(self, new_snapshot) -> None:
        if getattr(self, "_ring", None) is None:  # called from the base __init__
            self._ring = HashRing(virtual_nodes=self._num_virtual_nodes)
        self._ring.rebuild(new_snapshot, name=_ring_name)
        self._replica_set_snapshot = frozenset(new_snapshot)
        logger.info(
            f"vla session ring for {self._deployment_id}: {len(new_snapshot)} replicas "
            f"({', '.join(sorted(_ring_name(r) for r in new_snapshot))})."
        )

    def _lookup_ranked_replicas(self, routing_key: str) -> list[ReplicaID]:
        return self._ring.ranked(routing_key, 1 + self._num_fallback_replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        if replica_id in self._replica_set_snapshot:
            self._rebuild_ring(self._replica_set_snapshot - {replica_id})
