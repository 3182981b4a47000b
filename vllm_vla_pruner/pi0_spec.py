"""What a pi0-style checkpoint directory says, as a plain dataclass (no vLLM import).

Layout (``vla-pruner checkpoint --preset tiny-pi0|bench-pi0|bench-pi0-wide|tiny-pi05|bench-pi05``
writes it):

* ``model.safetensors``: every tensor under the name openpi's PyTorch port gives it
  (``examples/convert_jax_model_to_pytorch.py`` -> ``PI0Pytorch``): the SigLIP tower
  ``paligemma_with_expert.paligemma.model.vision_tower.vision_model.*`` (HF SigLIP names, all
  layers and ``post_layernorm`` are used), the projector ``...paligemma.model.
  multi_modal_projector.linear``, the prefix LM ``...paligemma.model.language_model.*`` (HF
  Gemma names), the action expert ``paligemma_with_expert.gemma_expert.model.*`` (same names,
  no embedding table) and pi0's heads ``state_proj``, ``action_in_proj``,
  ``action_time_mlp_in``, ``action_time_mlp_out``, ``action_out_proj``. LeRobot's ``pi0``
  loads the same names under a ``model.`` prefix. We follow openpi's because it is the
  reference implementation the LeRobot port was converted from. pi0.5 (``pi0.pi05`` true,
  openpi's ``Pi0Config.pi05``): no ``state_proj`` / ``action_time_mlp_*``; ``time_mlp_in``,
  ``time_mlp_out`` instead, and every expert RMSNorm is adaptive (``...input_layernorm.dense``,
  ``...post_attention_layernorm.dense``, ``...model.norm.dense``: weight [3 W, W] and bias,
  no ``.weight`` scale), as openpi's ``convert_jax_model_to_pytorch.py`` names them.
* ``config.json``: openpi writes only ``action_dim``, ``action_horizon``,
  ``paligemma_variant``, ``action_expert_variant`` and ``precision`` (named Gemma sizes); we
  keep those keys in a ``pi0`` section and add the shapes of reduced variants. The top level
  is an OpenVLA-style HF config (``model_type`` ``openvla``, a single SigLIP ``vision_towers``
  entry, the prefix LM's shapes in ``text_config``) so that vLLM parses it offline with its own
  config shim and the plugin's image processing, with ``architectures:
  [Pi0ForActionPrediction]``.
* ``assets/<asset_id>/norm_stats.json``: openpi's normalisation statistics file
  (``{"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}``): pi0 z-scores with
  mean/std, pi0.5 maps q01/q99 to [-1, 1] (openpi's ``use_quantile_norm`` for every model
  type but pi0).
* tokenizer files: a small Llama-like tokenizer the project builds offline (PaliGemma's
  SentencePiece model cannot be shipped); prompts are openpi's (:func:`pi0_prompt_token_ids`):
  pi0 ``BOS + text + "\\n"``, pi0.5 ``BOS + "Task: {text}, State: {bins};\\nAction: "``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PI0_ARCH = "Pi0ForActionPrediction"
#: pi0's camera slots, in prefix order (openpi's ``IMAGE_KEYS``).
PI0_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
NORM_STATS_FILE = "norm_stats.json"
#: pi0.5's state bins over [-1, 1] (openpi's ``PaligemmaTokenizer``).
PI05_STATE_BINS = 256


@dataclass(frozen=True)
class Pi0Spec:
    """The pi0 contract of a checkpoint: cameras, horizon, dims, expert shape, statistics."""

    cameras: tuple[str, ...]
    horizon: int  # H action tokens
    action_dim: int  # the model's (padded) action/state width, openpi's 32
    robot_action_dim: int  # leading dims of the chunk that are the robot's actions
    state_dim: int  # leading dims of the padded state that are the robot's state
    max_token_len: int  # language slots (pi0: 48, pi0.5: 200)
    num_steps: int  # default Euler steps
    expert_width: int
    expert_mlp: int
    asset_id: str
    pi05: bool = False  # pi0.5: adaptive-norm expert, state in the prompt, quantile stats

    def __post_init__(self) -> None:
        if min(self.horizon, self.action_dim, self.robot_action_dim, self.num_steps) < 1:
            raise ValueError(f"invalid pi0 shape: {self}")
        if self.robot_action_dim > self.action_dim or self.state_dim > self.action_dim:
            raise ValueError("robot action/state dims must fit in the model's action_dim")
        if not 1 <= len(self.cameras) <= 3:
            raise ValueError("pi0 takes 1 to 3 cameras")

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    @property
    def suffix_len(self) -> int:
        """Expert rows per request: pi0's state token and H action tokens (pi0.5: the H
        action tokens only, its state is in the prompt)."""
        return self.horizon if self.pi05 else 1 + self.horizon

    @property
    def normalization(self) -> str:
        """How state and actions are normalised: openpi's z-score for pi0, its quantile
        normalisation (q01/q99 -> [-1, 1]) for every other model type (pi0.5)."""
        return "quantile (q01/q99 -> [-1, 1])" if self.pi05 else "z-score (mean/std)"


def is_pi0_config(config: Mapping[str, Any]) -> bool:
    return isinstance(config.get("pi0"), Mapping)


def is_pi0_checkpoint(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    with open(path) as f:
        return is_pi0_config(json.load(f))


def spec_from_config(config: Mapping[str, Any]) -> Pi0Spec:
    raw = config["pi0"]
    pi05 = bool(raw.get("pi05", False))
    return Pi0Spec(
        cameras=tuple(raw.get("cameras", PI0_CAMERAS)),
        horizon=int(raw["action_horizon"]),
        action_dim=int(raw["action_dim"]),
        robot_action_dim=int(raw["robot_action_dim"]),
        state_dim=int(raw["state_dim"]),
        max_token_len=int(raw.get("max_token_len", 200 if pi05 else 48)),
        num_steps=int(raw.get("num_steps", 10)),
        expert_width=int(raw["expert"]["width"]),
        expert_mlp=int(raw["expert"]["mlp_dim"]),
        asset_id=str(raw["asset_id"]),
        pi05=pi05,
    )


@lru_cache(maxsize=8)
def pi0_spec(model_dir: str | Path) -> Pi0Spec:
    with open(Path(model_dir) / "config.json") as f:
        return spec_from_config(json.load(f))


def load_norm_stats(model_dir: str | Path, spec: Pi0Spec) -> dict[str, dict[str, list[float]]]:
    """openpi's ``assets/<asset_id>/norm_stats.json`` (``state`` and ``actions`` entries); the
    fields the model's normalisation reads (:meth:`Pi0Normalizer.fields`) must be there."""
    path = Path(model_dir) / "assets" / spec.asset_id / NORM_STATS_FILE
    with open(path) as f:
        stats = json.load(f)["norm_stats"]
    for key, dim in (("state", spec.state_dim), ("actions", spec.robot_action_dim)):
        for field in Pi0Normalizer.fields(spec):
            if len(stats.get(key, {}).get(field) or ()) != dim:
                raise ValueError(f"{path}: {key}.{field} must have {dim} numbers")
    return stats


class Pi0Normalizer:
    """openpi's ``Normalize``/``Unnormalize`` of state and actions, with openpi's formulas
    (float64): pi0's z-score ``(x - mean) / (std + 1e-6)``, pi0.5's quantiles
    ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1`` (not clipped, as openpi). The robot's dims are
    normalised, the padding to ``action_dim`` is zeros in, dropped out."""

    @staticmethod
    def fields(spec: Pi0Spec) -> tuple[str, str]:
        """The norm-stats fields the model reads: q01/q99 for pi0.5, mean/std for pi0."""
        return ("q01", "q99") if spec.pi05 else ("mean", "std")

    def __init__(self, spec: Pi0Spec, stats: Mapping[str, Mapping[str, list[float]]]) -> None:
        self.spec = spec
        keys = self.fields(spec)
        self._state = [torch.tensor(stats["state"][k], dtype=torch.float64) for k in keys]
        self._act = [torch.tensor(stats["actions"][k], dtype=torch.float64) for k in keys]

    def _normalize(self, x: Any, stats: list[torch.Tensor]) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float64)
        if self.spec.pi05:
            q01, q99 = stats
            return (x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
        mean, std = stats
        return (x - mean) / (std + 1e-6)

    def normalized_state(self, state: Any) -> torch.Tensor:
        """Raw robot state [..., state_dim] -> normalised, unpadded (float64)."""
        return self._normalize(state, self._state)

    def state(self, state: Any) -> torch.Tensor:
        """Raw robot state [..., state_dim] -> the model's padded, normalised state (float32
        [..., action_dim])."""
        return self._pad(self.normalized_state(state))

    def state_bins(self, state: Sequence[float]) -> list[int]:
        """pi0.5's prompt state: the normalised state's 256-bin indices (openpi's
        ``np.digitize(s, np.linspace(-1, 1, 257)[:-1]) - 1``: -1 below -1, 255 from
        1 - 2/256 up; float64 like openpi's numpy normalisation)."""
        s = self.normalized_state(state).numpy()
        edges = np.linspace(-1.0, 1.0, PI05_STATE_BINS + 1)[:-1]
        return [int(b) for b in np.digitize(s, bins=edges) - 1]

    def normalize_actions(self, actions: Any) -> torch.Tensor:
        """The inverse of :meth:`actions`: the robot's chunk [..., robot_action_dim] -> the
        model's padded, normalised chunk (float32 [..., action_dim]); training targets."""
        return self._pad(self._normalize(actions, self._act))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*x.shape[:-1], self.spec.action_dim, dtype=torch.float64)
        out[..., : x.shape[-1]] = x
        return out.float()

    def actions(self, x: torch.Tensor) -> torch.Tensor:
        """The model's chunk [H, action_dim] -> the robot's actions [H, robot_action_dim]."""
        x = x[..., : self.spec.robot_action_dim].double().cpu()
        if self.spec.pi05:
            q01, q99 = self._act
            return (x + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
        mean, std = self._act
        return x * (std + 1e-6) + mean


@lru_cache(maxsize=8)
def pi0_normalizer(model_dir: str | Path) -> Pi0Normalizer:
    """The checkpoint's normaliser (its spec and ``norm_stats.json``), loaded once."""
    spec = pi0_spec(model_dir)
    return Pi0Normalizer(spec, load_norm_stats(model_dir, spec))


def pi0_noise(seed: int, horizon: int, action_dim: int) -> torch.Tensor:
    """The flow's starting point x_1 ~ N(0, I), float32 [H, action_dim], from a request's noise
    seed (CPU generator: the same on every device and in the reference)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(horizon, action_dim, generator=gen, dtype=torch.float32)


def pi05_prompt_text(instruction: str, state_bins: Sequence[int]) -> str:
    """pi0.5's prompt text (openpi's ``PaligemmaTokenizer`` with a discrete state)."""
    text = instruction.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {text}, State: {' '.join(str(int(b)) for b in state_bins)};\nAction: "


def pi0_prompt_token_ids(
    tokenizer: Any,
    instruction: str,
    max_token_len: int,
    state_bins: Sequence[int] | None = None,
) -> list[int]:
    """openpi's prompt, at most ``max_token_len`` tokens (openpi truncates likewise). pi0
    (``state_bins`` None): the cleaned instruction with BOS, then ``"\n"`` encoded on its own;
    pi0.5: BOS + :func:`pi05_prompt_text` (``state_bins``: :meth:`Pi0Normalizer.state_bins`).
    Padding is not sent: pi0 masks it out of every key set and position count, so it cannot
    change the chunk."""
    if state_bins is not None:
        text = pi05_prompt_text(instruction, state_bins)
        ids = list(tokenizer.encode(text, add_special_tokens=True))
    else:
        text = instruction.strip().replace("_", " ").replace("\n", " ")
        ids = list(tokenizer.encode(text, add_special_tokens=True))
        ids += list(tokenizer.encode("\n", add_special_tokens=False))
    return [int(t) for t in ids[:max_token_len]]


def resize_with_pad(image: Image.Image, height: int, width: int) -> Image.Image:
    """openpi's camera resize: the image scaled (bilinear) by the larger of its two side
    ratios so that it fits ``height`` x ``width`` with its aspect ratio kept, centred on
    black; an image of that size already comes back as is.

    Why: openpi's robots and policies resize every camera this way
    (``openpi_client.image_tools.resize_with_pad``, tf.image.resize_with_pad's behaviour), so
    a pi0 checkpoint was trained on padded frames; stretching a 4:3 camera to the square
    tower would show it a geometry it never saw. A side that would round to 0 pixels is kept
    at 1 (openpi fails there instead); everything else is pixel-for-pixel openpi's (test).
    """
    w, h = image.size
    if (w, h) == (width, height):
        return image
    scale = max(w / width, h / height)
    new_w, new_h = max(1, int(w / scale)), max(1, int(h / scale))
    canvas = Image.new(image.mode, (width, height), 0)
    left, top = (width - new_w) // 2, (height - new_h) // 2
    canvas.paste(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR), (left, top))
    return canvas


def engine_positions(num_images: int, num_visual_per_image: int, prompt_len: int) -> torch.Tensor:
    """pi0 RoPE positions of an engine prompt ``[BOS, images..., text...]``.

    vLLM's image processing puts the visual tokens right after BOS; pi0's prefix is the images
    then the language (BOS first). The prefix is one bidirectional block, so only positions
    carry order: images get 0..V-1, BOS gets V, the text keeps its row index."""
    v = num_images * num_visual_per_image
    pos = torch.arange(prompt_len)
    pos[0] = v
    pos[1 : 1 + v] = torch.arange(v)
    return pos


__all__ = [
    "NORM_STATS_FILE",
    "PI05_STATE_BINS",
    "PI0_ARCH",
    "PI0_CAMERAS",
    "Pi0Normalizer",
    "Pi0Spec",
    "engine_positions",
    "is_pi0_checkpoint",
    "is_pi0_config",
    "load_norm_stats",
    "pi0_noise",
    "pi0_normalizer",
    "pi0_prompt_token_ids",
    "pi05_prompt_text",
    "pi0_spec",
    "resize_with_pad",
    "spec_from_config",
]
