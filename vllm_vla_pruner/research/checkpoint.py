"""Checkpoint factory: random-initialised OpenVLA checkpoints in the published file format.

Tests and benchmarks need checkpoints that load exactly like ``openvla/openvla-7b`` (same
config.json fields, timm-style tower weight names, Llama weight names, a Llama-like
tokenizer) but are small and need no download. Weights are drawn with a deliberately large
initializer range so that outputs depend strongly on the image and the instruction: a
correctness test on a near-constant model could not see errors.

The only extensions of the published format are ``vision_towers`` (explicit tower shapes,
see ``config.VisionTowerSpec``) and ``action_prompt_suffix_token_id`` (the id of the lone
``"▁"`` token OpenVLA appends after ``"Out:"``; 29871 in Llama-2's tokenizer).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vllm_vla_pruner.config import OPENVLA_PROMPT, VisionTowerSpec, spec_to_dict, tower_specs

__all__ = [
    "PRESETS",
    "SPIECE_UNDERLINE",
    "build_checkpoint",
    "build_config",
    "build_oft_weights",
    "build_tokenizer",
    "build_weights",
    "chat_template",
    "count_parameters",
    "default_norm_stats",
    "preset_config",
    "preset_names",
    "main",
]

SPIECE_UNDERLINE = "▁"
NUM_BYTE_TOKENS = 256
NUM_SPECIAL_TOKENS = 3  # <unk>, <s>, </s> at ids 0, 1, 2 as in Llama
SUFFIX_TOKEN_ID = NUM_SPECIAL_TOKENS + NUM_BYTE_TOKENS  # the lone "▁" piece (id 259)
_PIECE_SCORE = -10.0  # every regular piece costs the same: fewest pieces wins
_NEVER_SCORE = -1e4  # bytes / specials / action pieces are never matched from text

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Words given their own pieces, most important first (the prompt, then robot-task words), so
# that a typical instruction tokenizes to about as many tokens as with Llama-2's tokenizer.
_PROMPT_WORDS = ["In", "What", "action", "should", "the", "robot", "take", "to", "Out"]
_TASK_WORDS = (
    "pick up put place open close push pull turn on off slide lift move press reach grasp "
    "stack insert drop lay rotate wipe sweep hang pour flip fold unfold knock toggle "
    "a an of in into onto from with and it its at by near next under over between behind "
    "front back top bottom left right middle center side inside outside towards away "
    "red blue green yellow black white orange purple pink brown gray silver wooden metal "
    "block bowl plate cup mug drawer door cabinet box basket stove microwave shelf bin "
    "table button handle lever window faucet peg hole bottle can pot pan lid towel cloth "
    "spoon fork knife sponge tray rack sink counter coffee wine cream cheese ketchup "
    "butter soup tomato sauce salad dressing milk juice book caddy alphabet chocolate "
    "pudding object objects gripper arm this that one two three small large big"
).split()
_PLAIN_WORDS = ["Out", "In", "What", "the", "put", "pick", "open", "close", "push", "turn"]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds to build and to load; every shape deliberately different from the next one
    # (tower widths, head counts, GQA) so that transposed or swapped weights show up.
    "tiny": {
        "image_size": 64,
        "towers": [
            VisionTowerSpec(
                "dinov2", 48, 3, 3, 8, 192, num_registers=4, class_token=True, layer_scale=True
            ),
            VisionTowerSpec("siglip", 64, 3, 4, 8, 160, act="gelu_tanh"),
        ],
        "use_fused_vision_backbone": True,
        # vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: hidden 128 / 4 heads.
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tokenizer_vocab_size": 1024,
        "max_position_embeddings": 512,
        "dtype": "float32",
    },
    # OpenVLA's token layout (224 px / patch 14 = 256 visual tokens, 32 Llama layers) at a
    # width that runs on a laptop CPU; for performance work.
    "bench": {
        "image_size": 224,
        "towers": [
            VisionTowerSpec(
                "dinov2", 128, 3, 2, 14, 512, num_registers=4, class_token=True, layer_scale=True
            ),
            VisionTowerSpec("siglip", 128, 3, 2, 14, 512, act="gelu_tanh"),
        ],
        "use_fused_vision_backbone": True,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 32,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "tokenizer_vocab_size": 4096,
        "max_position_embeddings": 1024,
        "dtype": "float32",
    },
}

# OpenVLA-OFT presets: the same towers and Llama as above plus OFT's files beside them
# (action head, proprio projector, dataset_statistics.json) in the published layout.
_OFT_LIBERO = {
    "num_images_in_input": 2,  # third-person + wrist camera
    "num_actions_chunk": 8,
    "action_dim": 7,
    "proprio_dim": 8,
    "normalization": "bounds_q99",
    "unnorm_key": "libero_spatial_no_noops",
    "step": 150000,
    "ddp_prefix": True,  # published heads were saved from DDP-wrapped modules
}
PRESETS["tiny-oft"] = {
    **copy.deepcopy(PRESETS["tiny"]),
    "oft": {**_OFT_LIBERO, "num_actions_chunk": 3},
}
# OFT's LIBERO token layout: 2 cameras x 256 visual tokens, a proprio token, 8 x 7 placeholders
# and the stop token, 32 layers, at bench's width.
PRESETS["bench-oft"] = {**copy.deepcopy(PRESETS["bench"]), "oft": dict(_OFT_LIBERO)}

# Keys every preset may override, with their defaults when a preset leaves them out.
_COMMON_DEFAULTS: dict[str, Any] = {
    "patch_size": None,  # overrides every tower's patch size
    "n_action_bins": 256,
    "pad_to_multiple_of": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "norm_stats": None,  # None -> default_norm_stats(action_dims)
    "action_dims": {"tiny_robot": 7, "other_robot": 4},
    "init_gain": 2.0,  # linear weights ~ N(0, (gain / sqrt(fan_in))^2)
    "embed_std": 0.3,  # token embedding table
    "head_gain": 2.0,  # lm_head action rows (other rows get half)
    "siglip_attn_pool": True,  # timm SigLIP towers carry an (unused) attention-pool head
    "oft": None,  # OpenVLA-OFT files to write beside the OpenVLA ones (see _OFT_LIBERO)
}


def preset_names() -> list[str]:
    from vllm_vla_pruner.research.checkpoint_pi0 import PI0_PRESETS

    return sorted([*PRESETS, *PI0_PRESETS])


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The resolved, validated build parameters of a preset (after ``overrides``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown checkpoint preset {name!r}; choose one of {preset_names()}")
    params = {**_COMMON_DEFAULTS, **copy.deepcopy(PRESETS[name])}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ValueError(f"unknown checkpoint override(s) {unknown}; valid: {sorted(params)}")
    params.update(copy.deepcopy(overrides))
    params["preset"] = name

    towers = [
        t if isinstance(t, VisionTowerSpec) else VisionTowerSpec(**t) for t in params["towers"]
    ]
    if params["patch_size"] is not None:
        towers = [_replace(t, patch_size=int(params["patch_size"])) for t in towers]
    if not params["use_fused_vision_backbone"]:
        towers = towers[:1]
    elif len(towers) != 2:
        raise ValueError("use_fused_vision_backbone=True needs exactly two towers")
    params["towers"] = towers
    params["patch_size"] = towers[0].patch_size
    if len({t.patch_size for t in towers}) != 1:
        raise ValueError("fused towers must share one patch size")
    if params["image_size"] % params["patch_size"]:
        raise ValueError(
            f"image_size {params['image_size']} is not a multiple of patch_size "
            f"{params['patch_size']}"
        )
    if params["hidden_size"] % params["num_attention_heads"]:
        raise ValueError("hidden_size must be divisible by num_attention_heads")
    if params["num_attention_heads"] % params["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
    vocab, pad = int(params["tokenizer_vocab_size"]), int(params["pad_to_multiple_of"])
    if pad <= 0 or vocab % pad:
        raise ValueError(f"tokenizer_vocab_size {vocab} must be a multiple of {pad}")
    if params["n_action_bins"] > vocab - _min_regular_pieces() - SUFFIX_TOKEN_ID:
        raise ValueError(f"tokenizer_vocab_size {vocab} too small for the action tokens")
    if params["dtype"] not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    if params["oft"] is not None:
        oft = params["oft"] = {**_OFT_LIBERO, **dict(params["oft"])}
        if oft["normalization"] not in ("bounds_q99", "bounds"):
            raise ValueError("oft normalization must be 'bounds_q99' or 'bounds'")
        params["action_dims"] = {oft["unnorm_key"]: int(oft["action_dim"])}
    if params["norm_stats"] is None:
        params["norm_stats"] = default_norm_stats(params["action_dims"])
        if params["oft"] is not None:
            _add_proprio_stats(params["norm_stats"], int(params["oft"]["proprio_dim"]))
    params["num_visual_tokens"] = (params["image_size"] // params["patch_size"]) ** 2
    return params


def _replace(spec: VisionTowerSpec, **changes: Any) -> VisionTowerSpec:
    return VisionTowerSpec(**{**spec_to_dict(spec), **changes})


# --------------------------------------------------------------------------------------
# norm_stats
# --------------------------------------------------------------------------------------


def default_norm_stats(action_dims: Mapping[str, int]) -> dict[str, Any]:
    """norm_stats in OpenVLA's layout; fixed numbers so tests can hand-compute actions.

    The last dimension of every key is a gripper (mask False: not un-normalised), as in
    OpenVLA's datasets. Bounds differ per key so a wrong key gives visibly wrong actions.
    """
    stats: dict[str, Any] = {}
    for k, (key, dim) in enumerate(action_dims.items()):
        if dim < 1:
            raise ValueError(f"action dimension of {key!r} must be >= 1")
        scale = 1.0 + k  # key 0: +-0.05.., key 1: +-0.1..
        q01 = [round(-0.05 * scale * (1 + 0.1 * i), 6) for i in range(dim - 1)] + [0.0]
        q99 = [round(0.04 * scale * (1 + 0.2 * i), 6) for i in range(dim - 1)] + [1.0]
        mean = [round((lo + hi) / 2, 6) for lo, hi in zip(q01, q99)]
        std = [round((hi - lo) / 4, 6) for lo, hi in zip(q01, q99)]
        lo = [round(x * 1.5, 6) for x in q01]
        hi = [round(x * 1.5 if i < dim - 1 else 1.0, 6) for i, x in enumerate(q99)]
        zeros = [0.0] * dim
        stats[key] = {
            "action": {
                "mean": mean,
                "std": std,
                "max": hi,
                "min": lo,
                "q01": q01,
                "q99": q99,
                "mask": [True] * (dim - 1) + [False],
            },
            "proprio": {
                "mean": zeros,
                "std": zeros,
                "max": zeros,
                "min": zeros,
                "q01": zeros,
                "q99": zeros,
            },
            "num_transitions": 1000 * (k + 1),
            "num_trajectories": 10 * (k + 1),
        }
    return stats


def _add_proprio_stats(stats: dict[str, Any], proprio_dim: int) -> None:
    """Non-degenerate proprio statistics (OFT normalises the robot state with them)."""
    for k, entry in enumerate(stats.values()):
        low = [round(-0.3 - 0.05 * i - 0.1 * k, 6) for i in range(proprio_dim)]
        high = [round(0.2 + 0.07 * i, 6) for i in range(proprio_dim)]
        entry["proprio"] = {
            "mean": [round((a + b) / 2, 6) for a, b in zip(low, high)],
            "std": [round((b - a) / 4, 6) for a, b in zip(low, high)],
            "max": [round(b * 1.5, 6) for b in high],
            "min": [round(a * 1.5, 6) for a in low],
            "q01": low,
            "q99": high,
        }


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def _min_regular_pieces() -> int:
    return 1 + 2 * len(_printable())  # "▁", every char, "▁" + every char


def _printable() -> list[str]:
    return [c for c in string.printable if c.isprintable() and c != " "]


def _regular_pieces(count: int) -> list[str]:
    """Exactly ``count`` distinct text pieces, deterministic, most useful first."""
    pieces: list[str] = [SPIECE_UNDERLINE]
    pieces += _printable()
    pieces += [SPIECE_UNDERLINE + c for c in _printable()]
    words = _PROMPT_WORDS + _TASK_WORDS
    pieces += [SPIECE_UNDERLINE + w for w in words] + _PLAIN_WORDS
    pieces += [SPIECE_UNDERLINE + w.capitalize() for w in words] + words
    letters = string.ascii_lowercase
    pieces += [a + b for a in letters for b in letters]
    pieces += [SPIECE_UNDERLINE + a + b for a in letters for b in letters]
    pieces += [a + b + c for a in letters for b in letters for c in letters]
    unique = list(dict.fromkeys(pieces))
    if count < _min_regular_pieces():
        raise ValueError("vocabulary too small for the base pieces")
    if count > len(unique):
        raise ValueError(f"cannot generate {count} distinct pieces (max {len(unique)})")
    return unique[:count]


def chat_template() -> str:
    """Jinja chat template rendering the last user message as OpenVLA's prompt.

    It ends with ``"Out: "``: the trailing space tokenizes to the lone ``"▁"`` piece, i.e.
    exactly the token OpenVLA's ``predict_action`` appends, so chat requests and the action
    endpoint see identical prompt tokens. BOS comes from the template (vLLM tokenizes chat
    prompts without adding special tokens).
    """
    prompt = OPENVLA_PROMPT.replace("{instruction}", "{{ ns.instruction | trim }}")
    return (
        "{%- set ns = namespace(instruction='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{%- set ns.instruction = message['content'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{ bos_token }}" + prompt + " "
    )


def build_tokenizer(vocab_size: int, n_action_bins: int = 256) -> Any:
    """A Llama-2-like tokenizer (``tokenizers.Tokenizer``) with ``vocab_size`` ids.

    Layout as Llama's: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3..258 byte-fallback pieces
    ``<0x00>``..``<0xFF>``, then text pieces (259 is the lone ``"▁"``); the last
    ``n_action_bins`` ids are the action pieces ``<act_K>`` (K = vocab_size - 1 - id), which
    no text ever tokenizes to. ``<PAD>`` (OpenVLA's pad = image token) is added at id
    ``vocab_size``. Unigram model, so the result is deterministic and needs no training.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    regular = _regular_pieces(vocab_size - SUFFIX_TOKEN_ID - n_action_bins)
    vocab: list[tuple[str, float]] = [
        ("<unk>", 0.0),
        ("<s>", _NEVER_SCORE),
        ("</s>", _NEVER_SCORE),
    ]
    vocab += [(f"<0x{b:02X}>", _NEVER_SCORE) for b in range(NUM_BYTE_TOKENS)]
    vocab += [(p, _PIECE_SCORE) for p in regular]
    first_action = len(vocab)
    vocab += [
        (f"<act_{vocab_size - 1 - i}>", _NEVER_SCORE) for i in range(first_action, vocab_size)
    ]
    assert len(vocab) == vocab_size and vocab[SUFFIX_TOKEN_ID][0] == SPIECE_UNDERLINE

    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    # Llama-2's (legacy) pipeline: prepend "▁", spaces become "▁", no pre-tokenizer.
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>", "<PAD>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    assert tok.token_to_id("<PAD>") == vocab_size
    return tok


def _tokenizer_files(params: Mapping[str, Any]) -> dict[str, Any]:
    vocab = int(params["tokenizer_vocab_size"])
    tok = build_tokenizer(vocab, int(params["n_action_bins"]))

    def added(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<PAD>",
        "added_tokens_decoder": {
            "0": added("<unk>"),
            "1": added("<s>"),
            "2": added("</s>"),
            str(vocab): added("<PAD>"),
        },
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": int(params["max_position_embeddings"]),
        "padding_side": "right",
        "chat_template": chat_template(),
    }
    special_tokens_map = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<PAD>",
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
    }


# --------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------


def build_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """config.json in the published openvla/openvla-7b layout (plus ``vision_towers``)."""
    towers: list[VisionTowerSpec] = params["towers"]
    fused = bool(params["use_fused_vision_backbone"])
    size = int(params["image_size"])
    vocab = int(params["tokenizer_vocab_size"])
    text_vocab = vocab + int(params["pad_to_multiple_of"])
    dtype = params["dtype"]
    text_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(params["hidden_size"]),
        "intermediate_size": int(params["intermediate_size"]),
        "num_hidden_layers": int(params["num_hidden_layers"]),
        "num_attention_heads": int(params["num_attention_heads"]),
        "num_key_value_heads": int(params["num_key_value_heads"]),
        "head_dim": int(params["hidden_size"]) // int(params["num_attention_heads"]),
        "hidden_act": "silu",
        "vocab_size": text_vocab,
        "max_position_embeddings": int(params["max_position_embeddings"]),
        "rms_norm_eps": float(params["rms_norm_eps"]),
        "rope_theta": float(params["rope_theta"]),
        "rope_parameters": {"rope_theta": float(params["rope_theta"]), "rope_type": "default"},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": vocab,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    backbone = "dinosiglip" if fused else towers[0].family
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "arch_specifier": "no-align+fused-gelu-mlp" if fused else "no-align+gelu-mlp",
        "vision_backbone_id": f"vla-pruner-{params['preset']}-{backbone}-{size}px",
        "llm_backbone_id": f"vla-pruner-{params['preset']}-llama",
        "hf_llm_id": None,
        "use_fused_vision_backbone": fused,
        "image_sizes": [size] * len(towers),
        "image_resize_strategy": "resize-naive",
        "timm_model_ids": [_timm_id(t, size) for t in towers],
        "timm_override_act_layers": [None] * len(towers),
        "vision_towers": [spec_to_dict(t) for t in towers],
        "text_config": text_config,
        "pad_token_id": vocab,
        "image_token_index": vocab,
        "pad_to_multiple_of": int(params["pad_to_multiple_of"]),
        "n_action_bins": int(params["n_action_bins"]),
        "norm_stats": copy.deepcopy(dict(params["norm_stats"])),
        "action_prompt_suffix_token_id": SUFFIX_TOKEN_ID,
        "llm_max_length": int(params["max_position_embeddings"]),
        "output_projector_states": False,
        "torch_dtype": dtype,
    }
    if params.get("oft") is not None:
        # Our extension: OFT keeps these in its code; published configs lack the section and
        # the loader then takes them from the dataset key's platform.
        oft = params["oft"]
        config["oft"] = {
            "num_images_in_input": int(oft["num_images_in_input"]),
            "num_actions_chunk": int(oft["num_actions_chunk"]),
            "normalization": oft["normalization"],
        }
    tower_specs(config)  # the shared parser must accept what we write
    return config


def _timm_id(spec: VisionTowerSpec, size: int) -> str:
    reg = f"_reg{spec.num_registers}" if spec.num_registers else ""
    return (
        f"vit_w{spec.width}_d{spec.depth}_patch{spec.patch_size}{reg}_{spec.family}_{size}.random"
    )


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


class _Init:
    """Seeded draws; every tensor is drawn in one fixed order so the seed fixes the files."""

    def __init__(self, seed: int, gain: float) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.gain = gain

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std + mean

    def linear(self, out_f: int, in_f: int, gain: float | None = None) -> torch.Tensor:
        return self.normal(out_f, in_f, std=(gain or self.gain) / math.sqrt(in_f))

    def bias(self, n: int) -> torch.Tensor:
        return self.normal(n, std=0.02)

    def norm(self, n: int) -> torch.Tensor:
        """Norm weights around 1 with visible spread (never trivially all-ones)."""
        return self.normal(n, std=0.1, mean=1.0)


def _tower_weights(init: _Init, spec: VisionTowerSpec, size: int, attn_pool: bool) -> dict:
    d, p = spec.width, spec.patch_size
    n_patches = (size // p) ** 2
    w: dict[str, torch.Tensor] = {}
    if spec.class_token:
        w["cls_token"] = init.normal(1, 1, d, std=0.5)
    if spec.num_registers:
        w["reg_token"] = init.normal(1, spec.num_registers, d, std=0.5)
    w["pos_embed"] = init.normal(1, n_patches, d, std=0.5)
    w["patch_embed.proj.weight"] = init.normal(d, 3, p, p, std=init.gain / math.sqrt(3 * p * p))
    w["patch_embed.proj.bias"] = init.bias(d)
    for i in range(spec.depth):
        b = f"blocks.{i}."
        w[b + "norm1.weight"], w[b + "norm1.bias"] = init.norm(d), init.bias(d)
        w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"] = init.linear(3 * d, d), init.bias(3 * d)
        w[b + "attn.proj.weight"], w[b + "attn.proj.bias"] = init.linear(d, d), init.bias(d)
        if spec.layer_scale:
            w[b + "ls1.scale_factor"] = init.normal(d, std=0.15, mean=0.6)
        w[b + "norm2.weight"], w[b + "norm2.bias"] = init.norm(d), init.bias(d)
        w[b + "mlp.fc1.weight"] = init.linear(spec.mlp_hidden, d)
        w[b + "mlp.fc1.bias"] = init.bias(spec.mlp_hidden)
        w[b + "mlp.fc2.weight"] = init.linear(d, spec.mlp_hidden)
        w[b + "mlp.fc2.bias"] = init.bias(d)
        if spec.layer_scale:
            w[b + "ls2.scale_factor"] = init.normal(d, std=0.15, mean=0.6)
    w["norm.weight"], w["norm.bias"] = init.norm(d), init.bias(d)
    if attn_pool and spec.family == "siglip":
        # timm's SigLIP MAP head: present in published checkpoints, unused by OpenVLA.
        w["attn_pool.latent"] = init.normal(1, 1, d, std=0.5)
        w["attn_pool.q.weight"], w["attn_pool.q.bias"] = init.linear(d, d), init.bias(d)
        w["attn_pool.kv.weight"], w["attn_pool.kv.bias"] = init.linear(2 * d, d), init.bias(2 * d)
        w["attn_pool.proj.weight"], w["attn_pool.proj.bias"] = init.linear(d, d), init.bias(d)
        w["attn_pool.norm.weight"], w["attn_pool.norm.bias"] = init.norm(d), init.bias(d)
        w["attn_pool.mlp.fc1.weight"] = init.linear(spec.mlp_hidden, d)
        w["attn_pool.mlp.fc1.bias"] = init.bias(spec.mlp_hidden)
        w["attn_pool.mlp.fc2.weight"] = init.linear(d, spec.mlp_hidden)
        w["attn_pool.mlp.fc2.bias"] = init.bias(d)
    return w


def build_weights(params: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors under their published names (float32)."""
    init = _Init(seed, float(params["init_gain"]))
    towers: list[VisionTowerSpec] = params["towers"]
    size = int(params["image_size"])
    out: dict[str, torch.Tensor] = {}
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
    for prefix, spec in zip(prefixes, towers):
        for name, t in _tower_weights(init, spec, size, params["siglip_attn_pool"]).items():
            out[prefix + name] = t

    vdim = sum(t.width for t in towers)
    hid, inter = int(params["hidden_size"]), int(params["intermediate_size"])
    fc_dims = (
        [(4 * vdim, vdim), (hid, 4 * vdim), (hid, hid)]
        if params["use_fused_vision_backbone"]
        else [(hid, vdim), (hid, hid)]
    )
    for i, (o, n) in enumerate(fc_dims, start=1):
        out[f"projector.fc{i}.weight"] = init.linear(o, n)
        out[f"projector.fc{i}.bias"] = init.bias(o)

    vocab = int(params["tokenizer_vocab_size"])
    text_vocab = vocab + int(params["pad_to_multiple_of"])
    heads, kv = int(params["num_attention_heads"]), int(params["num_key_value_heads"])
    head_dim = hid // heads
    lm = "language_model."
    out[lm + "model.embed_tokens.weight"] = init.normal(
        text_vocab, hid, std=float(params["embed_std"])
    )
    for i in range(int(params["num_hidden_layers"])):
        b = f"{lm}model.layers.{i}."
        out[b + "self_attn.q_proj.weight"] = init.linear(heads * head_dim, hid)
        out[b + "self_attn.k_proj.weight"] = init.linear(kv * head_dim, hid)
        out[b + "self_attn.v_proj.weight"] = init.linear(kv * head_dim, hid)
        out[b + "self_attn.o_proj.weight"] = init.linear(hid, heads * head_dim)
        out[b + "mlp.gate_proj.weight"] = init.linear(inter, hid)
        out[b + "mlp.up_proj.weight"] = init.linear(inter, hid)
        out[b + "mlp.down_proj.weight"] = init.linear(hid, inter)
        out[b + "input_layernorm.weight"] = init.norm(hid)
        out[b + "post_attention_layernorm.weight"] = init.norm(hid)
    out[lm + "model.norm.weight"] = init.norm(hid)
    # A trained VLA emits action tokens: give the action rows of the head the larger norm so
    # that greedy decoding of this random model mostly lands on them too (and actions decode
    # to a spread of values), while the argmax still moves with every input.
    # Rows get equal norms (gain) so no token wins merely by a longer row.
    head = init.linear(text_vocab, hid)
    head = head / head.norm(dim=1, keepdim=True) * float(params["head_gain"])
    n_bins = int(params["n_action_bins"])
    head[: vocab - n_bins] *= 0.5
    head[vocab:] *= 0.5
    out[lm + "lm_head.weight"] = head
    return out


def build_oft_weights(
    params: Mapping[str, Any], seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OFT's action head (``L1RegressionActionHead``: an MLPResNet with 2 blocks reading
    ACTION_DIM hidden states per chunk step) and proprio projector (Linear, GELU, Linear),
    under OFT's module names, without a DDP prefix."""
    oft = params["oft"]
    init = _Init(seed + 1, float(params["init_gain"]))
    hid, a, p = int(params["hidden_size"]), int(oft["action_dim"]), int(oft["proprio_dim"])
    head: dict[str, torch.Tensor] = {}

    def layer_norm(prefix: str, n: int) -> None:
        head[prefix + ".weight"], head[prefix + ".bias"] = init.norm(n), init.bias(n)

    layer_norm("model.layer_norm1", hid * a)
    head["model.fc1.weight"], head["model.fc1.bias"] = init.linear(hid, hid * a), init.bias(hid)
    for b in range(2):
        layer_norm(f"model.mlp_resnet_blocks.{b}.ffn.0", hid)
        head[f"model.mlp_resnet_blocks.{b}.ffn.1.weight"] = init.linear(hid, hid)
        head[f"model.mlp_resnet_blocks.{b}.ffn.1.bias"] = init.bias(hid)
    layer_norm("model.layer_norm2", hid)
    # Normalised actions of a trained head sit in about [-1, 1]: a smaller output gain.
    head["model.fc2.weight"], head["model.fc2.bias"] = init.linear(a, hid, 0.5), init.bias(a)
    proprio = {
        "fc1.weight": init.linear(hid, p),
        "fc1.bias": init.bias(hid),
        "fc2.weight": init.linear(hid, hid),
        "fc2.bias": init.bias(hid),
    }
    return head, proprio


def _write_oft_files(params: Mapping[str, Any], out: Path, seed: int) -> None:
    oft = params["oft"]
    head, proprio = build_oft_weights(params, seed)
    prefix = "module." if oft["ddp_prefix"] else ""
    for name, state in (("action_head", head), ("proprio_projector", proprio)):
        state = {prefix + k: v.contiguous() for k, v in state.items()}
        torch.save(state, out / f"{name}--{int(oft['step'])}_checkpoint.pt")
    _write_json(out / "dataset_statistics.json", params["norm_stats"])


# --------------------------------------------------------------------------------------
# Directory
# --------------------------------------------------------------------------------------


def build_checkpoint(preset: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-initialised checkpoint directory; returns its path.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json; OFT presets add OFT's
    ``action_head--<step>_checkpoint.pt``, ``proprio_projector--<step>_checkpoint.pt`` and
    ``dataset_statistics.json``. Same preset, overrides and seed give identical tensors.
    """
    from vllm_vla_pruner.research.checkpoint_pi0 import PI0_PRESETS, build_pi0_checkpoint

    if preset in PI0_PRESETS:  # openpi's PyTorch layout (research/checkpoint_pi0.py)
        return build_pi0_checkpoint(preset, out_dir, seed, **overrides)
    params = preset_config(preset, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(params)
    weights = build_weights(params, seed)
    dtype = _DTYPES[params["dtype"]]
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    vocab = int(params["tokenizer_vocab_size"])
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": vocab},
    )
    for name, content in _tokenizer_files(params).items():
        if isinstance(content, str):
            (out / name).write_text(content)
        else:
            _write_json(out / name, content)
    if params["oft"] is not None:
        _write_oft_files(params, out, seed)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def count_parameters(params: Mapping[str, Any]) -> int:
    """Number of weights a preset's checkpoint holds (without building it)."""
    towers: Sequence[VisionTowerSpec] = params["towers"]
    size = int(params["image_size"])
    total = 0
    for spec in towers:
        d, m, p = spec.width, spec.mlp_hidden, spec.patch_size
        block = 4 * d + 4 * d * d + 4 * d + 2 * d * m + m + d + (2 * d if spec.layer_scale else 0)
        total += spec.depth * block + (size // p) ** 2 * d + 3 * p * p * d + d + 2 * d
        total += d * (int(spec.class_token) + spec.num_registers)
        if params["siglip_attn_pool"] and spec.family == "siglip":
            total += d + 4 * d * d + 4 * d + 2 * d + 2 * d * m + m + d
    vdim = sum(t.width for t in towers)
    hid, inter = int(params["hidden_size"]), int(params["intermediate_size"])
    if params["use_fused_vision_backbone"]:
        total += 4 * vdim * vdim + 4 * vdim + 4 * vdim * hid + hid + hid * hid + hid
    else:
        total += vdim * hid + hid + hid * hid + hid
    heads, kv = int(params["num_attention_heads"]), int(params["num_key_value_heads"])
    hd = hid // heads
    layer = 2 * hid * heads * hd + 2 * hid * kv * hd + 3 * hid * inter + 2 * hid
    text_vocab = int(params["tokenizer_vocab_size"]) + int(params["pad_to_multiple_of"])
    total += int(params["num_hidden_layers"]) * layer + 2 * text_vocab * hid + hid
    return total


def build_fleet_preset(model: Any) -> Path:
    """Build a fleet config's ``model.preset`` into its cache directory once (``model`` is a
    ``vllm_vla_pruner.serve.config.ModelConfig``); an existing checkpoint is reused."""
    path = model.checkpoint_dir()
    if (path / "config.json").is_file() or model.preset is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(build_checkpoint(model.preset, path, model.seed) or path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vllm_vla_pruner.research.checkpoint --preset tiny --out DIR [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=preset_names())
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_checkpoint(args.preset, args.out, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
