"""OpenVLA-OFT checkpoint layout (tiny-oft / bench-oft presets) and the plain-PyTorch oracle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vllm_vla_pruner.config import (
    OftSpec,
    is_oft_checkpoint,
    oft_spec,
    strip_ddp_prefix,
)
from vllm_vla_pruner.research.checkpoint import build_checkpoint, build_config, preset_config
from vllm_vla_pruner.research.reference_oft import ReferenceOFT

INSTRUCTION = "pick up the red block"


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory):
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft"), seed=3)


@pytest.fixture(scope="module")
def ref(oft_dir):
    return ReferenceOFT.from_pretrained(oft_dir)


def _images(seed: int, n: int = 2, side: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 6, side, side, generator=g) for _ in range(n)]


STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]


# ----------------------------------------------------------------------------- layout


def test_presets_describe_oft_libero_layout():
    bench = preset_config("bench-oft")
    oft = bench["oft"]
    assert bench["num_visual_tokens"] == 256 and bench["num_hidden_layers"] == 32
    assert (oft["num_images_in_input"], oft["num_actions_chunk"], oft["action_dim"]) == (2, 8, 7)
    assert oft["proprio_dim"] == 8 and oft["normalization"] == "bounds_q99"
    cfg = build_config(bench)
    assert cfg["architectures"] == ["OpenVLAForActionPrediction"]  # published OFT config
    assert cfg["oft"]["num_actions_chunk"] == 8
    assert preset_config("bench")["oft"] is None
    with pytest.raises(ValueError, match="normalization"):
        preset_config("tiny-oft", oft={"normalization": "normal"})


def test_tiny_oft_files_in_published_layout(oft_dir):
    names = {p.name for p in oft_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "action_head--150000_checkpoint.pt",
        "proprio_projector--150000_checkpoint.pt",
        "dataset_statistics.json",
    } <= names
    head = torch.load(oft_dir / "action_head--150000_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in head)  # saved from DDP, as published
    assert head["module.model.fc1.weight"].shape == (128, 128 * 7)
    assert head["module.model.mlp_resnet_blocks.1.ffn.1.weight"].shape == (128, 128)
    proprio = torch.load(oft_dir / "proprio_projector--150000_checkpoint.pt", weights_only=True)
    assert proprio["module.fc1.weight"].shape == (128, 8)
    stats = json.loads((oft_dir / "dataset_statistics.json").read_text())
    entry = stats["libero_spatial_no_noops"]
    assert len(entry["action"]["q99"]) == 7 and len(entry["proprio"]["q01"]) == 8
    assert entry["action"]["mask"] == [True] * 6 + [False]
    assert is_oft_checkpoint(oft_dir)


def test_spec_from_files_and_platform_defaults(oft_dir, tmp_path):
    spec = oft_spec(oft_dir)
    assert spec == OftSpec(
        2, 3, 7, 8, "bounds_q99", "libero_spatial_no_noops",
        "action_head--150000_checkpoint.pt", "proprio_projector--150000_checkpoint.pt",
    )  # fmt: skip
    assert spec.num_placeholders == 21 and spec.num_action_rows == 22
    # A published config.json has no "oft" section: LIBERO's constants, from the dataset key.
    plain = tmp_path / "published"
    shutil.copytree(oft_dir, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["oft"]
    (plain / "config.json").write_text(json.dumps(cfg))
    assert (oft_spec(plain).chunk, oft_spec(plain).num_images) == (8, 2)
    stats = json.loads((plain / "dataset_statistics.json").read_text())
    (plain / "dataset_statistics.json").write_text(
        json.dumps({"aloha_fold_shirt": stats["libero_spatial_no_noops"]})
    )
    aloha = oft_spec(plain)
    assert (aloha.chunk, aloha.normalization, aloha.bound_keys) == (25, "bounds", ("min", "max"))
    with pytest.raises(ValueError, match="unnorm_key"):
        oft_spec(plain, "libero_goal")
    assert strip_ddp_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert not is_oft_checkpoint(tmp_path)


def test_reference_loads_heads_without_ddp_prefix(oft_dir, ref, tmp_path):
    plain = tmp_path / "no_ddp"
    shutil.copytree(oft_dir, plain)
    for name in ("action_head", "proprio_projector"):
        path = plain / f"{name}--150000_checkpoint.pt"
        torch.save(strip_ddp_prefix(torch.load(path, weights_only=True)), path)
    other = ReferenceOFT.from_pretrained(plain)
    imgs = _images(0)
    a = ref.predict_chunk(imgs, INSTRUCTION, STATE).actions
    assert torch.equal(other.predict_chunk(imgs, INSTRUCTION, STATE).actions, a)


# ----------------------------------------------------------------------------- the oracle


def test_sequence_layout(ref):
    inputs = ref.build_inputs(_images(1), INSTRUCTION, STATE)
    ids = ref.base.prompt_token_ids(INSTRUCTION)
    m = ref.base.num_visual
    assert inputs.num_visual == 2 * m
    assert inputs.action_start == 1 + 2 * m + 1 + (len(ids) - 1)  # BOS, views, proprio, text
    assert inputs.total_len == inputs.action_start + 21 + 1
    emb = inputs.inputs_embeds
    a0 = inputs.action_start
    assert torch.count_nonzero(emb[a0 : a0 + 21]) == 0  # zeroed placeholders
    table = ref.base.language_model.get_input_embeddings().weight
    assert torch.equal(emb[-1], table[2])  # the stop token "</s>"
    assert torch.equal(emb[0], table[ids[0]]) and torch.equal(emb[a0 - 1], table[ids[-1]])
    with pytest.raises(ValueError, match="camera views"):
        ref.build_inputs(_images(1, n=1), INSTRUCTION, STATE)
    with pytest.raises(ValueError, match="state"):
        ref.build_inputs(_images(1), INSTRUCTION, None)


def _hf_hidden(ref, inputs, attention: str) -> torch.Tensor:
    """transformers' own Llama forward with an explicit 4D mask: an independent check of the
    reference's hand-written layer loop and of the head's row shift."""
    t, a0 = inputs.total_len, inputs.action_start
    pos = torch.arange(t)
    if attention == "bidirectional":
        visible = torch.ones(t, t, dtype=torch.bool)
    else:
        visible = (pos[None] <= pos[:, None]) | ((pos[:, None] >= a0) & (pos[None] >= a0))
    mask = torch.zeros(t, t).masked_fill(~visible, float("-inf"))[None, None]
    out = ref.base.language_model.model(
        inputs_embeds=inputs.inputs_embeds[None], attention_mask=mask, position_ids=pos[None]
    )
    return out.last_hidden_state[0]


@pytest.mark.parametrize("attention", ["prefix_causal", "bidirectional"])
def test_forward_matches_transformers_with_block_mask(ref, attention):
    inputs = ref.build_inputs(_images(2), INSTRUCTION, STATE)
    out = ref.forward_inputs(inputs, attention=attention)
    with torch.no_grad():
        hidden = _hf_hidden(ref, inputs, attention)
    a0 = inputs.action_start
    rows = hidden[a0 - 1 : a0 - 1 + 21]  # the row before each action token
    torch.testing.assert_close(out.head_rows, rows, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        expected = ref.action_head.model(rows.reshape(3, -1))
    torch.testing.assert_close(out.normalized, expected, rtol=1e-4, atol=1e-4)


def test_action_rows_are_bidirectional_prompt_rows_causal(ref):
    inputs = ref.build_inputs(_images(3), INSTRUCTION, STATE)
    changed = ref.build_inputs(_images(3), INSTRUCTION, STATE)
    changed.inputs_embeds = changed.inputs_embeds.clone()
    changed.inputs_embeds[-1] += 1.0  # only the stop token, the last row
    base = ref.forward_inputs(inputs)
    other = ref.forward_inputs(changed)
    # Row 0 the head reads is the last prompt row: causal, blind to the stop token.
    torch.testing.assert_close(other.head_rows[0], base.head_rows[0], rtol=0, atol=0)
    # Every placeholder sees the stop token (bidirectional block).
    assert (other.head_rows[1:] - base.head_rows[1:]).abs().amax(dim=1).min() > 1e-4
    full_a = ref.forward_inputs(inputs, attention="bidirectional")
    full_b = ref.forward_inputs(changed, attention="bidirectional")
    assert (full_b.head_rows[0] - full_a.head_rows[0]).abs().max() > 1e-4


def test_chunk_depends_on_every_input(ref):
    imgs = _images(4)
    base = ref.predict_chunk(imgs, INSTRUCTION, STATE).actions
    assert base.shape == (3, 7)
    assert base.std(dim=0)[:6].min() > 0  # the chunk's steps differ
    swapped = ref.predict_chunk(imgs[::-1], INSTRUCTION, STATE).actions
    other_state = ref.predict_chunk(imgs, INSTRUCTION, [0.0] * 8).actions
    other_text = ref.predict_chunk(imgs, "open the drawer", STATE).actions
    for other in (swapped, other_state, other_text):
        assert (other - base).abs().max() > 1e-3


def test_normalisation_matches_oft_formulas(ref):
    stats = ref.stats["libero_spatial_no_noops"]
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    mask = np.array(stats["action"]["mask"])
    x = np.linspace(-1.2, 1.2, 7)
    expected = np.where(mask, 0.5 * (x + 1) * (q99 - q01 + 1e-8) + q01, x)
    got = ref.unnormalize_actions(torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    p01, p99 = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    s = np.array([p01[0] - 1.0, *p99[1:3], *((p01 + p99) / 2)[3:]])
    want = np.clip(2 * (s - p01) / (p99 - p01 + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(ref.normalize_state(s).numpy(), want, rtol=0, atol=1e-12)
    assert want[0] == -1.0  # out-of-range states are clipped, as OFT does


def test_pruned_forward(ref):
    inputs = ref.build_inputs(_images(5), INSTRUCTION, STATE)
    m = inputs.num_visual
    full = ref.forward_inputs(inputs)
    keep_all = ref.forward_inputs(inputs, keep_visual=torch.arange(m), prune_layer=2)
    torch.testing.assert_close(keep_all.actions, full.actions, rtol=0, atol=0)
    # One budget over both views: a quarter of all visual tokens, from either camera.
    keep = torch.cat([torch.arange(0, 10), torch.arange(m // 2 + 5, m // 2 + 27)])
    pruned = ref.forward_inputs(inputs, keep_visual=keep, prune_layer=2, return_attn_layers=[4])
    assert pruned.positions[1].numel() == inputs.total_len
    assert pruned.positions[2].numel() == inputs.total_len - (m - keep.numel())
    assert (pruned.actions - full.actions).abs().max() > 1e-4
    attn = pruned.attn[4]
    assert attn.shape == (pruned.positions[4].numel(),) * 2
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(attn.shape[0]))
