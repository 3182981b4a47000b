"""Request/response models of ``POST /v1/actions`` and the errors the route can answer.

The models are strict on purpose: a robot client that sends ``"keep_ratio": "0.5"`` or an
``instructions`` typo should hear about it at once (HTTP 422 naming the field) instead of
silently running with server defaults. The per-request pruning fields are checked by the
engine's own validators (``engine/settings.py``), the same ones that guard ``extra_args`` on
every vLLM route, so a value is accepted or refused alike everywhere. Checks that depend on
the served checkpoint (``unnorm_key``, a narrower pruner list) read the allowed values from
the pydantic validation context, so the same models validate in the API server, in a Ray Serve
ingress and in unit tests without an engine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from vllm_vla_pruner.engine.settings import (
    MAX_SESSION_ID_CHARS,
    InvalidPruningSetting,
    validate_keep_ratio,
    validate_method,
    validate_new_episode,
    validate_noise_seed,
    validate_num_steps,
    validate_session_id,
)

__all__ = [
    "MAX_INSTRUCTION_CHARS",
    "MAX_SESSION_ID_CHARS",
    "SESSION_ID_HEADER",
    "ActionChunkResponse",
    "ActionRequest",
    "ActionResponse",
    "ApiError",
    "ChunkInfo",
    "InfoResponse",
    "Pi0Info",
    "PruningReport",
    "PruningSettings",
    "RequestContext",
    "ServiceLimits",
    "Timing",
    "check_execute_steps",
    "check_model_inputs",
    "check_session_id",
    "parse_action_request",
    "validation_error_to_api_error",
]

#: Header that carries the robot episode id when the body has no ``session_id`` (vLLM's name).
SESSION_ID_HEADER = "X-Session-ID"
MAX_INSTRUCTION_CHARS = 2000
MiB = 1 << 20

# Keys of the pydantic validation context (see parse_action_request).
CTX_PRUNERS = "pruners"
CTX_UNNORM_KEYS = "unnorm_keys"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class ServiceLimits:
    """Request limits; the body limit is enforced by the HTTP layer, the rest by the service."""

    max_body_bytes: int = 8 * MiB
    max_image_bytes: int = 6 * MiB  # decoded; base64 of 6 MiB is exactly 8 MiB
    max_image_pixels: int = 4096 * 4096  # guards against decompression bombs
    timeout_s: float = field(
        default_factory=lambda: _env_float("VLA_PRUNER_REQUEST_TIMEOUT_S", 120.0)
    )


class ApiError(Exception):
    """An error that becomes ``{"error": {"field", "message", "type"}}`` with an HTTP status.

    One exception type for every refusal, so the FastAPI route, a Ray Serve deployment and
    tests all map errors the same way.
    """

    def __init__(
        self, status: int, message: str, field: str | None = None, type: str = "invalid_request"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.type = type

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "message": self.message, "type": self.type}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, field={self.field!r}, message={self.message!r})"


def _one_of(value: str, allowed: Collection[str] | None, what: str) -> str:
    """Check ``value`` against a server-provided set; no set (no context) means no check."""
    if allowed is not None and value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {sorted(allowed)}")
    return value


def _context_set(info: ValidationInfo, key: str) -> Collection[str] | None:
    ctx = info.context
    if isinstance(ctx, Mapping) and ctx.get(key) is not None:
        return ctx[key]
    return None


def _checked(check: Callable[..., Any], value: Any, **kwargs: Any) -> Any:
    """Run an engine validator; its reason becomes the ValueError pydantic reports under the
    field's own path (``pruning.keep_ratio``), not the engine's key (``vla_keep_ratio``)."""
    try:
        return check(value, **kwargs)
    except InvalidPruningSetting as exc:
        raise ValueError(exc.reason) from None


class PruningSettings(BaseModel):
    """Per-request pruning knobs; omitted ones fall back to the server's engine flags."""

    model_config = ConfigDict(extra="forbid")

    method: StrictStr | None = Field(
        default=None, description="A pruner of the registry (GET /v1/actions/info lists them)."
    )
    keep_ratio: float | None = Field(
        default=None, description="Fraction of visual tokens kept after layer K, 0 < r <= 1."
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        return _checked(validate_method, v, allowed=_context_set(info, CTX_PRUNERS))

    @field_validator("keep_ratio", mode="before")
    @classmethod
    def _ratio_range(cls, v: Any) -> float | None:
        return None if v is None else _checked(validate_keep_ratio, v)


class ActionRequest(BaseModel):
    """Body of ``POST /v1/actions``: one camera frame and instruction -> one action (AR
    OpenVLA), or camera views + state + instruction -> an action chunk (OpenVLA-OFT)."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = Field(default=None, description="Served model name; default: it.")
    image: StrictStr | None = Field(
        default=None,
        description="AR checkpoints: base64 PNG/JPEG bytes, or a data: URL "
        "(data:image/png;base64,...).",
    )
    images: dict[StrictStr, StrictStr] | None = Field(
        default=None,
        description="OFT checkpoints: camera name -> image as in `image`, every camera of "
        "GET /v1/actions/info.",
    )
    state: list[Any] | None = Field(
        default=None,
        description="OFT and pi0 checkpoints: the robot state, un-normalised, state_dim "
        "numbers (pi0.5: the server bins it into the prompt, as openpi).",
    )
    instruction: StrictStr = Field(description="Task in words, e.g. 'pick up the red block'.")
    unnorm_key: StrictStr | None = Field(
        default=None, description="norm_stats key used to un-normalise the action."
    )
    session_id: StrictStr | None = Field(
        default=None, description="Robot episode id (also the X-Session-ID header)."
    )
    new_episode: bool = Field(
        default=False, description="Reset this session's temporal pruning history first."
    )
    pruning: PruningSettings | None = None
    execute_steps: int | None = Field(
        default=None,
        description="OFT checkpoints: how many of the chunk's steps the robot executes before "
        "asking again; `actions` then holds only those first rows (1..chunk; default: the whole "
        "chunk). The engine still computes the whole chunk in one forward. AR checkpoints "
        "answer one action: only 1 is accepted.",
    )
    noise_seed: int | None = Field(
        default=None,
        description="Flow-matching checkpoints (pi0): seed of the chunk's starting noise; the "
        "same seed and inputs give the same chunk. Default: a fresh seed per request.",
    )
    num_steps: int | None = Field(
        default=None,
        description="Flow-matching checkpoints (pi0): Euler steps (default: the checkpoint's).",
    )

    @field_validator("noise_seed", mode="before")
    @classmethod
    def _seed_range(cls, v: Any) -> int | None:
        return None if v is None else _checked(validate_noise_seed, v)

    @field_validator("num_steps", mode="before")
    @classmethod
    def _steps_range(cls, v: Any) -> int | None:
        return None if v is None else _checked(validate_num_steps, v)

    @field_validator("execute_steps", mode="before")
    @classmethod
    def _positive_steps(cls, v: Any) -> int | None:
        """A JSON integer >= 1: ``"4"``, ``4.0`` and ``true`` are client bugs."""
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be an integer >= 1, got {v!r}")
        return v

    @field_validator("image")
    @classmethod
    def _image_present(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must be a non-empty base64 string or data: URL")
        return v

    @field_validator("images")
    @classmethod
    def _images_present(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one camera")
        for cam, data in v.items():
            if not data.strip():
                raise ValueError(f"camera {cam!r}: must be a non-empty base64 string")
        return v

    @field_validator("state")
    @classmethod
    def _finite_state(cls, v: list[Any] | None) -> list[float] | None:
        """Numbers only (not strings or booleans), all finite: NaN would poison the chunk."""
        if v is None:
            return v
        out = []
        for i, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ValueError(f"element {i} is not a number: {x!r}")
            if not math.isfinite(x):
                raise ValueError(f"element {i} is not finite: {x!r}")
            out.append(float(x))
        return out

    @field_validator("instruction")
    @classmethod
    def _instruction_text(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must be a non-empty string")
        if len(v) > MAX_INSTRUCTION_CHARS:
            raise ValueError(f"is longer than {MAX_INSTRUCTION_CHARS} characters")
        return v

    @field_validator("unnorm_key")
    @classmethod
    def _known_unnorm_key(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        return _one_of(v, _context_set(info, CTX_UNNORM_KEYS), "unnorm_key")

    @field_validator("session_id")
    @classmethod
    def _session_text(cls, v: str | None) -> str | None:
        return None if v is None else check_session_id(v)

    @field_validator("new_episode", mode="before")
    @classmethod
    def _episode_flag(cls, v: Any) -> bool:
        return _checked(validate_new_episode, v)


def check_session_id(v: Any) -> str:
    """A session id (body or ``X-Session-ID`` header); ValueError with the bare reason."""
    return _checked(validate_session_id, v)


class PruningReport(BaseModel):
    """What pruning did for this request (or, where the engine does not say, what was asked)."""

    method: str | None = Field(description="Pruner used; null: the engine's default.")
    keep_ratio: float | None = Field(description="Keep ratio used; null: the engine's default.")
    visual_tokens_total: int
    visual_tokens_kept: int | None = Field(
        description="Visual tokens the layers >= K saw; null if unknown."
    )
    warmup: bool | None = Field(
        default=None, description="True: the frame ran unpruned to fill history; null: unknown."
    )
    history_evicted: bool | None = Field(
        default=None,
        description="True: the robot's action history should have been warm but was gone "
        "(session limit, idle timeout or a worker restart); the frame was pruned by the "
        "method's semantic half alone. Null: unknown.",
    )
    source: Literal["worker", "requested"] = Field(
        description="'worker': counts reported by the engine's forward; 'requested': the "
        "engine reported nothing, only the request's settings are known."
    )


class Timing(BaseModel):
    """Milliseconds; engine-side parts are null when the engine does not record stats."""

    total_ms: float
    preprocess_ms: float | None = None
    queue_ms: float | None = None
    prefill_ms: float | None = None
    decode_ms: float | None = None


class ActionResponse(BaseModel):
    """Body of a successful ``POST /v1/actions``."""

    id: str
    model: str
    action: list[float] = Field(description="One float per action dimension, un-normalised.")
    action_token_ids: list[int]
    unnorm_key: str
    session_id: str | None
    pruning: PruningReport
    timing: Timing


class ActionChunkResponse(BaseModel):
    """Body of a successful ``POST /v1/actions`` to a chunk (OFT, pi0) checkpoint."""

    id: str
    model: str
    actions: list[list[float]] = Field(
        description="chunk x action_dim, un-normalised; row i is the action for step t+i; "
        "only the first `execute_steps` rows when the request set it."
    )
    chunk: int
    action_dim: int
    unnorm_key: str
    session_id: str | None
    pruning: PruningReport
    timing: Timing
    noise_seed: int | None = Field(
        default=None,
        description="Flow-matching checkpoints (pi0): the seed of this chunk's starting noise "
        "(the request's, or the one the server drew); sending it back reproduces the chunk.",
    )


class ChunkInfo(BaseModel):
    """What an OFT checkpoint takes and answers (``GET /v1/actions/info``'s ``oft``)."""

    cameras: list[str] = Field(description="`images` keys, in the model's view order.")
    state_dim: int = Field(description="Length of `state`; 0: the model takes no state.")
    chunk: int
    action_dim: int
    normalization: str = Field(description="bounds_q99 (q01/q99) or bounds (min/max).")
    unnorm_key: str
    film: bool = Field(
        default=False, description="FiLM language conditioning of the vision tower: not supported."
    )


class Pi0Info(BaseModel):
    """What a pi0-style checkpoint takes and answers (``GET /v1/actions/info``'s ``pi0``)."""

    cameras: list[str] = Field(
        description="`images` keys in prefix order; a camera left out is a masked camera "
        "(at least one must be sent)."
    )
    state_dim: int = Field(description="Length of `state` (un-normalised).")
    horizon: int = Field(description="Rows of the chunk in `actions`.")
    action_dim: int
    num_steps: int = Field(description="Default Euler steps (`num_steps` overrides).")
    normalization: str = Field(
        description="z-score (mean/std) for pi0; quantile (q01/q99 -> [-1, 1]) for pi0.5."
    )
    unnorm_key: str = Field(description="The checkpoint's norm-stats asset id.")
    noise_seed: bool = Field(default=True, description="`noise_seed` makes a chunk reproducible.")
    pi05_adaptive_norm: bool = Field(
        default=False,
        description="True for a pi0.5 checkpoint (time-conditioned adaptive RMSNorm in the "
        "action expert; `state` is still sent raw: the server bins it into the prompt).",
    )


class InfoResponse(BaseModel):
    """Body of ``GET /v1/actions/info``: what a client needs to build valid requests."""

    model: str
    served_model_names: list[str]
    action_dims: dict[str, int]
    default_unnorm_key: str | None
    visual_tokens: int
    image_size: int
    pruners: list[str]
    defaults: dict[str, Any]
    limits: dict[str, int]
    oft: ChunkInfo | None = Field(
        default=None,
        description="Set for OpenVLA-OFT checkpoints (send `images` + `state`, get `actions`); "
        "null: send `image`, get `action`.",
    )
    pi0: Pi0Info | None = Field(
        default=None,
        description="Set for pi0-style flow-matching checkpoints (send `images` + `state`, "
        "optionally `noise_seed`; get `actions`).",
    )


def validation_error_to_api_error(exc: ValidationError) -> ApiError:
    """First pydantic error -> ApiError naming the offending field (dotted path)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return ApiError(422, "invalid request body", field=None)
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ())]
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        # Name every unknown field at once: the client usually has a whole set of typos.
        extra = [
            ".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"
        ]
        names = ", ".join(repr(n) for n in extra)
        return ApiError(422, f"unknown field(s) {names}", field=extra[0])
    if kind == "missing":
        return ApiError(422, f"field required: {'.'.join(loc)}", field=".".join(loc) or None)
    if kind == "model_type" and not loc:
        return ApiError(422, "request body must be a JSON object", field=None)
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    field = ".".join(loc) or None
    return ApiError(422, f"{field}: {msg}" if field else msg, field=field)


def check_execute_steps(steps: int | None, chunk: int) -> int:
    """The rows of a ``chunk``-step answer the robot gets: ``execute_steps`` (1..chunk) or the
    whole chunk; ApiError (422) naming ``execute_steps`` otherwise."""
    if steps is None:
        return chunk
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= chunk:
        raise ApiError(
            422,
            f"execute_steps: must be an integer in [1, {chunk}] (this model's chunk), "
            f"got {steps!r}",
            field="execute_steps",
        )
    return steps


def check_model_inputs(
    req: ActionRequest,
    cameras: Sequence[str] | None = None,
    state_dim: int = 0,
    chunk: int | None = None,
    flow: bool = False,
) -> None:
    """The body's inputs against what the served model takes; ApiError (422) naming the field.

    ``cameras`` None: a single-frame (AR OpenVLA) model, which takes ``image`` only and
    answers one action (``execute_steps`` 1 at most). Else an OFT model: ``images`` with
    exactly these cameras, ``state`` of ``state_dim`` numbers, ``execute_steps`` up to
    ``chunk`` (when known). ``flow``: a pi0-style model, whose cameras may be left out (a
    masked camera, at least one present) and which takes ``noise_seed`` / ``num_steps``.
    """
    if not flow:
        for name in ("noise_seed", "num_steps"):
            if getattr(req, name) is not None:
                raise ApiError(422, f"{name}: this model is not a flow-matching model", field=name)
    if cameras is None or chunk is not None:
        check_execute_steps(req.execute_steps, 1 if cameras is None else chunk)
    if cameras is None:
        if req.images is not None:
            raise ApiError(
                422,
                "images: this model takes one camera frame in 'image' (an autoregressive "
                "OpenVLA checkpoint), not a chunk request",
                field="images",
            )
        if req.state is not None:
            raise ApiError(422, "state: this model takes no state", field="state")
        if req.image is None:
            raise ApiError(422, "field required: image", field="image")
        return
    names = list(cameras)
    if req.image is not None:
        raise ApiError(
            422,
            f"image: this model (OpenVLA-OFT) takes 'images' with the cameras {names} "
            "and answers a chunk in 'actions'",
            field="image",
        )
    if req.images is None:
        raise ApiError(422, f"field required: images (cameras {names})", field="images")
    unknown = [c for c in req.images if c not in names]
    if unknown:
        raise ApiError(
            422,
            f"images.{unknown[0]}: unknown camera; this model's cameras are {names}",
            field=f"images.{unknown[0]}",
        )
    missing = [c for c in names if c not in req.images]
    if missing and flow and len(missing) < len(names):
        missing = []  # pi0: a camera left out is a masked camera
    if missing:
        raise ApiError(
            422,
            f"images.{missing[0]}: missing camera; this model's cameras are {names}",
            field=f"images.{missing[0]}",
        )
    if not state_dim:
        if req.state is not None:
            raise ApiError(422, "state: this model takes no state", field="state")
        return
    if req.state is None:
        raise ApiError(422, f"field required: state ({state_dim} numbers)", field="state")
    if len(req.state) != state_dim:
        raise ApiError(
            422, f"state: must be {state_dim} numbers, got {len(req.state)}", field="state"
        )


def parse_action_request(
    data: Any,
    *,
    pruners: Collection[str] | None = None,
    unnorm_keys: Collection[str] | None = None,
    cameras: Sequence[str] | None = None,
    state_dim: int = 0,
    chunk: int | None = None,
    flow: bool = False,
) -> ActionRequest:
    """Validate a decoded JSON body; raise ApiError (422) naming the first bad field.

    ``cameras`` / ``state_dim`` / ``chunk``: the served OFT model's inputs and chunk length
    (None: a single-frame model).
    """
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object", field=None)
    ctx = {CTX_PRUNERS: pruners, CTX_UNNORM_KEYS: unnorm_keys}
    try:
        req = ActionRequest.model_validate(data, context=ctx)
    except ValidationError as exc:
        raise validation_error_to_api_error(exc) from None
    check_model_inputs(req, cameras, state_dim, chunk, flow)
    return req


@dataclass(frozen=True)
class RequestContext:
    """What an action body is validated against: the served model's inputs (cameras, state
    size, chunk length, flow matching) and the values it allows (pruners, unnorm keys).

    ``ActionService.request_context()`` builds it once per model; a fleet replica hands it
    to the ingress (it pickles), so the single server, the replica and the ingress all
    validate a body with the one :func:`parse_action_request` and the same inputs.
    """

    pruners: frozenset[str] | None = None
    unnorm_keys: frozenset[str] | None = None
    cameras: tuple[str, ...] | None = None  # None: a single-frame (``image``) model
    state_dim: int = 0
    chunk: int | None = None
    flow: bool = False

    def parse(self, data: Any) -> ActionRequest:
        """:func:`parse_action_request` with this model's inputs."""
        return parse_action_request(
            data,
            pruners=self.pruners,
            unnorm_keys=self.unnorm_keys,
            cameras=self.cameras,
            state_dim=self.state_dim,
            chunk=self.chunk,
            flow=self.flow,
        )
