"""The vision part of a small config.json (one SigLIP-style tower, 8-pixel patches), for tests
that need a checkpoint's layout but no weights."""

from __future__ import annotations

from typing import Any


def vision_config(image_side: int = 32) -> dict[str, Any]:
    """``(image_side / 8) ** 2`` visual tokens."""
    tower = dict(family="siglip", width=16, depth=2, num_heads=2, patch_size=8, mlp_hidden=32)
    return {
        "vision_towers": [tower],
        "use_fused_vision_backbone": False,
        "image_sizes": [image_side],
    }
