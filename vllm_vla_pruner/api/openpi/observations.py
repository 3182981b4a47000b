"""openpi observation dicts -> the model's camera images, state and instruction.

A :class:`ObservationPreset` names, for one robot convention, which observation key holds
each camera (in the model's camera order; the first is the primary camera), which keys hold
the proprioceptive state and which the prompt. Presets follow openpi's examples (LIBERO,
DROID, ALOHA) plus ``metaworld`` for the embedded policy. What the served model cannot use
(cameras beyond its count, state for a model that takes none) is named in the metadata frame
and ignored, not refused, so an unchanged openpi robot script keeps working.

Every refusal is an :class:`ObservationError` whose message starts with the key
(``observation/image: ...``): the text frame the robot sees names what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from vllm_vla_pruner.api.protocol import MAX_INSTRUCTION_CHARS

__all__ = [
    "PRESETS",
    "MappedObservation",
    "ModelInputs",
    "ObservationError",
    "ObservationPreset",
    "key_name",
    "map_observation",
    "to_rgb_image",
]

KeyPath = tuple[str, ...]


class ObservationError(ValueError):
    """An observation the model cannot be run on; ``key`` is the offending key path."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def key_name(path: KeyPath) -> str:
    """``("images", "cam_high")`` -> ``images.cam_high`` (openpi's flat keys contain '/')."""
    return ".".join(path)


@dataclass(frozen=True)
class ObservationPreset:
    """Where one robot convention puts its cameras, state and prompt."""

    name: str
    cameras: tuple[tuple[str, KeyPath], ...]  # (camera name, key path), model order
    state: tuple[KeyPath, ...] = ()  # concatenated in this order
    prompt: KeyPath = ("prompt",)
    layout: str = "HWC"  # what this convention's clients send (both layouts are accepted)
    note: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cameras": {cam: key_name(p) for cam, p in self.cameras},
            "state": [key_name(p) for p in self.state],
            "prompt": key_name(self.prompt),
            "layout": self.layout,
            "note": self.note,
        }


PRESETS: dict[str, ObservationPreset] = {
    p.name: p
    for p in (
        ObservationPreset(
            "libero",
            (("agentview", ("observation/image",)), ("wrist", ("observation/wrist_image",))),
            (("observation/state",),),
            note="openpi examples/libero: uint8 HWC 224x224, frames rotated 180 degrees",
        ),
        ObservationPreset(
            "droid",
            (
                ("exterior", ("observation/exterior_image_1_left",)),
                ("wrist", ("observation/wrist_image_left",)),
            ),
            (("observation/joint_position",), ("observation/gripper_position",)),
            note="openpi examples/droid: uint8 HWC 224x224",
        ),
        ObservationPreset(
            "aloha",
            tuple(
                (cam, ("images", cam))
                for cam in ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")
            ),
            (("state",),),
            layout="CHW",
            note="openpi examples/aloha_real: uint8 CHW 224x224 in a nested 'images' dict",
        ),
        ObservationPreset(
            "metaworld",
            (("corner", ("observation/image",)),),
            (),
            note="the embedded Meta-World policy: one fixed camera, no state",
        ),
    )
}


@dataclass(frozen=True)
class ModelInputs:
    """What the served model takes: how many cameras and how much state (0: none)."""

    cameras: int = 1
    state_dim: int = 0
    image_size: int | None = None
    # pi0: camera slots a preset does not fill are masked cameras (not sent), not an error.
    optional_cameras: bool = False


@dataclass
class MappedObservation:
    """One observation as the model takes it."""

    images: dict[str, Image.Image]  # camera name -> RGB, model order
    prompt: str
    state: np.ndarray | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # reserved keys (session_id, ...)


def ignored_inputs(preset: ObservationPreset, model: ModelInputs) -> dict[str, str]:
    """Keys of ``preset`` the model does not read, each with the reason (for the metadata)."""
    out: dict[str, str] = {}
    for cam, path in preset.cameras[model.cameras :]:
        out[key_name(path)] = f"camera {cam!r} not used: the model takes {model.cameras} camera(s)"
    if model.state_dim == 0:
        for path in preset.state:
            out[key_name(path)] = "state not used: the model takes no proprioceptive state"
    return out


def _lookup(obs: Mapping[str, Any], path: KeyPath) -> Any:
    node: Any = obs
    for i, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            where = key_name(path[: i + 1])
            raise ObservationError(where, "missing from the observation")
        node = node[part]
    return node


def to_rgb_image(value: Any, key: str, max_pixels: int | None = None) -> Image.Image:
    """A camera frame as openpi clients send it -> RGB image.

    Accepted: HWC or CHW with 3 channels, uint8 in [0, 255] or float in [0, 1] (openpi's
    ``image_tools.convert_to_uint8`` range); anything else is refused naming dtype/shape.
    """
    if not isinstance(value, np.ndarray):
        raise ObservationError(
            key, f"expected an image array (uint8 or float, HWC or CHW), got {type(value).__name__}"
        )
    arr = value
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ObservationError(
            key, f"shape {tuple(arr.shape)} is not an image; expected (H, W, 3) or (3, H, W)"
        )
    if arr.shape[-1] != 3:
        arr = np.transpose(arr, (1, 2, 0))
    h, w = arr.shape[:2]
    if h < 1 or w < 1 or (max_pixels is not None and h * w > max_pixels):
        raise ObservationError(key, f"{w}x{h} pixels outside 1..{max_pixels}")
    if arr.dtype == np.uint8:
        rgb = arr
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ObservationError(key, f"float image ({arr.dtype}) values must be in [0, 1]")
        rgb = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ObservationError(
            key, f"dtype {arr.dtype} not accepted; send uint8 [0, 255] or float [0, 1]"
        )
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")


def _prompt(value: Any, key: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ObservationError(key, "not valid UTF-8 text") from None
    if not isinstance(value, str):
        raise ObservationError(key, f"expected a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ObservationError(key, "must be a non-empty string")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ObservationError(key, f"is longer than {MAX_INSTRUCTION_CHARS} characters")
    return text


def _state(obs: Mapping[str, Any], preset: ObservationPreset, dim: int) -> np.ndarray:
    parts = []
    for path in preset.state:
        value = _lookup(obs, path)
        arr = np.asarray(value) if isinstance(value, (np.ndarray, list, float, int)) else None
        if arr is None or arr.dtype.kind not in "fiub":
            raise ObservationError(key_name(path), "expected a numeric array")
        parts.append(arr.astype(np.float32).reshape(-1))
    state = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    names = " + ".join(key_name(p) for p in preset.state)
    if state.shape[0] != dim:
        raise ObservationError(names, f"has {state.shape[0]} values, the model takes {dim}")
    if not np.all(np.isfinite(state)):
        raise ObservationError(names, "values must be finite (no NaN or infinity)")
    return state


#: Observation keys that are not robot data: settings a client may send with a frame.
RESERVED_KEYS = ("session_id", "pruning", "unnorm_key")


def map_observation(
    obs: Any,
    preset: ObservationPreset,
    model: ModelInputs,
    max_pixels: int | None = None,
) -> MappedObservation:
    """Pick and check what the model reads; keys it does not read are left alone."""
    if not isinstance(obs, Mapping):
        raise ObservationError("(observation)", f"expected a map, got {type(obs).__name__}")
    if model.cameras > len(preset.cameras) and not model.optional_cameras:
        raise ObservationError(
            "(preset)",
            f"preset {preset.name!r} has {len(preset.cameras)} camera(s), "
            f"the model takes {model.cameras}",
        )
    images = {
        cam: to_rgb_image(_lookup(obs, path), key_name(path), max_pixels)
        for cam, path in preset.cameras[: model.cameras]
    }
    prompt = _prompt(_lookup(obs, preset.prompt), key_name(preset.prompt))
    state = _state(obs, preset, model.state_dim) if model.state_dim else None
    extras = {k: obs[k] for k in RESERVED_KEYS if k in obs}
    return MappedObservation(images, prompt, state, extras)
