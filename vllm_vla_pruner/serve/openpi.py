"""openpi robots on the fleet: the ingress speaks the WebSocket protocol, replicas do the work.

The connection loop, metadata, observation mapping and error frames are the single-server
ones (``api/openpi/server.py``); only the inference backend differs. :class:`FleetBackend`
answers what that loop asks of an ``ActionService`` from one replica's ``info`` and sends
each frame as a ``/v1/actions`` body to the replica that owns the connection's session,
through the same forwarder as HTTP requests: consistent hashing on the session id, frames
numbered so that a replica seeing a gap restarts the episode's history, retry on the
session's next replica when one dies, and one deadline (the robot then gets the error frame
and close 1011, never a hung connection).
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from vllm_vla_pruner.api.protocol import ActionResponse, ApiError, PruningSettings, ServiceLimits
from vllm_vla_pruner.api.service import ActionService

__all__ = ["FleetBackend"]


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the replica sees the robot's exact pixels
    return base64.b64encode(buf.getvalue()).decode()


class FleetBackend:
    """The part of ``ActionService`` the openpi loop uses, served by the fleet's replicas."""

    # The same unnorm_key rule as a single server (reads action_dims/default/unnorm_keys).
    resolve_unnorm_key = ActionService.resolve_unnorm_key

    def __init__(self, info: dict[str, Any], forwarder: Any, sessions: Any) -> None:
        self.forwarder = forwarder
        self.sessions = sessions
        self.served_model_names = list(info["served_model_names"])
        self.action_dims = {k: int(v) for k, v in info["action_dims"].items()}
        self.unnorm_keys = sorted(self.action_dims)
        self.default_unnorm_key = info.get("default_unnorm_key")
        self.pruners = list(info.get("pruners") or [])
        self.image_side = info.get("image_size")
        self.pruning_defaults = dict(info.get("defaults") or {})
        self.limits = ServiceLimits()
        self.engine = None  # no local engine: /healthz of the ingress is its own

    async def predict_image(
        self,
        image: Any,
        instruction: str,
        *,
        unnorm_key: str | None = None,
        pruning: PruningSettings | None = None,
        session_id: str | None = None,
        new_episode: bool = False,
        model: str | None = None,
        started: float | None = None,
    ) -> ActionResponse:
        body: dict[str, Any] = {
            "image": await asyncio.to_thread(_png_b64, image),
            "instruction": instruction,
            "new_episode": bool(new_episode),
        }
        if unnorm_key is not None:
            body["unnorm_key"] = unnorm_key
        if session_id is not None:
            body["session_id"] = session_id
        if pruning is not None:
            body["pruning"] = pruning.model_dump(exclude_none=True)
        st = self.sessions.next_frame(session_id) if session_id is not None else None
        fwd = await self.forwarder.predict(body, None, session_id, st.seq if st else None)
        if fwd.error is not None:
            raise fwd.error
        result = fwd.result or {}
        status, out = int(result.get("status", 500)), result.get("body") or {}
        if status >= 400:
            err = out.get("error") or {}
            raise ApiError(
                status,
                str(err.get("message") or f"replica answered {status}"),
                field=err.get("field"),
                type=str(err.get("type") or "replica_error"),
            )
        if st is not None:
            self.sessions.served(st, str(result.get("replica") or ""))
        return ActionResponse.model_validate(out)
