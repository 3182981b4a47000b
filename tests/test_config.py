"""config.json handling: the published openvla-7b layout and our small explicit towers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vllm_vla_pruner.config import (
    VisionTowerSpec,
    action_vocab_size,
    grid_shape,
    num_visual_tokens,
    tower_specs,
)

# The fields of the published openvla/openvla-7b config.json that the plugin reads.
OPENVLA_7B = {
    "model_type": "openvla",
    "architectures": ["OpenVLAForActionPrediction"],
    "use_fused_vision_backbone": True,
    "image_sizes": [224, 224],
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "timm_override_act_layers": [None, None],
    "pad_to_multiple_of": 64,
    "n_action_bins": 256,
    "text_config": {"model_type": "llama", "vocab_size": 32064, "pad_token_id": 32000},
}


def test_published_config_towers_and_tokens():
    dino, siglip = tower_specs(OPENVLA_7B)
    assert (dino.family, dino.width, dino.depth, dino.num_heads, dino.patch_size) == (
        "dinov2",
        1024,
        24,
        16,
        14,
    )
    assert dino.num_registers == 4 and dino.class_token and dino.layer_scale
    assert (siglip.family, siglip.width, siglip.depth, siglip.mlp_hidden, siglip.act) == (
        "siglip",
        1152,
        27,
        4304,
        "gelu_tanh",
    )
    assert num_visual_tokens(OPENVLA_7B) == 256 and grid_shape(OPENVLA_7B) == (16, 16)
    assert action_vocab_size(OPENVLA_7B) == 32000  # OpenVLA: 32064 - 64


# Builds the towers on the meta device in a fresh process: their projections are vLLM's linear
# layers, which need a (one-process) tensor-parallel group, and that group must not outlive
# this test inside pytest's process.
_META_BACKBONE = """
import json, sys, torch
from vllm_vla_pruner.config import tower_specs
from vllm_vla_pruner.openvla import VisionBackbone
from vllm_vla_pruner.research.outside_engine import one_process_vllm
with one_process_vllm():
    with torch.device("meta"):
        backbone = VisionBackbone(tower_specs(json.loads(sys.argv[1])), 224)
shapes = {n: list(p.shape) for n, p in backbone.named_parameters()}
print(json.dumps({"shapes": shapes, "embed_dim": backbone.embed_dim}))
"""


def test_published_towers_have_the_published_parameter_shapes():
    """Our compact ViT, built on the meta device, names and shapes its parameters like the
    published checkpoint's timm towers (so the safetensors load by name)."""
    run = subprocess.run(
        [sys.executable, "-c", _META_BACKBONE, json.dumps(OPENVLA_7B)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    shapes = {n: tuple(s) for n, s in built["shapes"].items()}
    assert shapes["featurizer.pos_embed"] == (1, 256, 1024)
    assert shapes["featurizer.reg_token"] == (1, 4, 1024)
    assert shapes["featurizer.cls_token"] == (1, 1, 1024)
    assert shapes["featurizer.blocks.0.attn.qkv.weight"] == (3072, 1024)
    assert shapes["featurizer.blocks.0.attn.qkv.bias"] == (3072,)
    assert shapes["featurizer.blocks.22.ls2.scale_factor"] == (1024,)
    assert shapes["fused_featurizer.pos_embed"] == (1, 256, 1152)
    assert shapes["fused_featurizer.blocks.25.mlp.fc1.weight"] == (4304, 1152)
    # OpenVLA reads block depth-2: the last block is never built (nor loaded).
    assert "featurizer.blocks.23.attn.qkv.weight" not in shapes
    assert "fused_featurizer.blocks.26.attn.qkv.weight" not in shapes
    assert built["embed_dim"] == 2176


def test_explicit_single_tower():
    cfg = {
        "use_fused_vision_backbone": False,
        "image_sizes": [48, 48],
        "vision_towers": [
            dict(family="dinov2", width=32, depth=2, num_heads=2, patch_size=6, mlp_hidden=64)
        ],
    }
    [spec] = tower_specs(cfg)
    assert spec.width == 32 and num_visual_tokens(cfg) == 64


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"timm_model_ids": ["vit_unknown"], "use_fused_vision_backbone": False}, "unknown timm"),
        ({"timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m"]}, "two vision towers"),
        ({"timm_model_ids": [], "use_fused_vision_backbone": False}, "no vision tower"),
    ],
)
def test_bad_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        tower_specs(cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="clip"), "family"),
        (dict(width=30, num_heads=4), "divisible"),
        (dict(depth=1), "depth >= 2"),
        (dict(act="relu"), "act"),
    ],
)
def test_bad_tower_specs(kwargs, match):
    base = dict(family="dinov2", width=32, depth=2, num_heads=2, patch_size=8, mlp_hidden=64)
    with pytest.raises(ValueError, match=match):
        VisionTowerSpec(**{**base, **kwargs})
