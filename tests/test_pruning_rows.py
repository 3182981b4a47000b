"""Only the work the method needs: which attention rows each pruner reads, that selecting from
those rows equals selecting from the full T x T matrix, and that the engine's selection path
reads nothing back from the device unless debug checks are on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from vllm_vla_pruner.pruning import (
    PRUNERS,
    ActionHistory,
    PromptLayout,
    PruneInputs,
    QKRequest,
    action_scores,
    attention_rows,
    combine_then_filter,
    combine_then_filter_batch,
    cosine_distance_matrix,
    debug_checks,
    greedy_maxmin_from_distances,
    needed_rows,
    register_pruner,
    select_batch,
    select_from_qk,
    select_tokens,
    semantic_scores,
    stable_topk,
)
from vllm_vla_pruner.pruning import pruners as pruners_mod

ALL_METHODS = sorted(PRUNERS)
ROWS = ("all", "last", "text")


# -- which rows -------------------------------------------------------------------------------
def test_needed_rows_per_pruner():
    # T = 12: BOS, 8 visual tokens (1..8), 3 text rows (9..11)
    def rows(method, semantic_rows="all", text_start=None, history=False):
        layout = PromptLayout(12, 1, 8, text_start, semantic_rows, history)
        return needed_rows(method, layout)

    assert rows("fastv") == range(11, 12)  # one row, whatever semantic_rows says
    assert rows("fastv", "text") == range(11, 12)
    for method in ("vlapruner", "semantic_only", "score_fusion"):
        assert rows(method, "last", history=True) == range(11, 12)
        assert rows(method, "text", history=True) == range(9, 12)
        assert rows(method, "text", text_start=10) == range(10, 12)
        assert rows(method, "all") == range(12)
    assert rows("action_only", "last", history=True) == range(0)  # S_hat only
    assert rows("action_only", "last") == range(11, 12)  # no history: semantic fallback
    assert rows("sparsevlm") == range(9, 12)
    assert rows("sparsevlm", text_start=12) == range(11, 12)  # no text rows: FastV's row
    for method in ("divprune", "random", "grid", "none"):
        assert rows(method, "all", history=True) == range(0)


def test_third_party_pruner_gets_every_row_by_default(monkeypatch):
    for name in ("PRUNERS", "_RAW", "_SCORE_FNS", "_NEEDS_HISTORY", "_ROWS", "_BUILTIN"):
        monkeypatch.setattr(
            pruners_mod, name, type(getattr(pruners_mod, name))(getattr(pruners_mod, name))
        )
    register_pruner("mine")(lambda inputs, budget: torch.arange(budget))
    assert needed_rows("mine", PromptLayout(12, 1, 8)) == range(12)
    with pytest.raises(ValueError, match="unknown pruner"):
        needed_rows("nope", PromptLayout(12, 1, 8))


# -- row block == full matrix -----------------------------------------------------------------
def random_case(seed: int, m: int, n_text: int, with_action: bool, rows: str, text_start):
    g = torch.Generator().manual_seed(seed)
    t = 1 + m + n_text
    a = torch.rand(t, t, generator=g).tril()
    a = a / a.sum(dim=1, keepdim=True)
    full = PruneInputs(
        attn=a,
        visual_start=1,
        num_visual=m,
        embeddings=torch.randn(m, 5, generator=g),
        action_estimate=torch.rand(m, generator=g) if with_action else None,
        grid_shape=None,
        seed=seed,
        semantic_rows=rows,
        fusion_alpha=(seed % 5) / 4,
        text_start=text_start,
    )
    return full


def as_row_block(full: PruneInputs, method: str) -> PruneInputs:
    """What the engine now builds: only the rows ``method`` reads, with their positions."""
    rows = needed_rows(method, full.layout)
    return dataclasses.replace(
        full, attn=full.attn[rows.start : rows.stop].clone(), row_positions=rows
    )


def old_semantic_scores(attn, vs, m, rows, text_start):
    """The full-matrix rule as it was: mean over the chosen rows of the [T, T] matrix."""
    vis = attn[:, vs : vs + m]
    ts = vs + m if text_start is None else text_start
    sel = {"all": vis, "last": vis[-1:], "text": vis[ts:]}[rows]
    return sel.float().mean(dim=0)


case_strategy = st.builds(
    random_case,
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 24),
    n_text=st.integers(1, 5),
    with_action=st.booleans(),
    rows=st.sampled_from(ROWS),
    text_start=st.sampled_from([None, "later"]),
)


def _fix_text_start(full: PruneInputs) -> PruneInputs:
    if full.text_start == "later":  # a text start inside the text rows
        return dataclasses.replace(full, text_start=full.attn.shape[0] - 1)
    return full


@settings(max_examples=150, deadline=None)
@given(full=case_strategy, method=st.sampled_from(ALL_METHODS), frac=st.floats(0.0, 1.0))
def test_row_block_selects_exactly_what_the_full_matrix_selects(full, method, frac):
    full = _fix_text_start(full)
    m = full.num_visual
    budget = max(1, min(m, round(frac * m)))
    block = as_row_block(full, method)
    assert block.attn.shape[0] == len(needed_rows(method, full.layout))
    with debug_checks():
        want = select_tokens(full, method, budget)
        got = select_tokens(block, method, budget)
        assert torch.equal(got, want), method
        assert torch.equal(select_batch([(block, method, budget)])[0], want)


@settings(max_examples=100, deadline=None)
@given(full=case_strategy)
def test_semantic_scores_from_rows_equal_the_old_full_matrix_rule(full):
    full = _fix_text_start(full)
    vs, m, rows, ts = full.visual_start, full.num_visual, full.semantic_rows, full.text_start
    old = old_semantic_scores(full.attn, vs, m, rows, ts)
    assert torch.equal(semantic_scores(full.attn, vs, m, rows=rows, text_start=ts), old)
    block = as_row_block(full, "semantic_only")
    got = semantic_scores(
        block.attn, vs, m, rows=rows, text_start=ts, row_positions=block.row_positions
    )
    assert torch.equal(got, old)


def test_missing_rows_are_a_clear_error():
    full = random_case(3, 6, 3, True, "all", None)
    last_only = as_row_block(full, "fastv")
    with pytest.raises(ValueError, match="semantic_rows='all' needs attention rows 0..9"):
        semantic_scores(last_only.attn, 1, 6, row_positions=last_only.row_positions)
    with pytest.raises(ValueError, match="pruner 'vlapruner' needs attention rows"):
        select_tokens(last_only, "vlapruner", 2)
    with pytest.raises(ValueError, match="row_positions has 1 rows but attn has 2"):
        select_tokens(dataclasses.replace(last_only, attn=full.attn[:2]), "fastv", 2)
    with pytest.raises(ValueError, match="row_positions"):
        select_tokens(dataclasses.replace(last_only, row_positions=range(10, 11)), "fastv", 2)


# -- the engine's entry point: from q/k ------------------------------------------------------
def qk_requests(seed: int, methods, semantic_rows="last", with_history=True):
    g = torch.Generator().manual_seed(seed)
    m, n_text, hq, hkv, d = 16, 5, 4, 2, 8
    t = 1 + m + n_text
    out = []
    for i, method in enumerate(methods):
        fields = dict(
            visual_start=1,
            num_visual=m,
            embeddings=torch.randn(m, 6, generator=g),
            action_estimate=torch.rand(m, generator=g) if with_history else None,
            seed=i,
            semantic_rows=semantic_rows,
            text_start=1 + m,
        )
        q = torch.randn(t, hq, d, generator=g)
        k = torch.randn(t, hkv, d, generator=g)
        out.append(QKRequest(q, k, method, 4 + i % 3, fields))
    return out


@pytest.mark.parametrize("semantic_rows", ROWS)
def test_select_from_qk_equals_the_full_matrix_path(semantic_rows):
    reqs = qk_requests(1, ALL_METHODS, semantic_rows)
    got = select_from_qk(reqs)
    for req, idx in zip(reqs, got, strict=True):
        t = req.k.shape[0]
        full = PruneInputs(attn=attention_rows(req.q, req.k, torch.arange(t)), **req.fields)
        assert torch.equal(idx, select_tokens(full, req.method, req.budget)), req.method


def test_select_from_qk_computes_only_the_needed_rows(monkeypatch):
    seen = []

    def spy(q, k, q_positions, *args, **kwargs):
        seen.append((q.shape[0], k.shape[0], q_positions.tolist()))
        return attention_rows(q, k, q_positions, *args, **kwargs)

    monkeypatch.setattr(pruners_mod, "attention_rows", spy)
    t = 22
    cases = [
        ("fastv", "all", [(1, t, [t - 1])]),
        ("vlapruner", "last", [(1, t, [t - 1])]),  # the embedded checkpoint's setting
        ("vlapruner", "text", [(5, t, list(range(17, t)))]),
        ("vlapruner", "all", [(t, t, list(range(t)))]),
        ("divprune", "all", []),
        ("grid", "last", []),
        ("action_only", "last", []),  # has history: S_hat needs no attention
    ]
    for method, semantic_rows, want in cases:
        seen.clear()
        select_from_qk(qk_requests(2, [method], semantic_rows))
        assert seen == want, (method, semantic_rows)


# -- Combine-then-Filter: one function, batched, exact ----------------------------------------
def old_combine_then_filter(sem, act, emb, budget):
    """The previous implementation: union by mask.nonzero(), greedy on the exact union."""
    c_sem = stable_topk(sem, budget)
    if act is None:
        return c_sem
    mask = torch.zeros(sem.shape[0], dtype=torch.bool)
    mask[c_sem] = True
    mask[stable_topk(act, budget)] = True
    union = mask.nonzero().squeeze(1)
    if union.numel() == budget:
        return union
    dist = cosine_distance_matrix(emb[union]).unsqueeze(0)
    valid = torch.ones(1, union.numel(), dtype=torch.bool)
    return union[greedy_maxmin_from_distances(dist, valid, [budget])[0]]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 48),
    frac=st.floats(0.0, 1.0),
    levels=st.sampled_from([0, 3]),
    with_action=st.booleans(),
)
def test_combine_then_filter_equals_the_previous_implementation(seed, m, frac, levels, with_action):
    g = torch.Generator().manual_seed(seed)
    budget = max(1, min(m, round(m * frac)))
    sem, act = torch.rand(m, generator=g), torch.rand(m, generator=g)
    if levels:  # many ties
        sem, act = (sem * levels).floor(), (act * levels).floor()
    emb = torch.randn(m, 4, generator=g)
    act = act if with_action else None
    with debug_checks():
        want = old_combine_then_filter(sem, act, emb, budget)
        assert torch.equal(combine_then_filter(sem, act, emb, budget), want)


def test_combine_then_filter_batch_equals_single_and_vlapruner_calls_it(monkeypatch):
    g = torch.Generator().manual_seed(4)
    jobs = []
    for i in range(7):
        m = [16, 16, 9, 16, 30, 16, 1][i]
        act = None if i == 3 else torch.rand(m, generator=g)
        jobs.append(
            (
                torch.rand(m, generator=g),
                act,
                torch.randn(m, 3, generator=g),
                max(1, m // (i % 3 + 2)),
            )
        )
    got = combine_then_filter_batch(*[list(x) for x in zip(*jobs, strict=True)])
    for job, idx in zip(jobs, got, strict=True):
        assert torch.equal(idx, combine_then_filter(*job))
    calls = []

    def spy(*args):
        calls.append(len(args[0]))
        return combine_then_filter_batch(*args)

    monkeypatch.setattr(pruners_mod, "combine_then_filter_batch", spy)
    select_from_qk(qk_requests(5, ["vlapruner", "fastv", "vlapruner", "divprune", "vlapruner"]))
    assert calls == [3]  # one batched call for the three vlapruner requests


# -- no device-to-host reads on the engine's path ---------------------------------------------
# What makes the host wait for the device: reading a value (.item(), int(), bool(), float()
# all land in _local_scalar_dense) or an op whose output size depends on the data.
_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")


class HostReads(TorchDispatchMode):
    """Records every dispatched op that reads device data back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args
            if isinstance(a, (list, tuple))
            for i in a
        )
        if name.startswith(_SYNC_OPS) or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def engine_frame(history: ActionHistory, methods, semantic_rows: str) -> None:
    """One frame as the engine runs it: select, then the action attention into the history."""
    reqs = qk_requests(9, methods, semantic_rows)
    kept = select_from_qk(reqs)
    for i, (req, idx) in enumerate(zip(reqs, kept, strict=True)):
        m = req.fields["num_visual"]
        keys = req.k[torch.cat([torch.arange(1), 1 + idx, torch.arange(1 + m, req.k.shape[0])])]
        t = keys.shape[0]
        rows = attention_rows(req.q[-3:], keys, torch.arange(t - 3, t))
        scores = action_scores(rows, torch.arange(1, 1 + idx.numel()), idx, m)
        history.push(f"robot-{i}", scores)
        history.estimate(f"robot-{i}")


@pytest.mark.parametrize("semantic_rows", ROWS)
def test_engine_path_reads_nothing_back_without_debug_checks(semantic_rows):
    history = ActionHistory()
    with debug_checks(False), HostReads() as spy:
        engine_frame(history, ALL_METHODS, semantic_rows)
    assert spy.reads == []
    with debug_checks(True), HostReads() as spy:  # the spy does see the value checks
        engine_frame(history, ALL_METHODS, semantic_rows)
    assert "aten._local_scalar_dense.default" in spy.reads


def test_value_checks_are_debug_only_but_third_party_output_is_always_checked(monkeypatch):
    bad = random_case(0, 6, 2, True, "all", None)
    bad = dataclasses.replace(bad, attn=torch.full_like(bad.attn, float("nan")))
    with debug_checks(False):
        assert select_tokens(bad, "divprune", 2).numel() == 2  # not read: no error, no sync
    with debug_checks(True), pytest.raises(ValueError, match="attn.*non-finite"):
        select_tokens(bad, "divprune", 2)
    for name in ("PRUNERS", "_RAW", "_SCORE_FNS", "_NEEDS_HISTORY", "_ROWS", "_BUILTIN"):
        monkeypatch.setattr(
            pruners_mod, name, type(getattr(pruners_mod, name))(getattr(pruners_mod, name))
        )
    register_pruner("backwards")(lambda inputs, budget: torch.arange(budget).flip(0))
    ok = random_case(0, 6, 2, True, "all", None)
    with debug_checks(False), pytest.raises(RuntimeError, match="backwards"):
        select_tokens(ok, "backwards", 3)
