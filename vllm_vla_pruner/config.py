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


# ----------------------------------------------------------------------------- OpenVLA-OFT

#: OFT's per-platform constants (``prismatic/vla/constants.py``): chunk length, action and
#: proprio dims, normalisation. OFT picks the platform from its command line; we pick it from
#: the dataset key of ``dataset_statistics.json`` (LIBERO when the key names no platform, as
#: OFT defaults to LIBERO).
OFT_PLATFORMS: dict[str, dict[str, Any]] = {
    "libero": {"chunk": 8, "action_dim": 7, "proprio_dim": 8, "normalization": "bounds_q99"},
    "aloha": {"chunk": 25, "action_dim": 14, "proprio_dim": 14, "normalization": "bounds"},
    "bridge": {"chunk": 5, "action_dim": 7, "proprio_dim": 7, "normalization": "bounds_q99"},
}
OFT_NORMALIZATIONS = ("bounds_q99", "bounds")
OFT_STOP_TOKEN_ID = 2  # "</s>": OFT appends it after the placeholders (seen at train time)
OFT_ACTION_HEAD = "action_head"
OFT_PROPRIO_PROJECTOR = "proprio_projector"
OFT_STATISTICS = "dataset_statistics.json"


@dataclass(frozen=True)
class OftSpec:
    """What an OpenVLA-OFT checkpoint directory says about its parallel-decoding contract.

    Published OFT checkpoints keep the OpenVLA config.json unchanged; chunk length, number of
    camera views and normalisation live in OFT's code, not in the files. They are read from
    an optional ``oft`` section of config.json (our extension, like ``vision_towers``), else
    from the platform the dataset key names; action and proprio dims are checked against the
    head and projector files by the loaders.
    """

    num_images: int
    chunk: int
    action_dim: int
    proprio_dim: int  # 0: the checkpoint has no proprio projector
    normalization: str  # "bounds_q99" (q01/q99) or "bounds" (min/max)
    unnorm_key: str
    action_head_file: str
    proprio_projector_file: str | None

    def __post_init__(self) -> None:
        if self.normalization not in OFT_NORMALIZATIONS:
            raise ValueError(f"OFT normalization must be one of {OFT_NORMALIZATIONS}")
        if min(self.num_images, self.chunk, self.action_dim) < 1 or self.proprio_dim < 0:
            raise ValueError(f"invalid OFT shape: {self}")

    @property
    def num_placeholders(self) -> int:
        """ACTION_DIM x CHUNK rows with zeroed input embeddings (the stop token comes after)."""
        return self.action_dim * self.chunk

    @property
    def num_action_rows(self) -> int:
        """Rows appended after the prompt: the placeholders and the stop token."""
        return self.num_placeholders + 1

    @property
    def bound_keys(self) -> tuple[str, str]:
        return ("q01", "q99") if self.normalization == "bounds_q99" else ("min", "max")


def _component_file(model_dir: Path, component: str) -> str | None:
    found = sorted(model_dir.glob(f"{component}--*_checkpoint.pt"))
    if len(found) > 1:
        raise ValueError(f"{model_dir} holds several {component} checkpoints: {found}")
    return found[0].name if found else None


def is_oft_checkpoint(model_dir: str | Path) -> bool:
    """An OFT checkpoint is the OpenVLA files plus an ``action_head--<step>_checkpoint.pt``."""
    return _component_file(Path(model_dir), OFT_ACTION_HEAD) is not None


def load_oft_statistics(model_dir: str | Path) -> dict[str, Any]:
    with open(Path(model_dir) / OFT_STATISTICS) as f:
        return json.load(f)


def oft_spec(model_dir: str | Path, unnorm_key: str | None = None) -> OftSpec:
    """The OFT contract of a checkpoint directory (raises if it is not an OFT checkpoint)."""
    model_dir = Path(model_dir)
    head = _component_file(model_dir, OFT_ACTION_HEAD)
    if head is None:
        raise ValueError(f"{model_dir} has no {OFT_ACTION_HEAD}--<step>_checkpoint.pt")
    stats = load_oft_statistics(model_dir)
    if unnorm_key is None:
        if len(stats) != 1:
            raise ValueError(f"{OFT_STATISTICS} has keys {sorted(stats)}: name the unnorm_key")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise ValueError(f"unnorm_key {unnorm_key!r} not in {OFT_STATISTICS} ({sorted(stats)})")
    platform = next((p for p in OFT_PLATFORMS if p in unnorm_key.lower()), "libero")
    declared = load_config_json(model_dir).get("oft") or {}
    base = {**OFT_PLATFORMS[platform], "num_images": 2 if platform == "libero" else 3}
    proprio = _component_file(model_dir, OFT_PROPRIO_PROJECTOR)
    entry = stats[unnorm_key]
    action_dim = len(entry["action"]["q01"])
    proprio_dim = len(entry["proprio"]["q01"]) if proprio and "proprio" in entry else 0
    return OftSpec(
        num_images=int(declared.get("num_images_in_input", base["num_images"])),
        chunk=int(declared.get("num_actions_chunk", base["chunk"])),
        action_dim=action_dim,
        proprio_dim=proprio_dim,
        normalization=str(declared.get("normalization", base["normalization"])),
        unnorm_key=unnorm_key,
        action_head_file=head,
        proprio_projector_file=proprio,
    )


def strip_ddp_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """A component state dict saved from a DDP-wrapped module names keys ``module.*``."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def oft_bounds(spec: OftSpec, stats: Mapping[str, Any], kind: str) -> tuple[list, list, list]:
    """(low, high, mask) of ``kind`` ("action" or "proprio") under the spec's normalisation;
    mask defaults to all True (OFT: ``norm_stats.get("mask", ones)``)."""
    entry = stats[spec.unnorm_key][kind]
    lo_key, hi_key = spec.bound_keys
    low, high = list(entry[lo_key]), list(entry[hi_key])
    mask = list(entry.get("mask", [True] * len(low)))
    return low, high, mask
