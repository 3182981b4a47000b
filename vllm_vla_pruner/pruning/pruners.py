"""Named pruners behind one interface, and batched selection for many requests.

Every pruner maps ``(PruneInputs, budget)`` to the kept visual-token indices: a sorted,
unique, in-range LongTensor of exactly ``budget`` entries (all M for ``'none'``), on the
device of ``inputs.attn``. Pruners that use the smoothed action scores (``vlapruner``,
``score_fusion``, ``action_only``) fall back to their semantic half - top-k of S_sem with
``inputs.semantic_rows`` - when ``action_estimate`` is None (no history yet); the engine
normally runs warm-up frames unpruned anyway, so the fallback only matters to callers that
prune during warm-up.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .scores import SEMANTIC_ROWS, all_finite, semantic_scores
from .selection import (
    cosine_distance_matrix,
    greedy_maxmin_from_distances,
    stable_topk_batched,
    union_indices,
)

__all__ = [
    "PRUNERS",
    "PruneInputs",
    "budget_for",
    "get_pruner",
    "needs_action_history",
    "register_pruner",
    "select_batch",
    "select_tokens",
    "validate_inputs",
]

PrunerFn = Callable[["PruneInputs", int], Tensor]


@dataclass
class PruneInputs:
    """Everything a pruner may look at for one request's frame.

    ``text_start`` (an addition to the engine interface, optional) is the first text row for
    ``semantic_rows='text'`` and ``sparsevlm``; default right after the visual tokens.
    """

    attn: Tensor  # [T, T] head-averaged layer K-1 prefill attention (causal, rows = queries)
    visual_start: int  # first visual row/column (1: right after BOS)
    num_visual: int  # M
    embeddings: Tensor  # [M, E] visual tokens' LLM input embeddings (projector output)
    action_estimate: Tensor | None = None  # smoothed S_hat [M] from ActionHistory.estimate
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the patch grid, for 'grid'
    seed: int = 0  # for 'random'
    semantic_rows: str = "all"  # 'all' | 'last' | 'text'
    fusion_alpha: float = 0.5  # score_fusion weight on S_sem
    text_start: int | None = None


# Raw pruners assume validated inputs; PRUNERS holds the validating wrappers.
_RAW: dict[str, PrunerFn] = {}
PRUNERS: dict[str, PrunerFn] = {}
_NEEDS_HISTORY: set[str] = set()
# Top-k family: method -> score function; lets select_batch stack their sorts.
_SCORE_FNS: dict[str, Callable[[PruneInputs], Tensor]] = {}


def register_pruner(
    name: str, *, needs_action_history: bool = False
) -> Callable[[PrunerFn], PrunerFn]:
    """Decorator: register ``fn(inputs, budget) -> indices`` under ``name``.

    The stored entry validates the inputs and the output, so third-party pruners get the same
    guarantees. Re-registering a name replaces it.
    """

    def deco(fn: PrunerFn) -> PrunerFn:
        @functools.wraps(fn)
        def checked(inputs: PruneInputs, budget: int) -> Tensor:
            validate_inputs(inputs, budget)
            budget = operator.index(budget)
            return _check_output(name, fn(inputs, budget), inputs, budget)

        _RAW[name] = fn
        PRUNERS[name] = checked
        _SCORE_FNS.pop(name, None)
        if needs_action_history:
            _NEEDS_HISTORY.add(name)
        else:
            _NEEDS_HISTORY.discard(name)
        return fn

    return deco


def _register_topk(
    name: str, *, needs_action_history: bool = False
) -> Callable[[Callable[[PruneInputs], Tensor]], Callable[[PruneInputs], Tensor]]:
    """Register a pruner defined as 'top-k of a score vector' (batchable sort)."""

    def deco(score_fn: Callable[[PruneInputs], Tensor]) -> Callable[[PruneInputs], Tensor]:
        def pruner(inputs: PruneInputs, budget: int) -> Tensor:
            return _topk_sorted(score_fn(inputs), budget)

        pruner.__name__ = name
        pruner.__doc__ = score_fn.__doc__
        register_pruner(name, needs_action_history=needs_action_history)(pruner)
        _SCORE_FNS[name] = score_fn
        return score_fn

    return deco


def get_pruner(name: str) -> PrunerFn:
    """The validating pruner registered as ``name``; ValueError listing valid names if none."""
    try:
        return PRUNERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown pruner {name!r}; valid names: {', '.join(sorted(PRUNERS))}"
        ) from None


def needs_action_history(method: str) -> bool:
    """Whether ``method`` reads ``action_estimate`` (so the engine must keep ActionHistory)."""
    get_pruner(method)
    return method in _NEEDS_HISTORY


def budget_for(num_visual: int, keep_ratio: float) -> int:
    """Kept-token budget ``round(M * keep_ratio)`` (halves round up), at least 1."""
    m = _index(num_visual)
    if m is None or m < 1:
        raise ValueError(f"num_visual must be an int >= 1, got {num_visual!r}")
    ok = isinstance(keep_ratio, numbers.Real) and not isinstance(keep_ratio, bool)
    if not ok or not (0.0 < float(keep_ratio) <= 1.0):
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return max(1, min(m, math.floor(m * float(keep_ratio) + 0.5)))


# -- validation ------------------------------------------------------------------------------
def _index(v: object) -> int | None:
    """``v`` as an int if it is integer-like (int, numpy/torch integer scalar), else None.
    bool is refused: ``budget=True`` is a caller bug, not a budget of 1."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)  # type: ignore[arg-type]
    except TypeError:
        return None


def _finite(name: str, x: Tensor) -> None:
    if not all_finite(x):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def validate_inputs(inputs: PruneInputs, budget: int) -> None:
    """Raise ValueError naming the offending field if ``inputs``/``budget`` are unusable."""
    a = inputs.attn
    if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[0] != a.shape[1]:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"attn must be a square [T, T] tensor, got {shape}")
    t = a.shape[0]
    m = inputs.num_visual
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"num_visual must be an int >= 1, got {m!r}")
    vs = inputs.visual_start
    if isinstance(vs, bool) or not isinstance(vs, int) or vs < 0 or vs + m > t:
        raise ValueError(f"visual_start={vs!r} with num_visual={m} does not fit in attn with T={t}")
    e = inputs.embeddings
    if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[0] != m:
        shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"embeddings must be [M={m}, E], got {shape}")
    if e.device != a.device:
        raise ValueError(f"embeddings on {e.device} but attn on {a.device}")
    s = inputs.action_estimate
    if s is not None:
        if not isinstance(s, Tensor) or s.dim() != 1 or s.shape[0] != m:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"action_estimate must be [M={m}], got {shape}")
        if s.device != a.device:
            raise ValueError(f"action_estimate on {s.device} but attn on {a.device}")
        _finite("action_estimate", s)
    if inputs.semantic_rows not in SEMANTIC_ROWS:
        raise ValueError(
            f"semantic_rows must be one of {SEMANTIC_ROWS}, got {inputs.semantic_rows!r}"
        )
    if inputs.text_start is not None and not (0 <= inputs.text_start <= t):
        raise ValueError(f"text_start={inputs.text_start} out of range [0, T={t}]")
    if not (0.0 <= inputs.fusion_alpha <= 1.0):
        raise ValueError(f"fusion_alpha must be in [0, 1], got {inputs.fusion_alpha!r}")
    if inputs.grid_shape is not None:
        gs = tuple(inputs.grid_shape)
        if len(gs) != 2 or gs[0] < 1 or gs[1] < 1 or gs[0] * gs[1] != m:
            raise ValueError(
                f"grid_shape={inputs.grid_shape!r} must be (rows, cols) with rows*cols == M={m}"
            )
    b = _index(budget)
    if b is None or not (1 <= b <= m):
        raise ValueError(f"budget={budget!r} must be an int in [1, M={m}]")
    _finite("attn", a)
    _finite("embeddings", e)


def _check_output(name: str, idx: Tensor, inputs: PruneInputs, budget: int) -> Tensor:
    """Guard the contract for every pruner, including third-party ones."""
    m = inputs.num_visual
    want = m if name == "none" else budget
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.numel() != want:
        raise RuntimeError(f"pruner {name!r} returned {getattr(idx, 'shape', idx)}, want [{want}]")
    idx = idx.to(device=inputs.attn.device, dtype=torch.long)
    increasing = want == 1 or bool((idx[1:] > idx[:-1]).all())
    if int(idx[0]) < 0 or int(idx[-1]) >= m or not increasing:
        raise RuntimeError(
            f"pruner {name!r} returned indices that are not sorted, unique, in [0, {m})"
        )
    return idx


# -- helpers -----------------------------------------------------------------------------------
def _topk_sorted(scores: Tensor, budget: int) -> Tensor:
    return torch.sort(stable_topk_batched(scores.unsqueeze(0), budget)[0]).values


def _sem(inputs: PruneInputs, rows: str | None = None) -> Tensor:
    return semantic_scores(
        inputs.attn,
        inputs.visual_start,
        inputs.num_visual,
        rows=inputs.semantic_rows if rows is None else rows,
        text_start=inputs.text_start,
    )


def _action(inputs: PruneInputs) -> Tensor | None:
    s = inputs.action_estimate
    return None if s is None else s.to(torch.float32)


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(), x.max()
    if float(hi - lo) <= 0.0:
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def _grid_shape(inputs: PruneInputs) -> tuple[int, int]:
    if inputs.grid_shape is not None:
        return int(inputs.grid_shape[0]), int(inputs.grid_shape[1])
    m = inputs.num_visual
    side = math.isqrt(m)
    return (side, side) if side * side == m else (1, m)


# -- top-k family ------------------------------------------------------------------------------
@_register_topk("semantic_only")
def _semantic_only(inputs: PruneInputs) -> Tensor:
    """Top-k of S_sem (rows per ``semantic_rows``): VLA-Pruner's semantic half."""
    return _sem(inputs)


@_register_topk("fastv")
def _fastv(inputs: PruneInputs) -> Tensor:
    """FastV: top-k by the last prompt row's attention at layer K-1."""
    return _sem(inputs, rows="last")


@_register_topk("action_only", needs_action_history=True)
def _action_only(inputs: PruneInputs) -> Tensor:
    """Top-k of S_hat: VLA-Pruner's action half; S_sem without history."""
    s = _action(inputs)
    return _sem(inputs) if s is None else s


@_register_topk("score_fusion", needs_action_history=True)
def _score_fusion(inputs: PruneInputs) -> Tensor:
    """Ablation baseline: a*minmax(S_sem) + (1-a)*minmax(S_hat); S_sem without history."""
    sem = _sem(inputs)
    s = _action(inputs)
    if s is None:
        return sem
    a = float(inputs.fusion_alpha)
    return a * _minmax(sem) + (1.0 - a) * _minmax(s)


@_register_topk("sparsevlm")
def _sparsevlm(inputs: PruneInputs) -> Tensor:
    """SparseVLM, single stage: raters = text rows whose attention mass on the visual tokens
    is >= the mean over text rows; score = raters' mean attention. No text rows -> FastV."""
    a = inputs.attn
    m, vs = inputs.num_visual, inputs.visual_start
    ts = vs + m if inputs.text_start is None else inputs.text_start
    if ts >= a.shape[0]:
        return _sem(inputs, rows="last")
    text_vis = a[ts:, vs : vs + m].to(torch.float32)  # [N, M]
    relevance = text_vis.sum(dim=1)
    raters = relevance >= relevance.mean()
    return text_vis[raters].mean(dim=0)


# -- other pruners -----------------------------------------------------------------------------
@register_pruner("vlapruner", needs_action_history=True)
def _vlapruner(inputs: PruneInputs, budget: int) -> Tensor:
    """Combine-then-Filter (S_sem, S_hat); semantic top-k without history."""
    out, jobs, _ = _plan_vlapruner([(inputs, budget)])
    return out[0] if out[0] is not None else _batched_greedy(jobs)[0]


@register_pruner("divprune")
def _divprune(inputs: PruneInputs, budget: int) -> Tensor:
    """DivPrune: greedy max-min cosine diversity over all M tokens, no scores."""
    m = inputs.num_visual
    if budget == m:
        return torch.arange(m, device=inputs.attn.device)
    dist = cosine_distance_matrix(inputs.embeddings).unsqueeze(0)
    valid = torch.ones(1, m, dtype=torch.bool, device=inputs.attn.device)
    return greedy_maxmin_from_distances(dist, valid, [budget])[0]


@register_pruner("random")
def _random(inputs: PruneInputs, budget: int) -> Tensor:
    """Uniformly random subset, reproducible from ``inputs.seed`` on any device."""
    gen = torch.Generator(device="cpu").manual_seed(int(inputs.seed))
    idx = torch.randperm(inputs.num_visual, generator=gen)[:budget]
    return torch.sort(idx).values.to(inputs.attn.device)


@register_pruner("grid")
def _grid(inputs: PruneInputs, budget: int) -> Tensor:
    """Uniform spatial sampling: cell centres of an a x b sub-grid of the patch grid with
    a*b >= budget and aspect close to the grid's; surplus cells are dropped evenly in raster
    order. Default grid: square if M is a perfect square, else one row of M."""
    rows, cols = _grid_shape(inputs)
    a = min(rows, max(1, round(math.sqrt(budget * rows / cols))))
    b = min(cols, math.ceil(budget / a))
    while a * b < budget:  # only when b hit cols; a < rows is then guaranteed
        a += 1
        b = min(cols, math.ceil(budget / a))
    r_idx = [math.floor((i + 0.5) * rows / a) for i in range(a)]
    c_idx = [math.floor((j + 0.5) * cols / b) for j in range(b)]
    cells = [r * cols + c for r in r_idx for c in c_idx]  # raster order, distinct
    n = len(cells)
    pick = [cells[math.floor((i + 0.5) * n / budget)] for i in range(budget)]
    return torch.tensor(sorted(pick), dtype=torch.long, device=inputs.attn.device)


@register_pruner("none")
def _none(inputs: PruneInputs, budget: int) -> Tensor:
    """Unpruned: all M indices (budget ignored)."""
    return torch.arange(inputs.num_visual, device=inputs.attn.device)


# -- batched machinery -------------------------------------------------------------------------
def _batched_topk(jobs: list[tuple[Tensor, int]]) -> list[Tensor]:
    """Stable top-k for many (scores [M], budget) jobs: one sort per (M, device) group."""
    out: list[Tensor | None] = [None] * len(jobs)
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, (s, _) in enumerate(jobs):
        groups.setdefault((s.shape[0], s.device), []).append(i)
    for ids in groups.values():
        stacked = torch.stack([jobs[i][0].to(torch.float32) for i in ids])
        kmax = max(jobs[i][1] for i in ids)
        ranked = stable_topk_batched(stacked, kmax)
        for row, i in enumerate(ids):
            out[i] = ranked[row, : jobs[i][1]]
    return out  # type: ignore[return-value]


def _batched_greedy(jobs: list[tuple[Tensor, Tensor, int]]) -> list[Tensor]:
    """Greedy max-min for many (embeddings [M, E], candidates [C], budget) jobs.

    Each job's C x C distances are computed on its own (no FLOPs spent on padding, and the
    result cannot depend on the batch), then padded into one [B, n, n] block per device for a
    single greedy loop. Returns sorted indices into each job's embeddings."""
    out: list[Tensor | None] = [None] * len(jobs)
    groups: dict[torch.device, list[int]] = {}
    for i, (emb, _, _) in enumerate(jobs):
        groups.setdefault(emb.device, []).append(i)
    for device, ids in groups.items():
        n = max(jobs[i][1].numel() for i in ids)
        dist = torch.zeros(len(ids), n, n, dtype=torch.float32, device=device)
        valid = torch.zeros(len(ids), n, dtype=torch.bool, device=device)
        for row, i in enumerate(ids):
            e, cand, _ = jobs[i]
            c = cand.numel()
            dist[row, :c, :c] = cosine_distance_matrix(e if c == e.shape[0] else e[cand])
            valid[row, :c] = True
        picks = greedy_maxmin_from_distances(dist, valid, [jobs[i][2] for i in ids])
        for row, i in enumerate(ids):
            out[i] = jobs[i][1][picks[row]]
    return out  # type: ignore[return-value]


def _plan_vlapruner(
    items: list[tuple[PruneInputs, int]],
) -> tuple[list[Tensor | None], list[tuple[Tensor, Tensor, int]], list[int]]:
    """Stacked dual top-k and union for many requests. Returns the finished results (None
    where the union exceeds the budget) and the diversity-filter jobs still to run, so
    select_batch can run them in one greedy loop together with divprune's."""
    topk_jobs: list[tuple[Tensor, int]] = []
    for inputs, budget in items:
        topk_jobs.append((_sem(inputs), budget))
        act = _action(inputs)
        if act is not None:
            topk_jobs.append((act, budget))
    ranked = iter(_batched_topk(topk_jobs))
    out: list[Tensor | None] = [None] * len(items)
    greedy_jobs: list[tuple[Tensor, Tensor, int]] = []
    greedy_owner: list[int] = []
    for i, (inputs, budget) in enumerate(items):
        c_sem = next(ranked)
        if inputs.action_estimate is None:
            out[i] = torch.sort(c_sem).values
            continue
        union = union_indices(c_sem, next(ranked), size=inputs.num_visual)
        if union.numel() == budget:
            out[i] = union
        else:
            greedy_jobs.append((inputs.embeddings, union, budget))
            greedy_owner.append(i)
    return out, greedy_jobs, greedy_owner


def select_tokens(inputs: PruneInputs, method: str, budget: int) -> Tensor:
    """Kept visual indices for one request: sorted, unique, in range, exactly ``budget``
    entries (all M for ``'none'``). ValueError on bad inputs or an unknown method."""
    return get_pruner(method)(inputs, budget)


def select_batch(items: Sequence[tuple[PruneInputs, str, int]]) -> list[Tensor]:
    """:func:`select_tokens` for many requests (mixed pruners and budgets), in item order.

    Vectorised where it pays: all top-k-style selections of equal M share one stacked sort,
    and every diversity filter (vlapruner's union filter, divprune) runs in one padded greedy
    loop per device instead of one Python loop per request. Results equal the per-request
    ones (each request's distances are computed on its own; only the loop is shared).
    """
    for inputs, method, budget in items:
        get_pruner(method)
        validate_inputs(inputs, budget)
    items = [(inputs, method, operator.index(budget)) for inputs, method, budget in items]
    out: list[Tensor | None] = [None] * len(items)
    topk_ids: list[int] = []
    vla_ids: list[int] = []
    div_ids: list[int] = []
    for i, (inputs, method, budget) in enumerate(items):
        if method in _SCORE_FNS:
            topk_ids.append(i)
        elif method == "vlapruner" and _RAW.get(method) is _vlapruner:
            vla_ids.append(i)
        elif method == "divprune" and _RAW.get(method) is _divprune:
            if budget == inputs.num_visual:
                out[i] = torch.arange(inputs.num_visual, device=inputs.attn.device)
            else:
                div_ids.append(i)
        else:
            out[i] = _RAW[method](inputs, budget)
    if topk_ids:
        jobs = [(_SCORE_FNS[items[i][1]](items[i][0]), items[i][2]) for i in topk_ids]
        for i, idx in zip(topk_ids, _batched_topk(jobs), strict=True):
            out[i] = torch.sort(idx).values
    greedy_jobs: list[tuple[Tensor, Tensor, int]] = []
    greedy_owner: list[int] = []
    if vla_ids:
        res, jobs_v, owners_v = _plan_vlapruner([(items[i][0], items[i][2]) for i in vla_ids])
        for i, idx in zip(vla_ids, res, strict=True):
            out[i] = idx
        greedy_jobs += jobs_v
        greedy_owner += [vla_ids[o] for o in owners_v]
    for i in div_ids:
        inp = items[i][0]
        greedy_jobs.append(
            (inp.embeddings, torch.arange(inp.num_visual, device=inp.attn.device), items[i][2])
        )
        greedy_owner.append(i)
    if greedy_jobs:
        for i, idx in zip(greedy_owner, _batched_greedy(greedy_jobs), strict=True):
            out[i] = idx
    return [
        _check_output(items[i][1], idx, items[i][0], items[i][2])  # type: ignore[arg-type]
        for i, idx in enumerate(out)
    ]
