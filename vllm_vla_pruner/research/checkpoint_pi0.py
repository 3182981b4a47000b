"""Random-initialised pi0-style checkpoints in openpi's PyTorch weight layout.

``vla-pruner checkpoint --preset tiny-pi0`` (seconds, for tests) and ``--preset bench-pi0``
(pi0's token layout: 3 cameras x 256 SigLIP tokens at 224 px / patch 14, 48 language slots,
horizon 50, 18 layers, at reduced widths; for performance work; ``bench-pi0-wide``: every
width doubled). ``tiny-pi05`` /
``bench-pi05`` are the same shapes as pi0.5 (the ``pi05`` override makes any preset one:
adaptive-norm expert, ``time_mlp_*`` heads, no state token, 200 language slots, quantile
statistics). The file layout is described in :mod:`vllm_vla_pruner.pi0_spec`. As for the
OpenVLA presets, weights are drawn with a large initializer range so the chunk depends
visibly on images, prompt, state and noise.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vllm_vla_pruner.config import VisionTowerSpec, spec_to_dict, tower_specs
from vllm_vla_pruner.pi0_spec import NORM_STATS_FILE, PI0_ARCH, PI0_CAMERAS, spec_from_config
from vllm_vla_pruner.research.checkpoint import _Init, _tokenizer_files, _write_json

VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
PROJECTOR = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
LM = "paligemma_with_expert.paligemma.model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."
HEADS = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out")
PI05_HEADS = ("action_in_proj", "time_mlp_in", "time_mlp_out")

PI0_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-pi0": {
        "image_size": 64,
        "tower": VisionTowerSpec("siglip", 64, 2, 2, 8, 128, act="gelu_tanh"),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,  # pi0: 8 heads, 1 KV head
        "head_dim": 32,
        "expert_width": 64,
        "expert_mlp": 128,
        "horizon": 5,
        "tokenizer_vocab_size": 1024,
        "max_position_embeddings": 512,
    },
    "bench-pi0": {
        "image_size": 224,
        "tower": VisionTowerSpec("siglip", 192, 4, 3, 14, 768, act="gelu_tanh"),
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "expert_width": 128,
        "expert_mlp": 512,
        "horizon": 50,
        "tokenizer_vocab_size": 4096,
        "max_position_embeddings": 1024,
    },
}
# bench-pi0 with every width doubled (~4x the FLOPs): where the chunk's GEMMs, not the
# per-op costs of a 128-wide expert on one core, set the time.
PI0_PRESETS["bench-pi0-wide"] = {
    **PI0_PRESETS["bench-pi0"],
    "tower": VisionTowerSpec("siglip", 384, 4, 6, 14, 1536, act="gelu_tanh"),
    "hidden_size": 512,
    "intermediate_size": 2048,
    "head_dim": 64,
    "expert_width": 256,
    "expert_mlp": 1024,
}
PI0_PRESETS["tiny-pi05"] = {**PI0_PRESETS["tiny-pi0"], "pi05": True}
PI0_PRESETS["bench-pi05"] = {**PI0_PRESETS["bench-pi0"], "pi05": True}
_DEFAULTS: dict[str, Any] = {
    "action_dim": 32,  # openpi pads actions and state to 32
    "robot_action_dim": 7,
    "state_dim": 8,
    "pi05": False,  # openpi's Pi0Config.pi05
    "max_token_len": None,  # openpi's default: 48 (pi0), 200 (pi0.5)
    "num_steps": 10,
    "cameras": list(PI0_CAMERAS),
    "asset_id": "vla_pruner_robot",
    "pad_to_multiple_of": 64,
    "n_action_bins": 256,  # only sizes the shared tokenizer's reserved pieces
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "init_gain": 2.0,
    "embed_std": 0.3,
    "vla_pruner": None,  # the checkpoint's recommended pruning settings (config.json)
}


def pi0_preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    if name not in PI0_PRESETS:
        raise ValueError(f"unknown pi0 preset {name!r}; choose one of {sorted(PI0_PRESETS)}")
    params = {**_DEFAULTS, **copy.deepcopy(PI0_PRESETS[name])}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"unknown checkpoint override(s) {unknown}; valid: {sorted(params)}")
    params.update(copy.deepcopy(overrides))
    params["preset"] = name
    if params["max_token_len"] is None:
        params["max_token_len"] = 200 if params["pi05"] else 48
    if isinstance(params["tower"], Mapping):
        params["tower"] = VisionTowerSpec(**params["tower"])
    if params["image_size"] % params["tower"].patch_size:
        raise ValueError("image_size must be a multiple of the tower's patch size")
    if params["num_attention_heads"] % params["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
    return params


def build_pi0_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """config.json: an OpenVLA-style HF top level for vLLM, openpi's keys under ``pi0``."""
    tower: VisionTowerSpec = params["tower"]
    size = int(params["image_size"])
    vocab = int(params["tokenizer_vocab_size"])
    text_vocab = vocab + int(params["pad_to_multiple_of"])
    text_config = {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "hidden_size": int(params["hidden_size"]),
        "intermediate_size": int(params["intermediate_size"]),
        "num_hidden_layers": int(params["num_hidden_layers"]),
        "num_attention_heads": int(params["num_attention_heads"]),
        "num_key_value_heads": int(params["num_key_value_heads"]),
        "head_dim": int(params["head_dim"]),
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "vocab_size": text_vocab,
        "max_position_embeddings": int(params["max_position_embeddings"]),
        "rms_norm_eps": float(params["rms_norm_eps"]),
        "rope_theta": float(params["rope_theta"]),
        "rope_parameters": {"rope_theta": float(params["rope_theta"]), "rope_type": "default"},
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": vocab,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    config = {
        "architectures": [PI0_ARCH],
        "model_type": "openvla",
        "use_fused_vision_backbone": False,
        "image_sizes": [size],
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": [f"siglip_w{tower.width}_d{tower.depth}_p{tower.patch_size}_{size}"],
        "timm_override_act_layers": [None],
        "vision_towers": [spec_to_dict(tower)],
        "text_config": text_config,
        "pad_token_id": vocab,
        "image_token_index": vocab,
        "pad_to_multiple_of": int(params["pad_to_multiple_of"]),
        "n_action_bins": int(params["n_action_bins"]),
        "norm_stats": {},
        "torch_dtype": "float32",
        "pi0": {
            # openpi's convert script writes these five keys.
            "action_dim": int(params["action_dim"]),
            "action_horizon": int(params["horizon"]),
            "paligemma_variant": f"custom_{params['preset']}",
            "action_expert_variant": f"custom_{params['preset']}_expert",
            "precision": "float32",
            # Ours: what the named variants would fix, and openpi's data config.
            "pi05": bool(params["pi05"]),
            "expert": {
                "width": int(params["expert_width"]),
                "mlp_dim": int(params["expert_mlp"]),
                "depth": int(params["num_hidden_layers"]),
                "num_heads": int(params["num_attention_heads"]),
                "num_kv_heads": int(params["num_key_value_heads"]),
                "head_dim": int(params["head_dim"]),
            },
            "cameras": list(params["cameras"]),
            "max_token_len": int(params["max_token_len"]),
            "num_steps": int(params["num_steps"]),
            "robot_action_dim": int(params["robot_action_dim"]),
            "state_dim": int(params["state_dim"]),
            "asset_id": str(params["asset_id"]),
        },
    }
    if params["vla_pruner"]:
        config["vla_pruner"] = dict(params["vla_pruner"])
    tower_specs(config)
    spec_from_config(config)
    return config


def _adaptive_norm(w: dict, init: _Init, name: str, width: int) -> None:
    """pi0.5's adaptive RMSNorm ``dense``: cond [W] -> scale, shift, gate [3 W]. openpi starts
    it at zero (identity norm, gate 0); a trained one is not, so ours is drawn: small scale
    and shift, gates around 1 (the residual branches stay on)."""
    w[name + ".dense.weight"] = init.linear(3 * width, width, 0.5)
    w[name + ".dense.bias"] = torch.cat(
        [init.normal(2 * width, std=0.1), init.normal(width, std=0.1, mean=1.0)]
    )


def _gemma_layers(w: dict, init: _Init, prefix: str, width: int, params: Mapping) -> None:
    heads, kv, hd = (
        int(params[k]) for k in ("num_attention_heads", "num_key_value_heads", "head_dim")
    )
    mlp = int(params["expert_mlp"] if prefix == EXPERT else params["intermediate_size"])
    adaptive = prefix == EXPERT and bool(params["pi05"])
    for i in range(int(params["num_hidden_layers"])):
        b = f"{prefix}layers.{i}."
        w[b + "self_attn.q_proj.weight"] = init.linear(heads * hd, width)
        w[b + "self_attn.k_proj.weight"] = init.linear(kv * hd, width)
        w[b + "self_attn.v_proj.weight"] = init.linear(kv * hd, width)
        w[b + "self_attn.o_proj.weight"] = init.linear(width, heads * hd)
        w[b + "mlp.gate_proj.weight"] = init.linear(mlp, width)
        w[b + "mlp.up_proj.weight"] = init.linear(mlp, width)
        w[b + "mlp.down_proj.weight"] = init.linear(width, mlp)
        if adaptive:
            _adaptive_norm(w, init, b + "input_layernorm", width)
            _adaptive_norm(w, init, b + "post_attention_layernorm", width)
            continue
        # Gemma's RMSNorm scales by (1 + weight): weights around 0.
        w[b + "input_layernorm.weight"] = init.normal(width, std=0.1)
        w[b + "post_attention_layernorm.weight"] = init.normal(width, std=0.1)
    if adaptive:
        _adaptive_norm(w, init, prefix + "norm", width)
    else:
        w[prefix + "norm.weight"] = init.normal(width, std=0.1)


def build_pi0_weights(params: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors under openpi's PyTorch names (float32)."""
    init = _Init(seed, float(params["init_gain"]))
    t: VisionTowerSpec = params["tower"]
    d, p, size = t.width, t.patch_size, int(params["image_size"])
    w: dict[str, torch.Tensor] = {}
    w[VISION + "embeddings.patch_embedding.weight"] = init.normal(
        d, 3, p, p, std=init.gain / math.sqrt(3 * p * p)
    )
    w[VISION + "embeddings.patch_embedding.bias"] = init.bias(d)
    w[VISION + "embeddings.position_embedding.weight"] = init.normal((size // p) ** 2, d, std=0.5)
    for i in range(t.depth):
        b = f"{VISION}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            w[b + norm + ".weight"], w[b + norm + ".bias"] = init.norm(d), init.bias(d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[b + f"self_attn.{proj}.weight"] = init.linear(d, d)
            w[b + f"self_attn.{proj}.bias"] = init.bias(d)
        w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"] = (
            init.linear(t.mlp_hidden, d),
            init.bias(t.mlp_hidden),
        )
        w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"] = init.linear(d, t.mlp_hidden), init.bias(d)
    w[VISION + "post_layernorm.weight"], w[VISION + "post_layernorm.bias"] = (
        init.norm(d),
        init.bias(d),
    )
    hid = int(params["hidden_size"])
    w[PROJECTOR + "weight"], w[PROJECTOR + "bias"] = init.linear(hid, d, 1.0), init.bias(hid)
    text_vocab = int(params["tokenizer_vocab_size"]) + int(params["pad_to_multiple_of"])
    # Gemma scales token embeddings by sqrt(width): a small table keeps text and image rows
    # at comparable norms.
    w[LM + "embed_tokens.weight"] = init.normal(
        text_vocab, hid, std=float(params["embed_std"]) / math.sqrt(hid) * 4
    )
    _gemma_layers(w, init, LM, hid, params)
    we, a = int(params["expert_width"]), int(params["action_dim"])
    _gemma_layers(w, init, EXPERT, we, params)
    if params["pi05"]:  # openpi's pi0.5 heads: the flow time goes to the adaptive norms
        w["action_in_proj.weight"], w["action_in_proj.bias"] = init.linear(we, a), init.bias(we)
        for name in ("time_mlp_in", "time_mlp_out"):
            w[f"{name}.weight"], w[f"{name}.bias"] = init.linear(we, we), init.bias(we)
    else:
        w["state_proj.weight"], w["state_proj.bias"] = init.linear(we, a), init.bias(we)
        w["action_in_proj.weight"], w["action_in_proj.bias"] = init.linear(we, a), init.bias(we)
        w["action_time_mlp_in.weight"] = init.linear(we, 2 * we)
        w["action_time_mlp_in.bias"] = init.bias(we)
        w["action_time_mlp_out.weight"] = init.linear(we, we)
        w["action_time_mlp_out.bias"] = init.bias(we)
    # A velocity of order 1 per step keeps the 10-step flow in a sane range.
    w["action_out_proj.weight"], w["action_out_proj.bias"] = init.linear(a, we, 0.5), init.bias(a)
    return w


def pi0_norm_stats(params: Mapping[str, Any]) -> dict[str, Any]:
    """openpi's norm_stats.json content; fixed, distinct numbers so errors show."""
    s, a = int(params["state_dim"]), int(params["robot_action_dim"])

    def entry(n: int, scale: float) -> dict[str, list[float]]:
        mean = [round(scale * (0.1 * i - 0.2), 6) for i in range(n)]
        std = [round(scale * (0.5 + 0.05 * i), 6) for i in range(n)]
        return {
            "mean": mean,
            "std": std,
            "q01": [round(m - 2 * sd, 6) for m, sd in zip(mean, std)],
            "q99": [round(m + 2 * sd, 6) for m, sd in zip(mean, std)],
        }

    return {"norm_stats": {"state": entry(s, 1.0), "actions": entry(a, 0.3)}}


def build_pi0_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write config.json, model.safetensors, assets/<id>/norm_stats.json and tokenizer files."""
    params = pi0_preset_config(preset, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_pi0_config(params)
    weights = {k: v.float().contiguous() for k, v in build_pi0_weights(params, seed).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    vocab = int(params["tokenizer_vocab_size"])
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": vocab},
    )
    tok_params = {**params, "max_position_embeddings": params["max_position_embeddings"]}
    for name, content in _tokenizer_files(tok_params).items():
        if isinstance(content, str):
            (out / name).write_text(content)
        else:
            _write_json(out / name, content)
    assets = out / "assets" / str(params["asset_id"])
    assets.mkdir(parents=True, exist_ok=True)
    (assets / NORM_STATS_FILE).write_text(json.dumps(pi0_norm_stats(params), indent=2) + "\n")
    return out


__all__ = [
    "EXPERT",
    "LM",
    "PI05_HEADS",
    "PI0_PRESETS",
    "PROJECTOR",
    "VISION",
    "build_pi0_checkpoint",
    "build_pi0_config",
    "build_pi0_weights",
    "pi0_norm_stats",
    "pi0_preset_config",
]
