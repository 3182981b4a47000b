"""openpi's WebSocket policy server protocol on vLLM's API server, beside ``/v1/actions``.

A robot running ``WebsocketClientPolicy(host, port).infer(obs)["actions"]`` connects to
``ws://host:port`` (the root path) or ``ws://host:port/openpi``. The server answers with the
metadata frame first, then one reply frame per observation frame, strictly in turn, all
msgpack-numpy (``msgpack_numpy.py``). Many connections share the one vLLM engine, which
batches their requests; each connection's frames run through :class:`ActionService`, so the
engine request is the one ``/v1/actions`` builds.

Operator settings: ``--additional-config '{"openpi": {"preset": "libero", "unnorm_key":
...}}'`` (see :class:`OpenpiSettings`). Per connection, the query string (``?preset=``,
``session_id=``, ``method=``, ``keep_ratio=``, ``unnorm_key=``) or a ``{"endpoint":
"config", ...}`` message; per observation, the reserved keys ``session_id``, ``pruning`` and
``unnorm_key``. ``{"endpoint": "reset"}`` starts a new robot episode on the connection.

Errors follow openpi: a text frame naming the key and what was wrong, then close code 1011.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from vllm_vla_pruner.api.openpi.msgpack_numpy import FrameError, packb, unpackb
from vllm_vla_pruner.api.openpi.observations import (
    PRESETS,
    ModelInputs,
    ObservationError,
    ObservationPreset,
    ignored_inputs,
    map_observation,
)
from vllm_vla_pruner.api.protocol import ApiError, PruningSettings, check_session_id

__all__ = [
    "CONFIG_KEY",
    "NAMED_PATH",
    "OpenpiServer",
    "OpenpiSettings",
    "authorized",
    "build_openpi_router",
    "init_openpi_state",
    "model_inputs",
]

logger = logging.getLogger(__name__)

#: ``--additional-config`` key of the operator's openpi settings.
CONFIG_KEY = "openpi"
#: The named path; the root path ``/`` serves the same protocol (openpi-client's default).
NAMED_PATH = "/openpi"
STATE_KEY = "vla_openpi_server"
ERROR_CLOSE_CODE = 1011  # what openpi's server closes with after an error text frame
POLICY_VIOLATION = 1008


@dataclass(frozen=True)
class OpenpiSettings:
    """The operator's openpi settings (``--additional-config '{"openpi": {...}}'``)."""

    preset: str = "libero"  # openpi's most used example convention
    unnorm_key: str | None = None  # default: the checkpoint's default key

    @classmethod
    def from_additional_config(cls, additional: Mapping[str, Any] | None) -> OpenpiSettings:
        """Parse and check; a typo fails the server start, not the first robot."""
        raw = dict((additional or {}).get(CONFIG_KEY) or {})
        known = {"preset", "unnorm_key"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown {CONFIG_KEY} settings {unknown}; valid: {sorted(known)}")
        settings = cls(**raw)
        if settings.preset not in PRESETS:
            raise ValueError(
                f"{CONFIG_KEY}.preset: unknown preset {settings.preset!r}; "
                f"expected one of {sorted(PRESETS)}"
            )
        return settings


@dataclass
class Connection:
    """One robot connection: its episode (session), preset and pruning settings."""

    session_id: str
    named: bool  # the client chose the session id (a reconnect may continue its episode)
    preset: ObservationPreset
    unnorm_key: str | None
    pruning: PruningSettings | None = None
    new_episode: bool = True
    frames: int = 0
    prev_total_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ProtocolError(ValueError):
    """A message that breaks the protocol (text frame, unknown endpoint, bad setting)."""


def _api_tokens(args: Any) -> list[bytes]:
    """SHA-256 of vLLM's ``--api-key`` values (or ``VLLM_API_KEY``), as vLLM keeps them."""
    keys = list(getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")])
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def authorized(header: str | None, tokens: Sequence[bytes]) -> bool:
    """``Api-Key <key>`` (what openpi-client sends) or ``Bearer <key>`` (vLLM's scheme)."""
    if not tokens:
        return True
    if not header:
        return False
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() not in ("api-key", "bearer"):
        return False
    digest = hashlib.sha256(key.strip().encode()).digest()
    ok = False
    for token in tokens:
        ok |= secrets.compare_digest(digest, token)
    return ok


def model_inputs(service: Any) -> ModelInputs:
    """What the served model reads. The autoregressive OpenVLA path takes one camera and no
    state; a service that declares ``num_cameras`` / ``state_dim`` is read as it says."""
    return ModelInputs(
        cameras=int(getattr(service, "num_cameras", 1) or 1),
        state_dim=int(getattr(service, "state_dim", 0) or 0),
        image_size=getattr(service, "image_side", None),
        optional_cameras=getattr(service, "pi0", None) is not None,
    )


def _pruning(raw: Any, service: Any, where: str) -> PruningSettings | None:
    if raw is None:
        return None
    if isinstance(raw, PruningSettings):
        return raw
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"{where}: expected a map with 'method' and/or 'keep_ratio'")
    try:
        return PruningSettings.model_validate(
            dict(raw), context={"pruners": service.pruners or None}
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ProtocolError(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}") from None


def _merge(base: PruningSettings | None, over: PruningSettings | None) -> PruningSettings | None:
    """Per-observation settings over the connection's, field by field."""
    if over is None:
        return base
    if base is None:
        return over
    return PruningSettings(
        method=over.method if over.method is not None else base.method,
        keep_ratio=over.keep_ratio if over.keep_ratio is not None else base.keep_ratio,
    )


def _session(raw: Any, where: str) -> str:
    try:
        return check_session_id(raw)
    except ValueError as exc:
        raise ProtocolError(f"{where}: {exc}") from None


class OpenpiServer:
    """The protocol over one :class:`ActionService` (one per API server process)."""

    def __init__(
        self, service: Any, settings: OpenpiSettings | None = None, tokens: Sequence[bytes] = ()
    ) -> None:
        self.service = service
        self.settings = settings or OpenpiSettings()
        self.tokens = list(tokens)
        self.inputs = model_inputs(service)
        if self.settings.unnorm_key is not None:
            service.resolve_unnorm_key(self.settings.unnorm_key)  # fail at start, not later

    # -- connection set-up

    def open(self, query: Mapping[str, str]) -> Connection:
        """The connection's state from its query string; ProtocolError naming the parameter."""
        known = {"preset", "session_id", "method", "keep_ratio", "unnorm_key"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ProtocolError(f"query: unknown parameter(s) {unknown}; valid: {sorted(known)}")
        preset_name = query.get("preset", self.settings.preset)
        if preset_name not in PRESETS:
            raise ProtocolError(
                f"query.preset: unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}"
            )
        named = "session_id" in query
        sid = _session(query["session_id"], "query.session_id") if named else None
        pruning = None
        if "method" in query or "keep_ratio" in query:
            raw: dict[str, Any] = {}
            if "method" in query:
                raw["method"] = query["method"]
            if "keep_ratio" in query:
                try:
                    raw["keep_ratio"] = float(query["keep_ratio"])
                except ValueError:
                    raise ProtocolError("query.keep_ratio: not a number") from None
            pruning = _pruning(raw, self.service, "query")
        conn = Connection(
            session_id=sid or f"openpi-{uuid.uuid4().hex[:16]}",
            named=named,
            preset=PRESETS[preset_name],
            unnorm_key=self.settings.unnorm_key,
            pruning=pruning,
        )
        if "unnorm_key" in query:
            conn.unnorm_key = self._unnorm_key(query["unnorm_key"], "query.unnorm_key")
        # A client-named session may be a reconnect continuing its episode: keep its history.
        conn.new_episode = not named
        return conn

    def _unnorm_key(self, raw: Any, where: str) -> str:
        try:
            return self.service.resolve_unnorm_key(raw if isinstance(raw, str) else repr(raw))
        except ApiError as exc:
            raise ProtocolError(f"{where}: {exc.message.split(': ', 1)[-1]}") from None

    def metadata(self, conn: Connection) -> dict[str, Any]:
        """The first frame: what this server expects and how the connection is set up."""
        svc = self.service
        try:
            key = svc.resolve_unnorm_key(conn.unnorm_key)
            horizon = getattr(svc, "chunk_len", None) or 1  # OFT chunk, pi0 horizon
            action = {"horizon": horizon, "dim": svc.action_dims[key], "unnorm_key": key}
        except ApiError:  # several keys and none chosen: every frame must name one
            action = {"horizon": 1, "dim": None, "unnorm_key": None, "dims": svc.action_dims}
        return {
            "server": "vllm-vla-pruner",
            "protocol": "openpi-websocket",
            "model": svc.served_model_names[0],
            "session_id": conn.session_id,
            "preset": conn.preset.describe(),
            "presets": sorted(PRESETS),
            "model_inputs": {
                "cameras": [cam for cam, _ in conn.preset.cameras[: self.inputs.cameras]],
                "state_dim": self.inputs.state_dim,
                "image_size": self.inputs.image_size,
                "image_formats": "uint8 [0, 255] or float [0, 1]; HWC or CHW; 3 channels; "
                "resized by the server to image_size",
            },
            "ignored": ignored_inputs(conn.preset, self.inputs),
            "action": action,
            "pruning": {
                "connection": None if conn.pruning is None else conn.pruning.model_dump(),
                "defaults": dict(svc.pruning_defaults),
                "pruners": list(svc.pruners),
            },
            "reserved_observation_keys": ["session_id", "pruning", "unnorm_key"],
            "control": {
                "reset": {"endpoint": "reset"},
                "config": {"endpoint": "config", "pruning": {"method": "...", "keep_ratio": 0.5}},
            },
        }

    # -- messages

    def control(self, conn: Connection, msg: Mapping[str, Any]) -> dict[str, Any]:
        """``{"endpoint": "reset" | "config", ...}``; the reply acknowledges what is in force."""
        endpoint = msg.get("endpoint")
        allowed = {"endpoint", "session_id", "pruning", "unnorm_key"}
        unknown = sorted(str(k) for k in set(msg) - allowed)
        if unknown:
            raise ProtocolError(f"{endpoint}: unknown key(s) {unknown}; valid: {sorted(allowed)}")
        if endpoint not in ("reset", "config"):
            raise ProtocolError(f"endpoint: unknown {endpoint!r}; expected 'reset' or 'config'")
        if "session_id" in msg:
            conn.session_id = _session(msg["session_id"], "session_id")
            conn.named = True
        if "pruning" in msg:
            conn.pruning = _pruning(msg["pruning"], self.service, "pruning")
        if "unnorm_key" in msg:
            conn.unnorm_key = self._unnorm_key(msg["unnorm_key"], "unnorm_key")
        if endpoint == "reset":
            conn.new_episode = True
        return {
            "endpoint": endpoint,
            "session_id": conn.session_id,
            "new_episode": conn.new_episode,
            "pruning": None if conn.pruning is None else conn.pruning.model_dump(),
        }

    def decode(self, conn: Connection, data: bytes) -> tuple[str, Any]:
        """One binary frame -> ("control", reply) or ("infer", request kwargs); off the loop."""
        msg = unpackb(data)
        if isinstance(msg, Mapping) and "endpoint" in msg:
            return "control", self.control(conn, msg)
        obs = map_observation(msg, conn.preset, self.inputs, self.service.limits.max_image_pixels)
        sid, new_episode = conn.session_id, conn.new_episode
        if "session_id" in obs.extras:
            named = _session(obs.extras["session_id"], "session_id")
            if named != sid:
                sid, new_episode = named, False
        pruning = _merge(conn.pruning, _pruning(obs.extras.get("pruning"), self.service, "pruning"))
        key = conn.unnorm_key
        if "unnorm_key" in obs.extras:
            key = self._unnorm_key(obs.extras["unnorm_key"], "unnorm_key")
        views: dict[str, Any] = {"image": next(iter(obs.images.values()))}
        if getattr(self.service, "chunk_len", None) is not None:
            # A chunk model (OFT, pi0): the cameras in the model's order and the state (pi0:
            # slots the preset does not fill are masked cameras).
            views = {
                "images": list(obs.images.values()),
                "state": None if obs.state is None else [float(x) for x in obs.state],
            }
        return "infer", {
            **views,
            "instruction": obs.prompt,
            "unnorm_key": key,
            "pruning": pruning,
            "session_id": sid,
            "new_episode": new_episode,
        }

    async def infer(self, conn: Connection, request: dict[str, Any], t0: float) -> dict[str, Any]:
        if "images" in request:
            resp = await self.service.predict_chunk(**request)
            actions = np.asarray(resp.actions, dtype=np.float64)  # chunk x dim
        else:
            resp = await self.service.predict_image(**request)
            dim = self.service.action_dims[resp.unnorm_key]
            actions = np.asarray(resp.action, dtype=np.float64).reshape(-1, dim)
        if request["session_id"] == conn.session_id:
            conn.new_episode = False
        conn.frames += 1
        timing = resp.timing
        server_timing: dict[str, Any] = {"infer_ms": round((time.perf_counter() - t0) * 1e3, 3)}
        if conn.prev_total_ms is not None:
            server_timing["prev_total_ms"] = conn.prev_total_ms
        return {
            "actions": actions,
            "session_id": resp.session_id,
            "server_timing": server_timing,
            "policy_timing": {
                "infer_ms": timing.total_ms,
                "preprocess_ms": timing.preprocess_ms,
                "queue_ms": timing.queue_ms,
                "prefill_ms": timing.prefill_ms,
                "decode_ms": timing.decode_ms,
            },
            "pruning": resp.pruning.model_dump(),
        }

    # -- the connection loop

    async def serve(self, ws: WebSocket) -> None:
        if not authorized(ws.headers.get("authorization"), self.tokens):
            # Refused before accept: the handshake fails (HTTP 403), no metadata is sent.
            await ws.close(code=POLICY_VIOLATION, reason="unauthorized")
            return
        await ws.accept()
        try:
            try:
                conn = self.open(dict(ws.query_params))
                meta = self.metadata(conn)
            except (ProtocolError, ApiError) as exc:
                await self._fail(ws, str(getattr(exc, "message", exc)))
                return
            await ws.send_bytes(packb(meta))
            await self._loop(ws, conn)
        except WebSocketDisconnect:
            return

    async def _loop(self, ws: WebSocket, conn: Connection) -> None:
        # One receive is always outstanding, also during inference: a disconnect then cancels
        # the request (aborting it in the engine), and nothing is ever cancelled mid-receive.
        listen: asyncio.Future | None = None
        try:
            while True:
                if listen is None:
                    listen = asyncio.ensure_future(ws.receive())
                msg = await listen
                listen = None
                t0 = time.perf_counter()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                if data is None:
                    await self._fail(ws, "expected a binary msgpack frame, got a text frame")
                    return
                try:
                    kind, payload = await asyncio.to_thread(self.decode, conn, data)
                    if kind == "control":
                        reply = payload
                    else:
                        listen = asyncio.ensure_future(ws.receive())
                        work = asyncio.ensure_future(self.infer(conn, payload, t0))
                        await asyncio.wait([work, listen], return_when=asyncio.FIRST_COMPLETED)
                        if not work.done() and listen.result()["type"] == "websocket.disconnect":
                            work.cancel()
                            await asyncio.gather(work, return_exceptions=True)
                            return
                        reply = await work
                    out = await asyncio.to_thread(packb, reply)
                except (FrameError, ObservationError, ProtocolError) as exc:
                    await self._fail(ws, str(exc))
                    return
                except ApiError as exc:
                    if exc.status >= 500:
                        logger.warning("openpi: inference failed: %s", exc.message)
                    await self._fail(ws, exc.message)
                    return
                except Exception as exc:  # noqa: BLE001 - the robot hears why; others go on
                    logger.exception("openpi: connection %s crashed", conn.session_id)
                    await self._fail(ws, f"internal error: {type(exc).__name__}: {exc}")
                    return
                await ws.send_bytes(out)
                conn.prev_total_ms = round((time.perf_counter() - t0) * 1e3, 3)
        finally:
            if listen is not None and not listen.done():
                listen.cancel()

    @staticmethod
    async def _fail(ws: WebSocket, message: str) -> None:
        """openpi's error shape: a text frame, then close 1011."""
        if ws.application_state != WebSocketState.CONNECTED:
            return
        try:
            await ws.send_text(message)
            await ws.close(code=ERROR_CLOSE_CODE, reason="policy error"[:120])
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass


def _server(state: Any) -> OpenpiServer | None:
    return getattr(state, STATE_KEY, None)


def build_openpi_router() -> APIRouter:
    """WebSocket at ``/`` and ``/openpi``, ``GET /healthz`` (openpi's health route)."""
    router = APIRouter(tags=["openpi"])

    async def policy(websocket: WebSocket) -> None:
        server = _server(websocket.app.state)
        if server is None:
            await websocket.close(code=ERROR_CLOSE_CODE, reason="action service not ready")
            return
        await server.serve(websocket)

    router.add_api_websocket_route("/", policy, name="openpi_root")
    router.add_api_websocket_route(NAMED_PATH, policy, name="openpi")

    @router.get("/healthz")
    async def healthz(request: Request) -> Any:
        """200 once the policy is served and the engine answers its health check."""
        server = _server(request.app.state)
        if server is None:
            return JSONResponse(status_code=503, content={"status": "starting"})
        check = getattr(server.service.engine, "check_health", None)
        if check is not None:
            try:
                await check()
            except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
                return JSONResponse(
                    status_code=503, content={"status": f"engine unhealthy: {type(exc).__name__}"}
                )
        return JSONResponse(content={"status": "ok"})

    return router


def init_openpi_state(state: Any, service: Any, engine_client: Any, args: Any) -> OpenpiServer:
    """Build the server from the operator's settings; raises on a bad ``openpi`` setting."""
    vllm_config = getattr(engine_client, "vllm_config", None)
    settings = OpenpiSettings.from_additional_config(
        getattr(vllm_config, "additional_config", None)
    )
    server = OpenpiServer(service, settings, _api_tokens(args))
    setattr(state, STATE_KEY, server)
    logger.info(
        "vla_pruner: openpi WebSocket policy at / and %s (preset %s, auth %s)",
        NAMED_PATH,
        settings.preset,
        "on" if server.tokens else "off",
    )
    return server
