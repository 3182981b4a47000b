"""The checkpoint factory writes the published openvla/openvla-7b format, deterministically."""

from __future__ import annotations

import json
import string

import pytest
import torch
from safetensors.torch import load_file

from vllm_vla_pruner.config import action_vocab_size, num_visual_tokens, tower_specs
from vllm_vla_pruner.research.checkpoint import (
    build_checkpoint,
    build_config,
    build_tokenizer,
    chat_template,
    count_parameters,
    preset_config,
    preset_names,
)

PROMPT = "In: What action should the robot take to {}?\nOut:"


def _config(path):
    return json.loads((path / "config.json").read_text())


def test_presets():
    assert {"tiny", "bench"} <= set(preset_names())
    tiny, bench = preset_config("tiny"), preset_config("bench")
    assert tiny["num_visual_tokens"] == 64 and bench["num_visual_tokens"] == 256
    assert bench["image_size"] == 224 and bench["patch_size"] == 14
    assert bench["num_hidden_layers"] == 32 and bench["hidden_size"] == 512
    assert count_parameters(tiny) < 2_000_000
    assert 50_000_000 < count_parameters(bench) < 200_000_000
    with pytest.raises(ValueError, match="unknown checkpoint preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="unknown checkpoint override"):
        preset_config("tiny", hidden_sise=3)
    with pytest.raises(ValueError, match="multiple of"):
        preset_config("tiny", image_size=60)
    with pytest.raises(ValueError, match="multiple of 64"):
        preset_config("tiny", tokenizer_vocab_size=1000)


def test_bench_config_layout():
    cfg = build_config(preset_config("bench"))
    assert num_visual_tokens(cfg) == 256
    assert cfg["text_config"]["num_hidden_layers"] == 32
    assert action_vocab_size(cfg) == cfg["image_token_index"] == 4096


def test_config_json(tiny_ckpt):
    cfg = _config(tiny_ckpt)
    assert cfg["model_type"] == "openvla"
    assert cfg["architectures"] == ["OpenVLAForActionPrediction"]
    assert cfg["arch_specifier"] == "no-align+fused-gelu-mlp"
    assert cfg["use_fused_vision_backbone"] is True
    assert cfg["image_sizes"] == [64, 64] and cfg["image_resize_strategy"] == "resize-naive"
    assert len(cfg["timm_model_ids"]) == 2 and cfg["timm_override_act_layers"] == [None, None]
    dino, siglip = tower_specs(cfg)
    assert (dino.family, siglip.family) == ("dinov2", "siglip")
    assert dino.num_registers == 4 and dino.class_token and dino.layer_scale
    assert num_visual_tokens(cfg) == 64
    text = cfg["text_config"]
    assert text["architectures"] == ["LlamaForCausalLM"]
    assert text["vocab_size"] == 1024 + 64 and cfg["pad_to_multiple_of"] == 64
    assert action_vocab_size(cfg) == 1024 == cfg["pad_token_id"] == cfg["image_token_index"]
    assert text["num_key_value_heads"] < text["num_attention_heads"]  # GQA
    assert text["hidden_size"] // text["num_attention_heads"] in (32, 64, 80, 96, 128)
    assert text["rope_parameters"]["rope_theta"] == text["rope_theta"]
    assert cfg["torch_dtype"] == text["torch_dtype"] == "float32"
    assert cfg["n_action_bins"] == 256 and cfg["action_prompt_suffix_token_id"] == 259
    assert cfg["llm_max_length"] == text["max_position_embeddings"]
    ns = cfg["norm_stats"]
    assert list(ns) == ["tiny_robot", "other_robot"]
    assert ns["tiny_robot"]["action"]["mask"] == [True] * 6 + [False]
    assert len(ns["other_robot"]["action"]["q01"]) == 4
    for entry in ns.values():
        assert set(entry["action"]) == {"q01", "q99", "mean", "std", "min", "max", "mask"}
        assert set(entry) == {"action", "proprio", "num_transitions", "num_trajectories"}


def test_config_parses_in_transformers_and_vllm(tiny_ckpt):
    from transformers import LlamaConfig
    from vllm.transformers_utils.configs.openvla import OpenVLAConfig

    cfg = _config(tiny_ckpt)
    llama = LlamaConfig(**cfg["text_config"])
    assert llama.num_key_value_heads == 2 and llama.rope_parameters["rope_theta"] == 10000.0
    ovla = OpenVLAConfig(**cfg)
    assert ovla.image_token_index == 1024 and ovla.text_config.vocab_size == 1088
    assert ovla.norm_stats == cfg["norm_stats"]


def _expected_tower_names(spec, fused_pool: bool) -> set[str]:
    names = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    names |= {"norm.weight", "norm.bias"}
    if spec.class_token:
        names.add("cls_token")
    if spec.num_registers:
        names.add("reg_token")
    for i in range(spec.depth):
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
        if spec.layer_scale:
            names |= {f"blocks.{i}.ls1.scale_factor", f"blocks.{i}.ls2.scale_factor"}
    if fused_pool:
        names.add("attn_pool.latent")
        for mod in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2"):
            names |= {f"attn_pool.{mod}.weight", f"attn_pool.{mod}.bias"}
    return names


def test_weight_names_and_shapes(tiny_ckpt):
    cfg = _config(tiny_ckpt)
    w = load_file(str(tiny_ckpt / "model.safetensors"))
    dino, siglip = tower_specs(cfg)
    expected = {"vision_backbone.featurizer." + n for n in _expected_tower_names(dino, False)}
    expected |= {
        "vision_backbone.fused_featurizer." + n for n in _expected_tower_names(siglip, True)
    }
    expected |= {f"projector.fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    lm = "language_model."
    expected |= {lm + "model.embed_tokens.weight", lm + "model.norm.weight", lm + "lm_head.weight"}
    for i in range(cfg["text_config"]["num_hidden_layers"]):
        b = f"{lm}model.layers.{i}."
        expected |= {f"{b}self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"{b}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {b + "input_layernorm.weight", b + "post_attention_layernorm.weight"}
    assert set(w) == expected
    assert all(t.dtype == torch.float32 for t in w.values())

    f, s = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
    assert w[f + "pos_embed"].shape == (1, 64, dino.width)  # patches only
    assert w[f + "cls_token"].shape == (1, 1, dino.width)
    assert w[f + "reg_token"].shape == (1, 4, dino.width)
    assert w[f + "blocks.0.attn.qkv.weight"].shape == (3 * dino.width, dino.width)
    assert w[f + "patch_embed.proj.weight"].shape == (dino.width, 3, 8, 8)
    assert w[s + "pos_embed"].shape == (1, 64, siglip.width)
    assert w[s + "blocks.2.mlp.fc1.weight"].shape == (siglip.mlp_hidden, siglip.width)
    vdim, hid = dino.width + siglip.width, cfg["text_config"]["hidden_size"]
    assert w["projector.fc1.weight"].shape == (4 * vdim, vdim)
    assert w["projector.fc2.weight"].shape == (hid, 4 * vdim)
    assert w["projector.fc3.weight"].shape == (hid, hid)
    assert w[lm + "model.embed_tokens.weight"].shape == (1088, hid)
    assert w[lm + "lm_head.weight"].shape == (1088, hid)
    kv = (
        cfg["text_config"]["num_key_value_heads"] * hid // cfg["text_config"]["num_attention_heads"]
    )
    assert w[lm + "model.layers.0.self_attn.k_proj.weight"].shape == (kv, hid)
    # Non-trivial init: LayerScale and norms are not identity-like.
    ls = w[f + "blocks.0.ls1.scale_factor"]
    assert 0.2 < ls.mean() < 1.0 and ls.std() > 0.05
    assert w[lm + "model.layers.0.input_layernorm.weight"].std() > 0.05
    assert w[lm + "model.layers.0.self_attn.q_proj.weight"].std() > 0.1


def test_deterministic_and_seeded(tmp_path, tiny_ckpt):
    again = build_checkpoint("tiny", tmp_path / "a", seed=0)
    other = build_checkpoint("tiny", tmp_path / "b", seed=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_ckpt / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_overrides_single_tower(tmp_path):
    out = build_checkpoint(
        "tiny",
        tmp_path / "single",
        use_fused_vision_backbone=False,
        image_size=32,
        num_hidden_layers=2,
        action_dims={"solo": 5},
    )
    cfg = _config(out)
    assert cfg["arch_specifier"] == "no-align+gelu-mlp" and cfg["image_sizes"] == [32]
    assert len(tower_specs(cfg)) == 1 and num_visual_tokens(cfg) == 16
    w = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("vision_backbone.fused_featurizer.") for k in w)
    assert "projector.fc3.weight" not in w
    assert w["projector.fc1.weight"].shape == (128, 48)
    assert list(cfg["norm_stats"]) == ["solo"]


def test_tokenizer_files(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    assert tok.vocab_size == 1024 and len(tok) == 1025
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.pad_token == "<PAD>" and tok.pad_token_id == 1024
    assert tok.convert_ids_to_tokens(259) == "▁"
    assert tok.convert_ids_to_tokens([768, 1023]) == ["<act_255>", "<act_0>"]
    prompt = PROMPT.format("pick up the red block")
    ids = tok(prompt).input_ids
    assert ids[0] == 1 and 15 <= len(ids) <= 25  # Llama-2 gives 19 tokens here
    assert tok.decode(ids, skip_special_tokens=True) == prompt

    text = string.ascii_letters + string.digits + string.punctuation + " "
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert all(i < 768 for i in ids)  # text never produces action tokens
    uni = "gripper → 45° über"
    ids = tok(uni, add_special_tokens=False).input_ids
    assert tok.decode(ids) == uni and any(3 <= i < 259 for i in ids)  # byte fallback
    lookalike = "<act_3> <0x41>"  # literal text, not the action / byte pieces
    ids = tok(lookalike, add_special_tokens=False).input_ids
    assert tok.decode(ids) == lookalike and all(259 <= i < 768 for i in ids)


def test_chat_template_matches_action_prompt(tiny_ckpt):
    from transformers import AutoTokenizer

    from vllm_vla_pruner.actions import ActionDecoder

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    assert tok.chat_template == chat_template()
    msgs = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": " open the drawer "},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s>" + PROMPT.format("open the drawer") + " "
    chat_ids = tok(text, add_special_tokens=False).input_ids
    assert chat_ids == ActionDecoder.from_pretrained(tiny_ckpt).prompt_token_ids(
        tok, "open the drawer"
    )


def test_bench_tokenizer_prompt_length():
    tok = build_tokenizer(4096)
    ids = tok.encode(PROMPT.format("put the black bowl on the plate")).ids
    assert ids[0] == 1 and len(ids) == 21  # as Llama-2
    assert tok.get_vocab_size() == 4097 and tok.id_to_token(4095) == "<act_0>"
