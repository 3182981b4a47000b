"""Ingress -> replica calls: to the session's replica, retried elsewhere when it died, bounded.

A request in flight on a replica that dies fails with a Ray actor error; the router has then
dropped that replica from the ring, so the next attempt lands on the session's next replica.
Every request is bounded by one deadline, retries and back-off included: the robot gets the
action, or a 503 (no replica could serve) or 504 (deadline) at once, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_vla_pruner.api.protocol import ApiError

__all__ = ["Forwarded", "ReplicaForwarder", "retry_reason"]

logger = logging.getLogger("ray.serve")


def retry_reason(exc: BaseException) -> str | None:
    """Why a replica call may succeed elsewhere (the replica died / is unreachable)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, ActorDiedError):
        return "replica_died"
    if isinstance(exc, ActorUnavailableError):
        return "replica_unavailable"
    if isinstance(exc, RayActorError):
        return "replica_died"
    if isinstance(exc, BackPressureError):
        return "backpressure"
    if isinstance(exc, DeploymentUnavailableError):
        return "deployment_unavailable"
    if isinstance(getattr(exc, "cause", None), RayActorError):
        return "replica_died"
    return None


@dataclass
class Forwarded:
    """The replica's answer ({status, body, replica}) or the ingress's own error."""

    result: dict[str, Any] | None
    error: ApiError | None
    attempts: int


async def _await(response: Any) -> Any:
    return await response


class ReplicaForwarder:
    """Calls ``predict`` on the engine deployment with session affinity and bounded retry."""

    def __init__(
        self,
        engine: Any,
        timeout_s: float,
        max_attempts: int,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.on_retry = on_retry

    async def predict(
        self, data: dict[str, Any], header: str | None, sid: str | None, seq: int | None
    ) -> Forwarded:
        deadline = time.monotonic() + self.timeout_s
        last = ""
        for attempt in range(1, self.max_attempts + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            handle = self.engine.options(session_id=sid) if sid else self.engine
            response = handle.predict.remote(data, header, seq)
            try:
                return Forwarded(await asyncio.wait_for(_await(response), remaining), None, attempt)
            except asyncio.TimeoutError:
                response.cancel()
                msg = (
                    f"no replica answered within {self.timeout_s:g} s (attempt {attempt}); "
                    "request cancelled"
                )
                return Forwarded(None, ApiError(504, msg, type="timeout"), attempt)
            except Exception as exc:  # noqa: BLE001 - classified below
                reason = retry_reason(exc)
                if reason is None:
                    logger.exception("fleet ingress: replica call failed")
                    err = ApiError(
                        500, f"replica call failed: {type(exc).__name__}", type="internal"
                    )
                    return Forwarded(None, err, attempt)
                if self.on_retry is not None:
                    self.on_retry(reason)
                last = f"{reason}: {type(exc).__name__}"
                logger.warning("fleet ingress: attempt %d for session %s: %s", attempt, sid, last)
                await asyncio.sleep(min(0.1 * 2**attempt, max(0.0, deadline - time.monotonic())))
        err = ApiError(
            503,
            f"no replica could serve the request after {self.max_attempts} attempt(s) "
            f"({last or 'time bound reached'}); retry later",
            type="replica_unavailable",
        )
        return Forwarded(None, err, self.max_attempts)

    async def call(self, method: str) -> Any:
        """Any replica's ``method()`` within the time bound (e.g. ``info``)."""
        response = getattr(self.engine, method).remote()
        return await asyncio.wait_for(_await(response), self.timeout_s)
