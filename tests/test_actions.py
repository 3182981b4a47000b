"""Action decoding/encoding against hand-computed OpenVLA numbers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_vla_pruner.actions import (
    ActionDecoder,
    EmptyInstruction,
    InvalidActions,
    InvalidActionTokens,
    InvalidNormStats,
    UnknownUnnormKey,
)

V = 1024  # tokenizer vocabulary; text vocab 1088 = V + pad_to_multiple_of
HALF_BIN = 1 / 255  # bins over [-1, 1] are 2/255 wide

NORM_STATS = {
    "arm": {
        "action": {
            "q01": [-1.0, 0.0, 10.0],
            "q99": [1.0, 2.0, 20.0],
            "mask": [True, True, False],
        }
    },
    "quad": {"action": {"q01": [-0.5] * 4, "q99": [0.5] * 4}},  # no mask: all True
}


def make_config(norm_stats=NORM_STATS, **extra):
    return {
        "text_config": {"vocab_size": V + 64},
        "pad_to_multiple_of": 64,
        "n_action_bins": 256,
        "norm_stats": norm_stats,
        **extra,
    }


@pytest.fixture
def dec() -> ActionDecoder:
    return ActionDecoder.from_config(make_config())


def test_bins_and_centers(dec):
    assert dec.vocab_size == V
    assert len(dec.bins) == 256 and dec.bins[0] == -1.0 and dec.bins[-1] == 1.0
    assert len(dec.bin_centers) == 255
    assert dec.bin_centers[0] == pytest.approx(-1 + 1 / 255)
    assert dec.bin_centers[127] == pytest.approx(0.0, abs=1e-12)
    assert dec.bin_centers[254] == pytest.approx(1 - 1 / 255)
    assert dec.action_token_ids == range(V - 256, V)


def test_hand_computed_decode(dec):
    # token V-1 -> bin 0 (centre -254/255); V-128 -> bin 127 (0.0); V-255 -> bin 254.
    n0, n254 = -1 + 1 / 255, 1 - 1 / 255
    a = dec.decode([V - 1, V - 128, V - 255], "arm")
    # dim 0: q01=-1,q99=1 -> identity; dim 1: q01=0,q99=2 -> n+1; dim 2: mask False -> n.
    assert a == pytest.approx([n0, 0.0 + 1.0, n254])
    a = dec.decode([V - 255, V - 1, V - 1], "arm")
    assert a == pytest.approx([n254, n0 + 1.0, n0])
    # 4-dim key, all masked: 0.5*(n+1)*(0.5-(-0.5)) - 0.5 = n/2
    q = dec.decode([V - 1, V - 128, V - 255, V - 128], "quad")
    assert q == pytest.approx([n0 / 2, 0.0, n254 / 2, 0.0])
    assert len(q) == dec.action_dim("quad") == 4


def test_decode_clips_out_of_range_tokens(dec):
    n0, n254 = -1 + 1 / 255, 1 - 1 / 255
    # V-256 -> bin 255 -> clipped to 254; any text token far below -> 254;
    # ids >= V (pad/image rows) -> negative bin -> 0.
    assert dec.decode([V - 256, 5, V + 10], "arm") == pytest.approx([n254, n254 + 1, n0])
    assert dec.token_bins([V - 256, 5, V, V + 63]).tolist() == [254, 254, 0, 0]


def test_mask_false_dim_is_not_unnormalized():
    stats = {"g": {"action": {"q01": [100.0], "q99": [200.0], "mask": [False]}}}
    d = ActionDecoder.from_config(make_config(stats))
    assert d.decode([V - 128]) == pytest.approx([0.0])
    stats["g"]["action"]["mask"] = [True]
    d = ActionDecoder.from_config(make_config(stats))
    assert d.decode([V - 128]) == pytest.approx([150.0])


def test_unnorm_key_resolution(dec):
    assert dec.unnorm_keys == ["arm", "quad"]
    assert dec.default_unnorm_key is None
    with pytest.raises(UnknownUnnormKey) as e:
        dec.decode([V - 1] * 3)
    assert "arm" in str(e.value) and "quad" in str(e.value) and e.value.key is None
    with pytest.raises(UnknownUnnormKey) as e:
        dec.decode([V - 1] * 3, "bridge_orig")
    assert isinstance(e.value, ValueError) and e.value.valid == ["arm", "quad"]
    assert "bridge_orig" in str(e.value)
    with pytest.raises(UnknownUnnormKey):
        dec.action_dim(7)  # type: ignore[arg-type]
    single = ActionDecoder.from_config(make_config({"only": NORM_STATS["quad"]}))
    assert single.default_unnorm_key == "only"
    assert single.action_dim() == 4
    assert single.decode([V - 128] * 4) == pytest.approx([0.0] * 4)


@pytest.mark.parametrize(
    "tokens",
    [
        [V - 1, V - 2],
        [V - 1] * 4,
        [[V - 1, V - 2, V - 3]],
        [1.5, 2.0, 3.0],
        "abc",
        [-1, V - 1, V - 1],
    ],
)
def test_decode_rejects_bad_tokens(dec, tokens):
    with pytest.raises(InvalidActionTokens):
        dec.decode(tokens, "arm")


def test_decode_accepts_numpy_and_torch(dec):
    import torch

    ref = dec.decode([V - 3, V - 100, V - 200], "arm")
    assert dec.decode(np.array([V - 3, V - 100, V - 200]), "arm") == ref
    assert dec.decode(torch.tensor([V - 3, V - 100, V - 200]), "arm") == ref


def test_encode_hand_computed(dec):
    # normalised 0 -> digitize -> 128 -> token V-128 (decodes to centre 0 exactly)
    assert dec.encode([0.0, 1.0, 0.0], "arm") == [V - 128] * 3
    # beyond q99 clips to 1.0 -> digitize 256 -> V-256; below q01 -> -1 -> 1 -> V-1
    assert dec.encode([5.0, -3.0, 0.999], "arm") == [V - 256, V - 1, V - 255]
    # mask False dims are clipped to [-1, 1] directly, not normalised
    assert dec.encode([0.0, 1.0, 15.0], "arm")[2] == V - 256


def test_encode_decode_round_trip_within_half_bin(dec):
    rng = np.random.default_rng(0)
    for key in ("arm", "quad"):
        st = NORM_STATS[key]["action"]
        q01, q99 = np.array(st["q01"]), np.array(st["q99"])
        mask = np.array(st.get("mask", [True] * len(q01)))
        for _ in range(200):
            a = np.where(mask, rng.uniform(q01, q99), rng.uniform(-1, 1, size=len(q01)))
            tokens = dec.encode(a, key)
            assert all(t in dec.action_token_ids for t in tokens)
            back = np.array(dec.decode(tokens, key))
            tol = np.where(mask, (q99 - q01) / 2 * HALF_BIN, HALF_BIN) + 1e-9
            assert (np.abs(back - a) <= tol).all()


@pytest.mark.parametrize("actions", [[0.0, 1.0], [0.0, 1.0, float("nan")], [[0.0, 1.0, 2.0]], "x"])
def test_encode_rejects_bad_actions(dec, actions):
    with pytest.raises(InvalidActions):
        dec.encode(actions, "arm")


@pytest.mark.parametrize(
    "stats",
    [
        {},
        {"a": {"proprio": {}}},
        {"a": {"action": {"q01": [0.0, 1.0], "q99": [1.0]}}},
        {"a": {"action": {"q01": [0.0], "q99": [1.0], "mask": [True, False]}}},
    ],
)
def test_bad_norm_stats(stats):
    with pytest.raises(InvalidNormStats):
        ActionDecoder.from_config(make_config(stats))


def test_from_hf_style_config_object():
    cfg = SimpleNamespace(
        text_config=SimpleNamespace(vocab_size=32064),
        pad_to_multiple_of=64,
        n_action_bins=256,
        norm_stats={"bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}},
    )
    d = ActionDecoder.from_config(cfg)
    assert d.vocab_size == 32000  # OpenVLA-7B: 32064 - 64
    assert d.action_token_ids == range(31744, 32000)
    assert d.suffix_token_id is None


def test_from_pretrained_tiny(tiny_ckpt):
    d = ActionDecoder.from_pretrained(tiny_ckpt)
    assert d.unnorm_keys == ["tiny_robot", "other_robot"]
    assert d.action_dim("tiny_robot") == 7 and d.action_dim("other_robot") == 4
    assert d.action_token_ids == range(768, 1024)
    assert d.suffix_token_id == 259
    out = d.decode([1023, 900, 800, 768, 1000, 950, 1023], "tiny_robot")
    assert len(out) == 7 and out[-1] == pytest.approx(-1 + 1 / 255)  # gripper: mask False


def test_prompt_token_ids_with_tiny_tokenizer(tiny_ckpt):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_ckpt))
    d = ActionDecoder.from_pretrained(tiny_ckpt)
    ids = d.prompt_token_ids(tok, "  pick up the red block ")
    assert ids[0] == tok.bos_token_id == 1
    assert ids[-1] == 259 and tok.convert_ids_to_tokens(259) == "▁"
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "In: What action should the robot take to pick up the red block?\nOut: "
    for bad in ("", "   ", None, 3):
        with pytest.raises(EmptyInstruction):
            d.prompt_token_ids(tok, bad)  # type: ignore[arg-type]


def test_prompt_token_ids_llama_conventions():
    """A tokenizer that adds no BOS, and a config without the suffix id (openvla-7b)."""

    class Tok:
        bos_token_id = 1

        def encode(self, text, add_special_tokens=True):
            return [7, 8, 9]

        def convert_tokens_to_ids(self, token):
            assert token == "▁"
            return 29871

    d = ActionDecoder.from_config(make_config())
    assert d.prompt_token_ids(Tok(), "go") == [1, 7, 8, 9, 29871]
