"""Pruner registry: hand-computed cases for every pruner, invariants, batching, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_vla_pruner.pruning import (
    PRUNERS,
    PruneInputs,
    budget_for,
    debug_checks,
    get_pruner,
    needs_action_history,
    register_pruner,
    select_batch,
    select_tokens,
)
from vllm_vla_pruner.pruning import pruners as pruners_mod


@pytest.fixture(autouse=True, scope="module")
def _value_checks_on():
    """These tests exercise the value checks, which the engine's path runs only in debug."""
    with debug_checks():
        yield


ALL_METHODS = sorted(PRUNERS)
HISTORY_METHODS = {"vlapruner", "score_fusion", "action_only"}
HAND_EMB = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [-1.0, 0.0]])


def hand_inputs(**overrides) -> PruneInputs:
    """T=7: BOS, visual tokens at columns 1..4, text rows 5 and 6.

    column sums ('all'): v0 1.5, v1 0.8, v2 0.3, v3 0.6
    last row (fastv):    [0.1, 0.4, 0.2, 0.3]
    sparsevlm: text relevance 1.2 (row 5) and 1.0 (row 6), mean 1.1 -> rater row 5 only:
                         [0.5, 0.3, 0.1, 0.3]
    action estimate:     [0.0, 0.1, 0.7, 0.9]
    """
    a = torch.zeros(7, 7)
    a[2, 1:5] = torch.tensor([0.9, 0.1, 0.0, 0.0])
    a[5, 1:5] = torch.tensor([0.5, 0.3, 0.1, 0.3])
    a[6, 1:5] = torch.tensor([0.1, 0.4, 0.2, 0.3])
    base = dict(
        attn=a,
        visual_start=1,
        num_visual=4,
        embeddings=HAND_EMB.clone(),
        action_estimate=torch.tensor([0.0, 0.1, 0.7, 0.9]),
    )
    base.update(overrides)
    return PruneInputs(**base)


def sel(method: str, budget: int, **overrides) -> list[int]:
    return select_tokens(hand_inputs(**overrides), method, budget).tolist()


def test_registry_has_every_pruner():
    assert set(ALL_METHODS) >= {
        "vlapruner",
        "fastv",
        "sparsevlm",
        "divprune",
        "score_fusion",
        "semantic_only",
        "action_only",
        "random",
        "grid",
        "none",
    }
    for m in ALL_METHODS:
        assert needs_action_history(m) == (m in HISTORY_METHODS)


def test_fastv_by_hand():
    assert sel("fastv", 1) == [1]
    assert sel("fastv", 2) == [1, 3]
    assert sel("fastv", 3) == [1, 2, 3]


def test_semantic_only_by_hand_all_rows():
    assert sel("semantic_only", 1) == [0]
    assert sel("semantic_only", 2) == [0, 1]
    assert sel("semantic_only", 3) == [0, 1, 3]
    # text rows: [0.3, 0.35, 0.15, 0.3] -> 1, then tie 0/3 -> 0
    assert sel("semantic_only", 2, semantic_rows="text") == [0, 1]
    assert sel("semantic_only", 1, semantic_rows="last") == sel("fastv", 1)


def test_sparsevlm_by_hand():
    assert sel("sparsevlm", 1) == [0]
    assert sel("sparsevlm", 2) == [0, 1]  # tie v1/v3 at 0.3 -> lowest index
    assert sel("sparsevlm", 3) == [0, 1, 3]
    # no text rows (prompt ends with the image): falls back to the last row
    a = torch.zeros(5, 5)
    a[4, 1:5] = torch.tensor([0.1, 0.2, 0.6, 0.1])
    assert sel("sparsevlm", 1, attn=a) == [2]


def test_action_only_by_hand():
    assert sel("action_only", 2) == [2, 3]
    assert sel("action_only", 2, action_estimate=None) == sel("semantic_only", 2)


def test_score_fusion_by_hand():
    # minmax(sem) = [1, 5/12, 0, 1/4]; minmax(act) = [0, 1/9, 7/9, 1]
    # alpha 0.5 -> [0.5, 0.264, 0.389, 0.625]
    assert sel("score_fusion", 1) == [3]
    assert sel("score_fusion", 2) == [0, 3]
    assert sel("score_fusion", 3) == [0, 2, 3]
    assert sel("score_fusion", 2, fusion_alpha=1.0) == [0, 1]
    assert sel("score_fusion", 2, fusion_alpha=0.0) == [2, 3]
    assert sel("score_fusion", 2, action_estimate=None) == sel("semantic_only", 2)
    # constant action estimate normalises to 0: pure semantic order
    assert sel("score_fusion", 2, action_estimate=torch.full((4,), 0.3)) == [0, 1]


def test_vlapruner_by_hand():
    # sem top-2 {0,1}, act top-2 {2,3}: union of 4 > 2 -> diversity filter -> {0, 3}
    assert sel("vlapruner", 2) == [0, 3]
    # sem top-3 {0,1,3}, act top-3 {1,2,3}: union of 4 -> {0, 2, 3}
    assert sel("vlapruner", 3) == [0, 2, 3]
    # halves agree: union == budget, no filter (keeps the near-duplicates 0 and 1)
    assert sel("vlapruner", 2, action_estimate=torch.tensor([0.9, 0.8, 0.0, 0.0])) == [0, 1]
    # no history yet: semantic top-k
    assert sel("vlapruner", 2, action_estimate=None) == [0, 1]
    assert sel("vlapruner", 4) == [0, 1, 2, 3]


def test_divprune_by_hand():
    assert sel("divprune", 1) == [3]
    assert sel("divprune", 2) == [0, 3]
    assert sel("divprune", 3) == [0, 2, 3]
    assert sel("divprune", 4) == [0, 1, 2, 3]


def test_none_returns_all():
    assert sel("none", 1) == [0, 1, 2, 3]
    assert sel("none", 4) == [0, 1, 2, 3]


def _grid_inputs(m: int, grid_shape=None) -> PruneInputs:
    t = m + 1
    return PruneInputs(
        attn=torch.zeros(t, t),
        visual_start=1,
        num_visual=m,
        embeddings=torch.ones(m, 2),
        grid_shape=grid_shape,
    )


def test_grid_by_hand():
    sq = _grid_inputs(16)  # 4 x 4 default
    assert select_tokens(sq, "grid", 4).tolist() == [5, 7, 13, 15]
    assert select_tokens(sq, "grid", 1).tolist() == [10]
    assert select_tokens(sq, "grid", 16).tolist() == list(range(16))
    assert select_tokens(_grid_inputs(16, (2, 8)), "grid", 4).tolist() == [9, 11, 13, 15]
    assert select_tokens(_grid_inputs(6), "grid", 3).tolist() == [1, 3, 5]  # not square: 1 x 6
    # OpenVLA 16 x 16 at 25%: an exact 8 x 8 lattice of every other patch
    got = select_tokens(_grid_inputs(256), "grid", 64)
    rows, cols = got // 16, got % 16
    assert sorted(set(rows.tolist())) == list(range(1, 16, 2)) == sorted(set(cols.tolist()))


def test_random_seeded_reproducible_and_uniform():
    inp = _grid_inputs(16)
    a = select_tokens(dataclasses.replace(inp, seed=5), "random", 4)
    assert torch.equal(a, select_tokens(dataclasses.replace(inp, seed=5), "random", 4))
    outs = {
        tuple(select_tokens(dataclasses.replace(inp, seed=s), "random", 4).tolist())
        for s in range(10)
    }
    assert len(outs) > 5
    counts = torch.zeros(16)
    for s in range(400):
        counts[select_tokens(dataclasses.replace(inp, seed=s), "random", 4)] += 1
    assert counts.min() > 60 and counts.max() < 140  # expected 100 each, sd ~9


def test_fallbacks_without_history_never_crash():
    for m in HISTORY_METHODS:
        for b in (1, 2, 3):
            assert sel(m, b, action_estimate=None) == sel("semantic_only", b)


def test_budget_for():
    assert budget_for(256, 0.5) == 128
    assert budget_for(256, 0.25) == 64
    assert budget_for(256, 0.125) == 32
    assert budget_for(256, 1.0) == 256
    assert budget_for(256, 0.001) == 1
    assert budget_for(3, 0.5) == 2  # 1.5 rounds half up
    assert budget_for(5, 0.3) == 2
    for ratio in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            budget_for(256, ratio)
    with pytest.raises(ValueError, match="num_visual"):
        budget_for(0, 0.5)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="vlapruner") as exc:
        get_pruner("fastv2")
    assert "fastv2" in str(exc.value) and "divprune" in str(exc.value)
    with pytest.raises(ValueError, match="unknown pruner"):
        select_tokens(hand_inputs(), "nope", 2)
    with pytest.raises(ValueError, match="unknown pruner"):
        select_batch([(hand_inputs(), "nope", 2)])
    with pytest.raises(ValueError, match="unknown pruner"):
        needs_action_history("nope")


NAN = float("nan")


@pytest.mark.parametrize(
    "overrides,budget,match",
    [
        (dict(), 0, "budget"),
        (dict(), 5, "budget"),
        (dict(), 2.0, "budget"),
        (dict(attn=torch.zeros(7, 6)), 2, "attn"),
        (dict(attn=torch.zeros(7)), 2, "attn"),
        (dict(visual_start=4), 2, "visual_start"),
        (dict(num_visual=0), 1, "num_visual"),
        (dict(embeddings=torch.zeros(3, 2)), 2, "embeddings"),
        (dict(embeddings=torch.zeros(4)), 2, "embeddings"),
        (dict(action_estimate=torch.zeros(5)), 2, "action_estimate"),
        (dict(attn=torch.full((7, 7), NAN)), 2, "attn.*non-finite"),
        (dict(embeddings=torch.full((4, 2), float("inf"))), 2, "embeddings.*non-finite"),
        (
            dict(action_estimate=torch.tensor([0.0, NAN, 0.0, 0.0])),
            2,
            "action_estimate.*non-finite",
        ),
        (dict(semantic_rows="first"), 2, "semantic_rows"),
        (dict(fusion_alpha=1.5), 2, "fusion_alpha"),
        (dict(grid_shape=(3, 3)), 2, "grid_shape"),
        (dict(text_start=99), 2, "text_start"),
    ],
)
@pytest.mark.parametrize("method", ["vlapruner", "none", "random"])
def test_clear_errors(overrides, budget, match, method):
    with pytest.raises(ValueError, match=match):
        select_tokens(hand_inputs(**overrides), method, budget)
    with pytest.raises(ValueError, match=match):
        select_batch([(hand_inputs(), "fastv", 2), (hand_inputs(**overrides), method, budget)])


def test_custom_pruner_and_output_contract(monkeypatch):
    for name in ("PRUNERS", "_RAW", "_SCORE_FNS", "_NEEDS_HISTORY", "_ROWS", "_BUILTIN"):
        monkeypatch.setattr(
            pruners_mod, name, type(getattr(pruners_mod, name))(getattr(pruners_mod, name))
        )

    @register_pruner("first_k", needs_action_history=True)
    def first_k(inputs, budget):
        return torch.arange(budget)

    @register_pruner("broken")
    def broken(inputs, budget):
        return torch.tensor([1, 0])

    assert select_tokens(hand_inputs(), "first_k", 3).tolist() == [0, 1, 2]
    assert needs_action_history("first_k")
    out = select_batch([(hand_inputs(), "first_k", 2), (hand_inputs(), "fastv", 2)])
    assert [o.tolist() for o in out] == [[0, 1], [1, 3]]
    with pytest.raises(RuntimeError, match="broken"):
        select_tokens(hand_inputs(), "broken", 2)
    with pytest.raises(RuntimeError, match="broken"):
        select_tokens(hand_inputs(), "broken", 3)
    # overriding a built-in replaces its batched path too
    register_pruner("fastv")(lambda inputs, budget: torch.arange(budget))
    assert select_batch([(hand_inputs(), "fastv", 2)])[0].tolist() == [0, 1]


# -- property-based --------------------------------------------------------------------------
def random_inputs(
    seed: int, m: int, n_text: int, e_dim: int, with_action: bool, ties: bool
) -> PruneInputs:
    g = torch.Generator().manual_seed(seed)
    t = 1 + m + n_text
    a = torch.rand(t, t, generator=g).tril()
    if ties:
        a = (a * 3).floor()
    a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-9)
    act = torch.rand(m, generator=g)
    if ties:
        act = (act * 3).floor()
    return PruneInputs(
        attn=a,
        visual_start=1,
        num_visual=m,
        embeddings=torch.randn(m, e_dim, generator=g),
        action_estimate=act if with_action else None,
        seed=seed,
        semantic_rows=["all", "last", "text"][seed % 3] if n_text else "all",
        fusion_alpha=(seed % 5) / 4,
    )


inputs_strategy = st.builds(
    random_inputs,
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 40),
    n_text=st.integers(0, 4),
    e_dim=st.integers(1, 6),
    with_action=st.booleans(),
    ties=st.booleans(),
)


@settings(max_examples=120, deadline=None)
@given(inputs=inputs_strategy, method=st.sampled_from(ALL_METHODS), frac=st.floats(0.0, 1.0))
def test_invariants_every_pruner(inputs, method, frac):
    m = inputs.num_visual
    budget = max(1, min(m, round(frac * m)))
    got = select_tokens(inputs, method, budget)
    want = m if method == "none" else budget
    assert got.dtype == torch.long and got.dim() == 1 and got.numel() == want
    assert int(got.min()) >= 0 and int(got.max()) < m
    assert bool((got[1:] > got[:-1]).all())  # sorted and unique
    if method == "none" or budget == m:
        assert got.tolist() == list(range(m))
    assert torch.equal(got, select_tokens(inputs, method, budget))  # deterministic


@settings(max_examples=40, deadline=None)
@given(
    items=st.lists(
        st.tuples(inputs_strategy, st.sampled_from(ALL_METHODS), st.floats(0.0, 1.0)),
        min_size=1,
        max_size=6,
    )
)
def test_select_batch_equals_single(items):
    batch = [
        (inp, meth, max(1, min(inp.num_visual, round(f * inp.num_visual))))
        for inp, meth, f in items
    ]
    got = select_batch(batch)
    assert len(got) == len(batch)
    for (inp, meth, b), idx in zip(batch, got, strict=True):
        assert torch.equal(idx, select_tokens(inp, meth, b)), meth


def test_select_batch_openvla_sized_mix():
    """12 requests of M=256 with mixed pruners/budgets, some without history."""
    items = []
    for i in range(12):
        inp = random_inputs(i, 256, 34, 32, with_action=i % 4 != 0, ties=False)
        items.append(
            (inp, ["vlapruner", "fastv", "divprune", "score_fusion"][i % 4], [128, 64, 32][i % 3])
        )
    got = select_batch(items)
    for (inp, meth, b), idx in zip(items, got, strict=True):
        assert torch.equal(idx, select_tokens(inp, meth, b))
    assert select_batch([]) == []


def test_integer_like_budgets_accepted_bool_refused():
    np = pytest.importorskip("numpy")
    assert select_tokens(hand_inputs(), "fastv", np.int64(2)).tolist() == [1, 3]
    assert select_batch([(hand_inputs(), "fastv", torch.tensor(2))])[0].tolist() == [1, 3]
    assert budget_for(np.int32(256), np.float32(0.25)) == 64
    with pytest.raises(ValueError, match="budget"):
        select_tokens(hand_inputs(), "fastv", True)
    with pytest.raises(ValueError, match="keep_ratio"):
        budget_for(256, True)


def test_episode_flow_like_the_engine():
    """Warm-up frames run unpruned and fill the history; then frames are pruned, and the
    pruned frame's action scores (compacted keys) feed the history with zeros elsewhere."""
    from vllm_vla_pruner.pruning import ActionHistory, action_scores, attention_rows

    g = torch.Generator().manual_seed(0)
    m, vs, n_text, a_q, hq, d = 16, 1, 5, 3, 4, 8
    t = vs + m + n_text
    hist = ActionHistory(window=3, gamma=0.8)
    budget = budget_for(m, 0.25)
    for frame in range(6):
        q = torch.randn(t + a_q, hq, d, generator=g)
        k = torch.randn(t + a_q, 2, d, generator=g)
        attn = attention_rows(q[:t], k[:t], torch.arange(t))
        est = hist.estimate("robot-1")
        assert (est is None) == (frame < 3)
        method = "vlapruner" if hist.is_warm("robot-1") else "none"
        inp = PruneInputs(attn, vs, m, torch.randn(m, 6, generator=g), action_estimate=est)
        kept = select_tokens(inp, method, budget)
        assert kept.numel() == (m if method == "none" else budget)
        # decode: action queries see BOS, the kept visual tokens and the text (compacted keys)
        key_pos = torch.cat([torch.arange(vs), vs + kept, torch.arange(vs + m, t + a_q)])
        rows = attention_rows(q[t:], k[key_pos], torch.arange(t, t + a_q), k_positions=key_pos)
        s_act = action_scores(rows, torch.arange(vs, vs + kept.numel()), kept, m)
        assert torch.all(s_act[torch.isin(torch.arange(m), kept, invert=True)] == 0)
        hist.push("robot-1", s_act)
    assert hist.num_frames("robot-1") == 3


@settings(max_examples=40, deadline=None)
@given(inputs=inputs_strategy, frac=st.floats(0.0, 1.0))
def test_vlapruner_equals_combine_then_filter(inputs, frac):
    from vllm_vla_pruner.pruning import combine_then_filter, semantic_scores

    m = inputs.num_visual
    budget = max(1, min(m, round(frac * m)))
    sem = semantic_scores(inputs.attn, inputs.visual_start, m, rows=inputs.semantic_rows)
    want = combine_then_filter(sem, inputs.action_estimate, inputs.embeddings, budget)
    assert torch.equal(select_tokens(inputs, "vlapruner", budget), want)
