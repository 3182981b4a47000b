"""pi0 checkpoint presets (openpi's PyTorch weight names) and the plain-PyTorch oracle."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vllm_vla_pruner.pi0_spec import (
    PI0_CAMERAS,
    Pi0Normalizer,
    Pi0Spec,
    engine_positions,
    is_pi0_checkpoint,
    pi0_noise,
    pi0_spec,
    resize_with_pad,
    spec_from_config,
)
from vllm_vla_pruner.research.checkpoint import build_checkpoint, preset_names
from vllm_vla_pruner.research.checkpoint_pi0 import build_pi0_config, pi0_preset_config
from vllm_vla_pruner.server_defaults import prompt_budget

STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]


@pytest.fixture(scope="module")
def pi0_dir(tmp_path_factory):
    return build_checkpoint("tiny-pi0", tmp_path_factory.mktemp("tiny_pi0"), seed=1)


@pytest.fixture(scope="module")
def ref(pi0_dir):
    from vllm_vla_pruner.research.reference_pi0 import ReferencePi0

    return ReferencePi0.from_pretrained(pi0_dir)


@pytest.fixture(scope="module")
def pi05_dir(tmp_path_factory):
    return build_checkpoint("tiny-pi05", tmp_path_factory.mktemp("tiny_pi05"), seed=1)


@pytest.fixture(scope="module")
def ref05(pi05_dir):
    from vllm_vla_pruner.research.reference_pi0 import ReferencePi0

    return ReferencePi0.from_pretrained(pi05_dir)


def test_presets_listed():
    assert {"tiny-pi0", "bench-pi0", "bench-pi0-wide", "tiny-pi05", "bench-pi05"} <= set(
        preset_names()
    )


def test_layout_follows_openpi_names(pi0_dir):
    files = {p.name for p in pi0_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "assets"} <= files
    assert (pi0_dir / "assets" / "vla_pruner_robot" / "norm_stats.json").is_file()
    names = set(load_file(str(pi0_dir / "model.safetensors")))
    prefixes = (
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.",
        "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.",
        "paligemma_with_expert.paligemma.model.language_model.",
        "paligemma_with_expert.gemma_expert.model.",
        "state_proj.",
        "action_in_proj.",
        "action_time_mlp_in.",
        "action_time_mlp_out.",
        "action_out_proj.",
    )
    assert all(n.startswith(prefixes) for n in names), sorted(names)[:5]
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in names), prefix
    lm = "paligemma_with_expert.paligemma.model.language_model.layers.5."
    expert = "paligemma_with_expert.gemma_expert.model.layers.5."
    for part in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "input_layernorm.weight"):
        assert lm + part in names and expert + part in names
    config = json.loads((pi0_dir / "config.json").read_text())
    # openpi's convert script writes these keys; ours add the shapes of reduced variants.
    assert {"action_dim", "action_horizon", "paligemma_variant", "action_expert_variant"} <= set(
        config["pi0"]
    )
    assert config["architectures"] == ["Pi0ForActionPrediction"] and is_pi0_checkpoint(pi0_dir)
    spec = pi0_spec(pi0_dir)
    assert isinstance(spec, Pi0Spec) and spec.num_cameras == 3 and spec.action_dim == 32


def test_bench_preset_is_pi0s_token_layout():
    config = build_pi0_config(pi0_preset_config("bench-pi0"))
    spec = spec_from_config(config)
    assert (spec.num_cameras, spec.max_token_len, spec.horizon) == (3, 48, 50)
    assert config["text_config"]["num_hidden_layers"] == 18
    assert config["image_sizes"] == [224] and config["vision_towers"][0]["patch_size"] == 14
    assert prompt_budget(config) == 3 * 256 + 48


def test_wide_bench_preset_doubles_every_width_and_keeps_the_layout():
    base = build_pi0_config(pi0_preset_config("bench-pi0"))
    wide = build_pi0_config(pi0_preset_config("bench-pi0-wide"))
    for key in ("hidden_size", "intermediate_size", "head_dim"):
        assert wide["text_config"][key] == 2 * base["text_config"][key]
    for key in ("width", "mlp_dim"):
        assert wide["pi0"]["expert"][key] == 2 * base["pi0"]["expert"][key]
    for key in ("width", "mlp_hidden"):
        assert wide["vision_towers"][0][key] == 2 * base["vision_towers"][0][key]
    w, b = spec_from_config(wide), spec_from_config(base)
    assert (w.expert_width, w.expert_mlp) == (2 * b.expert_width, 2 * b.expert_mlp)
    assert replace(w, expert_width=b.expert_width, expert_mlp=b.expert_mlp) == b  # the rest
    assert prompt_budget(wide) == prompt_budget(base)


def test_pi05_layout_follows_openpis_port(pi05_dir):
    """openpi's ``convert_jax_model_to_pytorch.py`` names for pi0.5: adaptive expert norms
    (``dense`` [3 W, W] + bias, no scale), ``time_mlp_in/out``, no state or action-time heads;
    the prefix LM keeps its plain norms. config.json says ``pi05`` (openpi's flag) and the
    spec takes openpi's pi0.5 defaults (200 language slots, no state token)."""
    w = load_file(str(pi05_dir / "model.safetensors"))
    names = set(w)
    expert = "paligemma_with_expert.gemma_expert.model."
    lm = "paligemma_with_expert.paligemma.model.language_model."
    for i in range(6):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert w[f"{expert}layers.{i}.{norm}.dense.weight"].shape == (192, 64)
            assert w[f"{expert}layers.{i}.{norm}.dense.bias"].shape == (192,)
            assert f"{expert}layers.{i}.{norm}.weight" not in names
            assert f"{lm}layers.{i}.{norm}.weight" in names
    assert {expert + "norm.dense.weight", expert + "norm.dense.bias"} <= names
    assert expert + "norm.weight" not in names
    assert {"time_mlp_in.weight", "time_mlp_out.bias", "action_in_proj.weight"} <= names
    assert not [n for n in names if n.startswith(("state_proj", "action_time_mlp"))]
    config = json.loads((pi05_dir / "config.json").read_text())
    assert config["pi0"]["pi05"] is True
    spec = pi0_spec(pi05_dir)
    assert spec.pi05 and spec.max_token_len == 200 and spec.suffix_len == spec.horizon == 5
    stats = json.loads((pi05_dir / "assets/vla_pruner_robot/norm_stats.json").read_text())
    assert len(stats["norm_stats"]["state"]["q01"]) == 8
    assert len(stats["norm_stats"]["actions"]["q99"]) == 7
    bench = spec_from_config(build_pi0_config(pi0_preset_config("bench-pi05")))
    assert bench.pi05 and (bench.max_token_len, bench.horizon) == (200, 50)
    big = build_pi0_config(pi0_preset_config("bench-pi0", pi05=True))
    assert prompt_budget(big) == 3 * 256 + 200


def test_pi05_needs_quantile_stats(pi05_dir, tmp_path):
    """pi0.5 reads q01/q99: a norm_stats.json without them names the missing field."""
    import shutil

    from vllm_vla_pruner.pi0_spec import load_norm_stats

    model = tmp_path / "m"
    shutil.copytree(pi05_dir, model)
    path = model / "assets/vla_pruner_robot/norm_stats.json"
    stats = json.loads(path.read_text())
    del stats["norm_stats"]["actions"]["q99"]
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="actions.q99"):
        load_norm_stats(model, pi0_spec(pi05_dir))


def _pi05_normalizer() -> Pi0Normalizer:
    spec = Pi0Spec(PI0_CAMERAS, 2, 8, 2, 7, 200, 10, 8, 8, "x", pi05=True)
    state = {"q01": [0.0] * 7, "q99": [2.0] * 7, "mean": [9.0] * 7, "std": [9.0] * 7}
    actions = {"q01": [0.0, -1.0], "q99": [2.0, 3.0], "mean": [9.0] * 2, "std": [9.0] * 2}
    return Pi0Normalizer(spec, {"state": state, "actions": actions})


def test_pi05_state_bins_follow_openpi_by_hand():
    """openpi: s = (x - q01) / (q99 - q01 + 1e-6) * 2 - 1, bin = digitize(s, linspace(-1, 1,
    257)[:-1]) - 1, i.e. floor((s + 1) * 128) clipped to [-1, 255]. With q01 = 0, q99 = 2:
    x = 0 -> s = -1 (the first edge) -> 0; x = 1 -> s = -5e-7 (the 1e-6) -> 127, not 128;
    x = 0.5 -> 63; x = 1.2 -> s = 0.19999988 -> 153; x = 2 -> 255; beyond q99 (3) stays
    255; below q01 (-1: s = -2) is openpi's -1 (no clipping)."""
    norm = _pi05_normalizer()
    assert norm.state_bins([0.0, 1.0, 0.5, 1.2, 2.0, 3.0, -1.0]) == [0, 127, 63, 153, 255, 255, -1]


def test_pi05_prompt_text_and_ids_are_openpis(pi05_dir):
    """``Task: {cleaned}, State: {bins};\\nAction: `` with BOS (openpi's PaligemmaTokenizer:
    the instruction stripped, ``_`` and newlines to spaces), truncated to max_token_len."""
    from transformers import AutoTokenizer

    from vllm_vla_pruner.pi0_spec import pi0_prompt_token_ids, pi05_prompt_text

    text = pi05_prompt_text("  pick_up the\nblock ", [0, 127, -1])
    assert text == "Task: pick up the block, State: 0 127 -1;\nAction: "
    tok = AutoTokenizer.from_pretrained(pi05_dir)
    ids = pi0_prompt_token_ids(tok, "  pick_up the\nblock ", 200, [0, 127, -1])
    assert ids == [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    assert pi0_prompt_token_ids(tok, "pick up the block", 7, [0, 127, -1]) == ids[:7]
    # pi0's prompt is untouched: BOS + text, then "\n" on its own.
    pi0 = pi0_prompt_token_ids(tok, "pick up the block", 48)
    want = tok.encode("pick up the block") + tok.encode("\n", add_special_tokens=False)
    assert pi0 == want


def test_pi05_actions_unnormalise_with_quantiles_by_hand():
    """openpi's Unnormalize with quantiles: (x + 1) / 2 * (q99 - q01 + 1e-6) + q01 on the
    robot's dims (q01 = [0, -1], q99 = [2, 3]); normalize_actions is its inverse."""
    norm = _pi05_normalizer()
    x = torch.zeros(3, 8)
    x[0, :2] = torch.tensor([-1.0, -1.0])
    x[1, :2] = torch.tensor([1.0, 1.0])
    got = norm.actions(x)
    want = [[0.0, -1.0], [2.0 + 1e-6, 3.0 + 1e-6], [1.0 + 5e-7, 1.0 + 5e-7]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)
    back = norm.normalize_actions(got)
    torch.testing.assert_close(back, x, atol=1e-6, rtol=0)


def test_pi05_oracle_depends_on_noise_steps_prompt_and_cameras(ref05):
    noise = pi0_noise(0, ref05.spec.horizon, ref05.spec.action_dim)
    base = ref05.sample(_inputs(ref05, state=None), noise).normalized
    assert base.shape == (ref05.spec.horizon, ref05.spec.action_dim) and torch.isfinite(base).all()
    others = [
        ref05.sample(_inputs(ref05, state=None), pi0_noise(1, 5, 32)).normalized,
        ref05.sample(_inputs(ref05, state=None, ids=(1, 300, 401, 13)), noise).normalized,
        ref05.sample(_inputs(ref05, state=None), noise, num_steps=3).normalized,
        ref05.sample(_inputs(ref05, (True, False, True), state=None), noise).normalized,
    ]
    for other in others:
        assert (other - base).abs().max() > 1e-3
    m = 3 * ref05.tokens_per_camera
    keep_all = ref05.sample(
        _inputs(ref05, state=None), noise, keep_visual=torch.arange(m), prune_layer=3
    )
    assert torch.allclose(keep_all.normalized, base, atol=1e-5)


def test_engine_positions_are_pi0_order():
    pos = engine_positions(2, 4, 12)  # [BOS, 8 visual, 3 text]
    assert pos.tolist() == [8, 0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11]


def _inputs(ref, mask=(True, True, True), state=STATE, ids=(1, 300, 400, 13)):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in range(3)]
    images = [im if m else None for im, m in zip(images, mask)]
    return ref.build_inputs(images, list(mask), list(ids), state)


def test_oracle_depends_on_noise_state_steps_and_cameras(ref):
    noise = pi0_noise(0, ref.spec.horizon, ref.spec.action_dim)
    base = ref.sample(_inputs(ref), noise).normalized
    assert base.shape == (ref.spec.horizon, ref.spec.action_dim) and torch.isfinite(base).all()
    others = [
        ref.sample(_inputs(ref), pi0_noise(1, ref.spec.horizon, 32)).normalized,
        ref.sample(_inputs(ref, state=[0.0] * 8), noise).normalized,
        ref.sample(_inputs(ref), noise, num_steps=3).normalized,
        ref.sample(_inputs(ref, mask=(True, False, True)), noise).normalized,
    ]
    for other in others:
        assert (other - base).abs().max() > 1e-3


def test_oracle_keep_all_equals_unpruned_and_pruning_changes(ref):
    noise = pi0_noise(2, ref.spec.horizon, ref.spec.action_dim)
    inputs = _inputs(ref)
    base = ref.sample(inputs, noise, return_attn_layers=[3])
    m = inputs.num_visual_slots
    keep_all = ref.sample(inputs, noise, keep_visual=torch.arange(m), prune_layer=3)
    assert torch.allclose(keep_all.normalized, base.normalized, atol=1e-5)
    half = ref.sample(inputs, noise, keep_visual=torch.arange(0, m, 2), prune_layer=3)
    assert (half.normalized - base.normalized).abs().max() > 1e-4
    scores = ref.action_scores(base, 3, m)
    assert scores.shape == (m,) and 0.0 < float(scores.sum()) < 1.0


def test_flops_model_reproduces_pi0_spec_numbers():
    """metrics.flow_chunk_flops on pi0's published dims gives the spec's split (prefix LM
    ~3.3 TFLOPs, towers ~0.66, ten denoising steps ~0.38) and whole-chunk ratios at keep
    0.5 / 0.25 / 0.125 after layer 3 of 18 (~0.69 / 0.54 / 0.47)."""
    from vllm_vla_pruner.metrics import ModelDims, flow_chunk_flops, vit_flops

    lm = ModelDims(2048, 16384, 8, 1, 18, 256)
    expert = ModelDims(1024, 4096, 8, 1, 18, 256)
    vision = 3 * (vit_flops(1152, 4304, 27, 256) + 2 * 1152 * 2048 * 256)
    full = flow_chunk_flops(lm, expert, 816, 816, 3, 51, 10, vision)
    assert abs(full["prefix"] / 1e12 - 3.3) < 0.05
    assert abs(full["vision"] / 1e12 - 0.66) < 0.01
    assert abs(full["denoise"] / 1e12 - 0.38) < 0.01
    for keep, ratio in ((0.5, 0.69), (0.25, 0.54), (0.125, 0.47)):
        kept = 816 - 768 + round(768 * keep)
        part = flow_chunk_flops(lm, expert, 816, kept, 3, 51, 10, vision)
        assert abs(part["total"] / full["total"] - ratio) < 0.01


@pytest.mark.parametrize(
    "h, w, out_h, out_w",
    [(48, 80, 64, 64), (80, 48, 64, 64), (37, 100, 64, 64), (65, 63, 64, 64),
     (480, 640, 224, 224), (32, 32, 64, 64), (64, 64, 64, 64), (90, 120, 224, 160)],
)  # fmt: skip
def test_resize_with_pad_is_openpis(h, w, out_h, out_w):
    """Pixel for pixel openpi-client's resize (what openpi's robots send pi0)."""
    from openpi_client.image_tools import resize_with_pad as openpi_resize

    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = np.asarray(resize_with_pad(Image.fromarray(img), out_h, out_w))
    assert ours.shape == (out_h, out_w, 3)
    np.testing.assert_array_equal(ours, openpi_resize(img, out_h, out_w))


def test_non_square_camera_is_padded_not_stretched():
    """A 48 x 80 frame on a 64-pixel tower: scaled to 38 x 64, black bands of 13 rows above
    and below; the engine's processor gives exactly those pixels in [-1, 1] (SigLIP)."""
    from vllm_vla_pruner.pi0 import Pi0ImageProcessor

    img = np.full((48, 80, 3), 200, dtype=np.uint8)
    padded = np.asarray(resize_with_pad(Image.fromarray(img), 64, 64))
    assert (padded[:13] == 0).all() and (padded[13 + 38 :] == 0).all()
    assert (padded[13 : 13 + 38] == 200).all()
    pixels = Pi0ImageProcessor(image_size=64)([Image.fromarray(img)])["pixel_values"][0, 3:6]
    want = torch.from_numpy(padded.astype(np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pixels, want, atol=1e-6, rtol=0)
    assert (pixels[:, :13] == -1).all()
