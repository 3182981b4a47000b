"""What the pi0 and pi0.5 engine and API test modules share.

A tiny checkpoint of one preset with its PyTorch oracle and tokenizer (built once per module,
each module with its own seed so no two modules test the same weights), the modules' camera
images, and the SigLIP pixels the engine's image processing makes of them (the oracle's input).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.research.reference_pi0 import ReferencePi0

__all__ = ["camera_images", "checkpoint_fixtures", "png_base64", "siglip_pixels"]


def checkpoint_fixtures(preset: str, seed: int) -> tuple[Any, Any, Any]:
    """Module-scoped fixtures ``model_dir`` (``preset`` written by ``build_checkpoint``),
    ``ref`` (its :class:`ReferencePi0`) and ``tokenizer``; a test module binds them with
    ``model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi0", seed=3)``."""

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return build_checkpoint(preset, tmp_path_factory.mktemp(preset), seed=seed)

    @pytest.fixture(scope="module")
    def ref(model_dir: Path) -> ReferencePi0:
        return ReferencePi0.from_pretrained(model_dir)

    @pytest.fixture(scope="module")
    def tokenizer(model_dir: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)

    return model_dir, ref, tokenizer


def camera_images(seed: int, n: int = 3) -> list[np.ndarray]:
    """``n`` random 64 x 64 RGB camera frames, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def siglip_pixels(image: np.ndarray) -> torch.Tensor:
    """SigLIP normalisation to [-1, 1], channels first, as the engine's image processing does
    it (float32)."""
    raw = image.astype(np.float32) / 255.0
    return torch.from_numpy(((raw - 0.5) / 0.5).transpose(2, 0, 1).copy())


def png_base64(image: np.ndarray) -> str:
    """A camera frame as an HTTP body carries it: PNG, base64."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
