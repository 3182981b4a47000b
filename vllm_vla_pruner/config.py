"""What an OpenVLA-format checkpoint's config.json says, as plain dataclasses.

Published checkpoints (``openvla/openvla-7b``) name their vision towers by timm model id; the
small checkpoints this project builds describe them explicitly under ``vision_towers`` (our
only extension of the format). Everything that builds a tower -- the vLLM model, the PyTorch
reference, the checkpoint factory, the trainer -- reads the towers from here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
DEFAULT_UNNORM_KEY_HINT = "the only key of norm_stats when there is exactly one"


@dataclass(frozen=True)
class VisionTowerSpec:
    """One ViT tower, in timm's layout (the published checkpoints' weight names).

    Both families put position embeddings on the patches only (DINOv2-reg: timm's
    ``no_embed_class=True``; SigLIP has no class token), and OpenVLA reads the output of the
    second-to-last block without the final norm, prefix (class/register) tokens dropped.
    """

    family: str  # "dinov2" (ImageNet-normalised input) or "siglip" (0.5/0.5-normalised input)
    width: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_hidden: int
    num_registers: int = 0
    class_token: bool = False
    layer_scale: bool = False
    act: str = "gelu"  # "gelu" (exact) or "gelu_tanh"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.family not in ("dinov2", "siglip"):
            raise ValueError(
                f"vision tower family must be 'dinov2' or 'siglip', got {self.family!r}"
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"tower width {self.width} not divisible by num_heads {self.num_heads}"
            )
        if self.depth < 2:
            raise ValueError("a tower needs depth >= 2 (OpenVLA reads the second-to-last block)")
        if self.act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"tower act must be 'gelu' or 'gelu_tanh', got {self.act!r}")

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def num_blocks_used(self) -> int:
        """Blocks actually run: OpenVLA takes block ``depth - 2``'s output (0-based)."""
        return self.depth - 1


# The towers of the published checkpoints, by timm id (timm's own model definitions).
KNOWN_TIMM_TOWERS: dict[str, VisionTowerSpec] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": VisionTowerSpec(
        "dinov2", 1024, 24, 16, 14, 4096, num_registers=4, class_token=True, layer_scale=True
    ),
    "vit_so400m_patch14_siglip_224": VisionTowerSpec(
        "siglip", 1152, 27, 16, 14, 4304, act="gelu_tanh"
    ),
}


def tower_specs(config: Any) -> list[VisionTowerSpec]:
    """The towers of an OpenVLA config (HF config object or config.json dict), fused order."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    explicit = get("vision_towers")
    fused = bool(get("use_fused_vision_backbone", True))
    if explicit:
        specs = [VisionTowerSpec(**dict(t)) for t in explicit]
    else:
        ids = list(get("timm_model_ids") or [])
        unknown = [i for i in ids if i not in KNOWN_TIMM_TOWERS]
        if unknown:
            raise ValueError(
                f"unknown timm_model_ids {unknown}; "
                "add an explicit 'vision_towers' list to config.json"
            )
        specs = [KNOWN_TIMM_TOWERS[i] for i in ids]
    specs = specs[:2] if fused else specs[:1]
    if fused and len(specs) != 2:
        raise ValueError("use_fused_vision_backbone=true needs two vision towers")
    if not specs:
        raise ValueError("config.json names no vision tower")
    if len({s.patch_size for s in specs}) != 1:
        raise ValueError("fused towers must share one patch size")
    return specs


def image_size(config: Any) -> int:
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    sizes = get("image_sizes") or [224]
    return int(sizes[0])


def num_visual_tokens(config: Any) -> int:
    """Visual tokens per image: one per patch of the (square) image."""
    side = image_size(config) // tower_specs(config)[0].patch_size
    return side * side


def grid_shape(config: Any) -> tuple[int, int]:
    side = image_size(config) // tower_specs(config)[0].patch_size
    return side, side


def action_vocab_size(config: Any) -> int:
    """The tokenizer's vocabulary size (OpenVLA: text vocab minus the padding to 64)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    text = get("text_config")
    vocab = text["vocab_size"] if isinstance(text, Mapping) else text.vocab_size
    return int(vocab) - int(get("pad_to_multiple_of", 0) or 0)


def load_config_json(model_dir: str | Path) -> dict[str, Any]:
    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)


def spec_to_dict(spec: VisionTowerSpec) -> dict[str, Any]:
    return asdict(spec)
