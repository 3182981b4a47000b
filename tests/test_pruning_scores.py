"""Scores: attention_rows vs a naive per-head softmax loop; semantic/action scores by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_vla_pruner.pruning import action_scores, attention_rows, debug_checks, semantic_scores
from vllm_vla_pruner.pruning import scores as scores_mod
from vllm_vla_pruner.pruning.checks import all_finite


@pytest.fixture(autouse=True, scope="module")
def _value_checks_on():
    """These tests exercise the value checks, which the engine's path runs only in debug."""
    with debug_checks():
        yield


def naive_rows(q, k, q_pos, k_pos=None, scale=None):
    """Per-row, per-head loop in float64: the definition attention_rows must match."""
    r, hq, d = q.shape
    t, hkv, _ = k.shape
    group = hq // hkv
    key_pos = list(range(t)) if k_pos is None else [int(p) for p in k_pos]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(r, t, dtype=torch.float64)
    for i in range(r):
        vis = [j for j in range(t) if key_pos[j] <= int(q_pos[i])]
        for h in range(hq):
            kv = h // group
            logits = torch.stack(
                [(q[i, h].double() * k[j, kv].double()).sum() * scale for j in vis]
            )
            p = torch.softmax(logits, dim=0)
            for n, j in enumerate(vis):
                out[i, j] += p[n] / hq
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_rows_matches_naive_gqa_and_causal(hq, hkv):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    t, d = 9, 8
    q = torch.randn(4, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    q_pos = torch.tensor([t - 1, 3, 0, 5])
    got = attention_rows(q, k, q_pos)
    want = naive_rows(q, k, q_pos)
    assert got.dtype == torch.float32 and got.shape == (4, t)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    # causality: nothing beyond each row's position, rows sum to 1
    for i, p in enumerate(q_pos.tolist()):
        assert torch.all(got[i, p + 1 :] == 0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(4))
    assert torch.equal(got[2], torch.tensor([1.0] + [0.0] * (t - 1)))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1)])
def test_attention_rows_bidirectional_sees_every_key(hq, hkv, monkeypatch):
    """pi0's prefix rows attend both ways: every row over all T keys (the naive loop with
    each row at the last position), whatever the row block size; bit-equal to the causal
    path given positions that hide no key."""
    g = torch.Generator().manual_seed(hq + hkv)
    t, d = 11, 8
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g)
    rows = torch.arange(t)  # row i at position i: a causal call would hide keys > i
    got = attention_rows(q, k, rows, bidirectional=True)
    want = naive_rows(q, k, torch.full((t,), t - 1))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[0, 1:] > 0)  # the first row sees the keys after it
    assert torch.equal(got, attention_rows(q, k, torch.full((t,), t - 1)))
    monkeypatch.setattr(scores_mod, "_MAX_BLOCK_ELEMS", hq * t * 2)  # two rows per block
    torch.testing.assert_close(attention_rows(q, k, rows, bidirectional=True), got)


def test_attention_rows_compacted_keys_and_scale():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 8, generator=g)
    k = torch.randn(5, 2, 8, generator=g)
    k_pos = torch.tensor([0, 1, 5, 6, 9])  # pruned key set: positions with gaps
    q_pos = torch.tensor([9, 6, 2])
    got = attention_rows(q, k, q_pos, k_positions=k_pos, scale=0.3)
    want = naive_rows(q, k, q_pos, k_pos, scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[1, 4:] == 0) and torch.all(got[2, 2:] == 0)


def test_attention_rows_chunked_and_low_precision(monkeypatch):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(7, 4, 8, generator=g)
    k = torch.randn(11, 2, 8, generator=g)
    q_pos = torch.arange(4, 11)
    full = attention_rows(q, k, q_pos)
    monkeypatch.setattr(scores_mod, "_MAX_BLOCK_ELEMS", 4 * 11 * 2)  # 2 rows per chunk
    torch.testing.assert_close(attention_rows(q, k, q_pos), full)
    bf = attention_rows(q.bfloat16(), k.bfloat16(), q_pos)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, full, atol=2e-2, rtol=0)


def test_attention_rows_feeds_semantic_scores():
    g = torch.Generator().manual_seed(3)
    t = 10
    q = torch.randn(t, 2, 4, generator=g)
    k = torch.randn(t, 1, 4, generator=g)
    attn = attention_rows(q, k, torch.arange(t))
    want = naive_rows(q, k, torch.arange(t))
    s = semantic_scores(attn, 1, 6)
    torch.testing.assert_close(s.double(), want[:, 1:7].mean(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(q=torch.zeros(2, 3, 4), k=torch.zeros(5, 2, 4), q_positions=torch.tensor([1, 2])),
            "GQA",
        ),
        (
            dict(q=torch.zeros(2, 2, 4), k=torch.zeros(5, 2, 8), q_positions=torch.tensor([1, 2])),
            "head dims",
        ),
        (
            dict(q=torch.zeros(2, 2, 4), k=torch.zeros(5, 2, 4), q_positions=torch.tensor([1])),
            "q_positions",
        ),
        (
            dict(q=torch.zeros(2, 4), k=torch.zeros(5, 2, 4), q_positions=torch.tensor([1, 2])),
            "q must be",
        ),
        (
            dict(
                q=torch.zeros(1, 2, 4),
                k=torch.zeros(3, 2, 4),
                q_positions=torch.tensor([1]),
                k_positions=torch.tensor([2, 3, 4]),
            ),
            "sees no key",
        ),
        (
            dict(
                q=torch.full((1, 2, 4), float("nan")),
                k=torch.zeros(3, 2, 4),
                q_positions=torch.tensor([1]),
            ),
            "non-finite",
        ),
        (
            dict(
                q=torch.zeros(1, 2, 4),
                k=torch.zeros(3, 2, 4),
                q_positions=torch.tensor([1]),
                k_positions=torch.tensor([0, 1]),
            ),
            "k_positions",
        ),
    ],
)
def test_attention_rows_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_rows(**kwargs)


def _hand_attn():
    # T = 6: BOS, 3 visual (cols 1..3), 2 text rows (4, 5). Values need not be normalised.
    a = torch.zeros(6, 6)
    a[4, 1:4] = torch.tensor([0.6, 0.0, 0.3])
    a[5, 1:4] = torch.tensor([0.0, 0.9, 0.3])
    a[2, 1:4] = torch.tensor([0.6, 0.0, 0.0])
    return a


def test_semantic_scores_row_choices_by_hand():
    a = _hand_attn()
    torch.testing.assert_close(semantic_scores(a, 1, 3), torch.tensor([1.2, 0.9, 0.6]) / 6)
    torch.testing.assert_close(semantic_scores(a, 1, 3, rows="last"), torch.tensor([0.0, 0.9, 0.3]))
    torch.testing.assert_close(
        semantic_scores(a, 1, 3, rows="text"), torch.tensor([0.3, 0.45, 0.3])
    )
    torch.testing.assert_close(
        semantic_scores(a, 1, 3, rows="text", text_start=5), torch.tensor([0.0, 0.9, 0.3])
    )


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((torch.zeros(6, 5), 1, 3), {}, "square"),
        ((torch.zeros(6, 6), 4, 3), {}, "does not fit"),
        ((torch.zeros(6, 6), 1, 0), {}, "num_visual"),
        ((torch.zeros(6, 6), 1, 3), {"rows": "first"}, "rows must be"),
        ((torch.zeros(6, 6), 1, 5), {"rows": "text"}, "text_start"),
    ],
)
def test_semantic_scores_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        semantic_scores(*args, **kwargs)


def test_action_scores_scatter_by_hand():
    rows = torch.tensor([[0.1, 0.2, 0.0, 0.4, 0.3], [0.3, 0.0, 0.1, 0.2, 0.4]])
    out = action_scores(rows, torch.tensor([1, 3, 4]), torch.tensor([0, 2, 5]), 6)
    torch.testing.assert_close(out, torch.tensor([0.1, 0.0, 0.3, 0.0, 0.0, 0.35]))
    # unpruned frame: identity mapping
    full = action_scores(rows, torch.tensor([1, 2, 3]), torch.arange(3), 3)
    torch.testing.assert_close(full, torch.tensor([0.1, 0.05, 0.3]))


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(2, 5), torch.tensor([1, 3]), torch.tensor([0, 0]), 4), "unique"),
        ((torch.zeros(2, 5), torch.tensor([1, 3]), torch.tensor([0]), 4), "entries"),
        ((torch.zeros(2, 5), torch.tensor([1, 9]), torch.tensor([0, 1]), 4), "visual_key_index"),
        ((torch.zeros(2, 5), torch.tensor([1, 3]), torch.tensor([0, 4]), 4), "kept_visual_ids"),
        ((torch.zeros(2, 5), torch.tensor([1, 3, 4]), torch.tensor([0, 1, 2]), 2), "num_visual"),
        ((torch.zeros(0, 5), torch.tensor([1]), torch.tensor([0]), 2), "action_rows"),
        ((torch.full((1, 5), float("inf")), torch.tensor([1]), torch.tensor([0]), 2), "non-finite"),
    ],
)
def test_action_scores_errors(args, match):
    with pytest.raises(ValueError, match=match):
        action_scores(*args)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 4),
    t=st.integers(1, 8),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2, 3]),
    gaps=st.booleans(),
)
def test_attention_rows_property_vs_naive(seed, rows, t, hkv, group, gaps):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, hkv * group, 4, generator=g) * 2
    k = torch.randn(t, hkv, 4, generator=g) * 2
    k_pos = torch.cumsum(torch.randint(1, 3, (t,), generator=g), 0) if gaps else None
    hi = int(k_pos[-1]) if gaps else t - 1
    lo = int(k_pos[0]) if gaps else 0
    q_pos = torch.randint(lo, hi + 1, (rows,), generator=g)
    got = attention_rows(q, k, q_pos, k_positions=k_pos)
    torch.testing.assert_close(got.double(), naive_rows(q, k, q_pos, k_pos), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(rows))


def test_all_finite_helper():
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(3, 1000).to(dtype)
            x[2, 777] = bad
            assert not all_finite(x)
            assert not all_finite(x.t())  # non-contiguous
