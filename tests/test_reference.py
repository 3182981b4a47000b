"""The plain-PyTorch reference: tower name mapping, decoder loop, pruning, training path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from vllm_vla_pruner.actions import UnknownUnnormKey
from vllm_vla_pruner.config import tower_specs
from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.research.reference import ReferenceOpenVLA

INSTRUCTIONS = ["pick up the red block", "open the top drawer", "put the bowl on the plate"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)) for _ in range(2)]
    x = np.linspace(0, 255, 80)
    grad = np.stack(
        [np.add.outer(x, x) / 2, np.outer(x, np.ones(80)), 255 - np.add.outer(x, 0 * x)], -1
    )
    imgs.append(Image.fromarray(grad.astype(np.uint8)))
    return imgs


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> ReferenceOpenVLA:
    return ReferenceOpenVLA.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="module")
def pixels(ref) -> list[torch.Tensor]:
    return [ref.pixel_values(img) for img in _images()]


def naive_timm_tower(w: dict, prefix: str, spec, px: torch.Tensor) -> torch.Tensor:
    """timm ViT semantics in plain torch ops: OpenVLA's get_intermediate_layers(n={depth-2})."""

    def g(name):
        return w[prefix + name]

    b, d, h = px.shape[0], spec.width, spec.num_heads
    x = F.conv2d(
        px, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=spec.patch_size
    )
    x = x.flatten(2).transpose(1, 2) + g("pos_embed")  # position embeddings on patches only
    prefix_tokens = []
    if spec.class_token:
        prefix_tokens.append(g("cls_token").expand(b, -1, -1))
    if spec.num_registers:
        prefix_tokens.append(g("reg_token").expand(b, -1, -1))
    x = torch.cat(prefix_tokens + [x], dim=1)
    n = x.shape[1]
    act = (lambda t: F.gelu(t, approximate="tanh")) if spec.act == "gelu_tanh" else F.gelu
    for i in range(spec.depth - 1):  # blocks 0 .. depth-2
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), g(p + "norm1.weight"), g(p + "norm1.bias"), spec.norm_eps)
        qkv = F.linear(y, g(p + "attn.qkv.weight"), g(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-1, -2)) * (d // h) ** -0.5).softmax(-1) @ v
        a = F.linear(
            a.transpose(1, 2).reshape(b, n, d), g(p + "attn.proj.weight"), g(p + "attn.proj.bias")
        )
        x = x + (a * g(p + "ls1.scale_factor") if spec.layer_scale else a)
        y = F.layer_norm(x, (d,), g(p + "norm2.weight"), g(p + "norm2.bias"), spec.norm_eps)
        y = F.linear(
            act(F.linear(y, g(p + "mlp.fc1.weight"), g(p + "mlp.fc1.bias"))),
            g(p + "mlp.fc2.weight"),
            g(p + "mlp.fc2.bias"),
        )
        x = x + (y * g(p + "ls2.scale_factor") if spec.layer_scale else y)
    return x[:, spec.num_prefix_tokens :]  # no final norm


def test_hf_towers_match_naive_timm(ref, tiny_ckpt, pixels):
    w = load_file(str(tiny_ckpt / "model.safetensors"))
    dino, siglip = tower_specs(json.loads((tiny_ckpt / "config.json").read_text()))
    px = torch.cat(pixels[:2])
    expected = torch.cat(
        [
            naive_timm_tower(w, "vision_backbone.featurizer.", dino, px[:, :3]),
            naive_timm_tower(w, "vision_backbone.fused_featurizer.", siglip, px[:, 3:]),
        ],
        dim=-1,
    )
    with torch.no_grad():
        got = ref.vision_features(px)
    assert got.shape == (2, 64, dino.width + siglip.width)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got[0] - got[1]).abs().mean() > 0.1  # features depend on the image


def test_build_inputs_layout(ref, pixels):
    emb, ids, start, m = ref.build_inputs(pixels[0], INSTRUCTIONS[0])
    prompt = ref.prompt_token_ids(INSTRUCTIONS[0])
    assert (start, m) == (1, 64)
    assert ids.tolist() == prompt[:1] + [1024] * 64 + prompt[1:]
    assert emb.shape == (len(ids), 128)
    with torch.no_grad():
        torch.testing.assert_close(emb[1:65], ref.visual_embeddings(pixels[0]))
        torch.testing.assert_close(emb[65:], ref.language_model.get_input_embeddings()(ids[65:]))


def test_outputs_vary_with_image_and_instruction(ref, pixels):
    outs = {
        (i, j): ref.generate(px, ins, max_new_tokens=7).token_ids
        for i, px in enumerate(pixels)
        for j, ins in enumerate(INSTRUCTIONS[:2])
    }
    for j in range(2):  # different images -> different greedy actions
        seqs = [tuple(outs[i, j]) for i in range(len(pixels))]
        assert len(set(seqs)) == len(seqs)
    for i in range(len(pixels)):  # different instructions -> different greedy actions
        assert outs[i, 0] != outs[i, 1]
    tokens = [t for seq in outs.values() for t in seq]
    assert sum(768 <= t < 1024 for t in tokens) / len(tokens) > 0.9  # mostly action tokens
    assert len(set(tokens)) > 20


def test_generate_default_length_follows_unnorm_key(ref, pixels):
    with pytest.raises(UnknownUnnormKey):
        ref.generate(pixels[0], INSTRUCTIONS[0])  # two datasets: the key is required
    out = ref.generate(pixels[0], INSTRUCTIONS[0], unnorm_key="other_robot")
    assert len(out.token_ids) == 4 and out.logits.shape == (4, 1088)
    action = ref.predict_action(_images()[0], INSTRUCTIONS[0], unnorm_key="tiny_robot")
    assert len(action) == 7 and all(isinstance(a, float) for a in action)


def test_decoder_loop_matches_hf_forward(ref, pixels):
    """The hand-written loop + KV cache equals transformers' own Llama forward."""
    out = ref.generate(pixels[1], INSTRUCTIONS[2], max_new_tokens=5)
    prompt = torch.tensor([ref.prompt_token_ids(INSTRUCTIONS[2]) + out.token_ids[:-1]])
    with torch.no_grad():
        tf = ref(pixels[1], prompt)
    t = out.prompt_len
    steps = tf.logits[0, t - 1 :].float()
    torch.testing.assert_close(steps, out.logits, rtol=1e-4, atol=1e-4)
    assert steps.argmax(-1).tolist() == out.token_ids


def test_attention_records_match_hf_eager(ref, pixels):
    out = ref.generate(pixels[0], INSTRUCTIONS[0], max_new_tokens=3, return_attn_layers=[0, 2])
    t = out.prompt_len
    ids = torch.tensor([ref.prompt_token_ids(INSTRUCTIONS[0])])
    full, _, _ = ref.expand_image_tokens(ids)
    with torch.no_grad():
        emb = ref.language_model.get_input_embeddings()(full.masked_fill(full == 1024, 0))
        emb[0, 1:65] = ref.visual_embeddings(pixels[0])
        ref.language_model.config._attn_implementation = "eager"
        try:
            hf = ref.language_model(inputs_embeds=emb, output_attentions=True)
        finally:
            ref.language_model.config._attn_implementation = "sdpa"
    for layer in (0, 2):
        rec = out.attn[layer]
        assert rec.probs.shape == (t + 2, t + 2) and rec.num_prefill_rows == t
        torch.testing.assert_close(
            rec.prefill, hf.attentions[layer][0].mean(0), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(rec.probs.sum(-1), torch.ones(t + 2))
        assert torch.equal(rec.query_positions, torch.arange(t + 2))
        assert rec.action_rows().shape == (3, t + 2)
        assert torch.equal(rec.dense(), rec.probs)


def test_pruned_keep_all_equals_unpruned_exactly(ref, pixels):
    base = ref.generate(pixels[2], INSTRUCTIONS[1], max_new_tokens=7, return_attn_layers=[3, 4])
    pruned = ref.generate(
        pixels[2],
        INSTRUCTIONS[1],
        max_new_tokens=7,
        keep_visual=torch.arange(64),
        prune_layer=3,
        return_attn_layers=[3, 4],
    )
    assert pruned.token_ids == base.token_ids
    assert torch.equal(pruned.logits, base.logits)
    for layer in (3, 4):
        assert torch.equal(pruned.attn[layer].probs, base.attn[layer].probs)


def test_pruned_prefill_equals_hf_on_kept_rows(ref, pixels):
    """prune_layer=0 is HF's Llama on the kept rows with their original positions."""
    keep = torch.tensor([40, 3, 17, 60, 8, 33])  # any order: the reference sorts
    out = ref.generate(
        pixels[0], INSTRUCTIONS[0], max_new_tokens=1, keep_visual=keep, prune_layer=0
    )
    emb, _, start, m = ref.build_inputs(pixels[0], INSTRUCTIONS[0])
    t = emb.shape[0]
    rows = torch.cat([torch.arange(start), start + keep.sort().values, torch.arange(start + m, t)])
    with torch.no_grad():
        hf = ref.language_model(inputs_embeds=emb[rows][None], position_ids=rows[None])
    torch.testing.assert_close(hf.logits[0, -1].float(), out.logits[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.kept_positions, rows)


def test_pruning_layout_and_effect(ref, pixels):
    keep = torch.arange(0, 64, 4)  # 16 of 64
    base = ref.generate(pixels[1], INSTRUCTIONS[0], max_new_tokens=3)
    out = ref.generate(
        pixels[1],
        INSTRUCTIONS[0],
        max_new_tokens=3,
        keep_visual=keep,
        prune_layer=3,
        return_attn_layers=[2, 3],
    )
    t = out.prompt_len
    assert not torch.equal(out.logits, base.logits)
    assert out.attn[2].probs.shape == (t + 2, t + 2)  # below K: every token
    kept = out.attn[3]
    r = t - 64 + 16
    assert kept.num_prefill_rows == r and kept.probs.shape == (r + 2, r + 2)
    assert kept.key_positions[1:17].tolist() == (1 + keep).tolist()
    assert kept.key_positions[-2:].tolist() == [t, t + 1]  # decode tokens continue at T, T+1
    dense = kept.dense(t + 2)
    dropped = [1 + i for i in range(64) if i % 4]
    assert dense[:, dropped].abs().sum() == 0
    for bad in ([64], [-1], [2, 2]):
        with pytest.raises(ValueError):
            ref.generate(pixels[1], INSTRUCTIONS[0], max_new_tokens=1, keep_visual=bad)


def test_batched_teacher_forcing(ref, pixels):
    a = ref.prompt_token_ids(INSTRUCTIONS[0]) + [1000, 900]
    b = ref.prompt_token_ids(INSTRUCTIONS[1]) + [800, 990]
    n = max(len(a), len(b))
    ids = torch.tensor([a + [2] * (n - len(a)), b + [2] * (n - len(b))])  # right padding
    mask = torch.tensor([[1] * len(a) + [0] * (n - len(a)), [1] * len(b) + [0] * (n - len(b))])
    labels = torch.full_like(ids, -100)
    labels[0, len(a) - 2 : len(a)] = torch.tensor(a[-2:])
    labels[1, len(b) - 2 : len(b)] = torch.tensor(b[-2:])
    px = torch.cat(pixels[:2])
    out = ref(px, ids, labels=labels, attention_mask=mask)
    assert out.input_ids.shape == (2, n + 64) and torch.isfinite(out.loss)
    assert (out.labels[:, 1:65] == -100).all()
    with torch.no_grad():
        single = ref(pixels[0], torch.tensor([a]))
    torch.testing.assert_close(out.logits[0, : len(a) + 64], single.logits[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # placeholders already present: same result
        again = ref(px, out.input_ids, attention_mask=out.attention_mask)
    torch.testing.assert_close(again.logits, out.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    assert ref.projector.fc1.weight.grad.abs().sum() > 0
    assert ref.towers[0].encoder.layer[0].attention.q_proj.weight.grad.abs().sum() > 0
    cls_pos_grad = ref.towers[0].embeddings.position_embeddings.grad[:, 0]
    assert cls_pos_grad.abs().sum() == 0  # timm has no class position embedding
    ref.zero_grad(set_to_none=True)


def test_save_pretrained_round_trip(ref, tiny_ckpt, tmp_path, pixels):
    out = ref.save_pretrained(tmp_path / "copy")
    orig = load_file(str(tiny_ckpt / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(orig)
    for k in orig:
        assert torch.equal(saved[k], orig[k]), k
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (tiny_ckpt / "config.json").read_text()
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    again = ReferenceOpenVLA.from_pretrained(out)
    a = ref.generate(pixels[0], INSTRUCTIONS[0], max_new_tokens=3)
    b = again.generate(pixels[0], INSTRUCTIONS[0], max_new_tokens=3)
    assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)


ODD_TOWERS = [
    {"family": "dinov2", "width": 32, "depth": 3, "num_heads": 2, "patch_size": 4,
     "mlp_hidden": 72, "class_token": True},  # no registers/LayerScale, mlp ratio 2.25
    {"family": "siglip", "width": 24, "depth": 2, "num_heads": 2, "patch_size": 4,
     "mlp_hidden": 40},
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_fused_vision_backbone": False, "image_size": 32, "action_dims": {"solo": 3}},
        {"towers": ODD_TOWERS, "image_size": 16, "action_dims": {"solo": 3}},
    ],
    ids=["single-tower", "odd-towers"],
)
def test_other_shapes(tmp_path, overrides):
    ckpt = build_checkpoint("tiny", tmp_path / "ckpt", num_hidden_layers=4, **overrides)
    model = ReferenceOpenVLA.from_pretrained(ckpt)
    img = _images()[2]
    px = model.pixel_values(img)
    w = load_file(str(ckpt / "model.safetensors"))
    prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
    naive = [
        naive_timm_tower(w, p, spec, px[:, :3] if spec.family == "dinov2" else px[:, 3:])
        for p, spec in zip(prefixes, model.specs)
    ]
    with torch.no_grad():
        got = model.vision_features(px)
    torch.testing.assert_close(got, torch.cat(naive, dim=-1), rtol=1e-4, atol=1e-4)
    out = model.generate(img, "push the button")
    prompt_len = len(model.prompt_token_ids("push the button")) + 16
    assert len(out.token_ids) == 3 and out.prompt_len == prompt_len
    assert len(model.predict_action(img, "push the button")) == 3
    model.save_pretrained(tmp_path / "copy")
    saved = load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert set(saved) == set(w) and all(torch.equal(saved[k], w[k]) for k in w)
