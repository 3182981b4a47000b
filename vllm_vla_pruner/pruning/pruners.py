"""Named pruners behind one interface, and batched selection for many requests.

Every pruner maps ``(PruneInputs, budget)`` to the kept visual-token indices: a sorted,
unique, in-range LongTensor of exactly ``budget`` entries (all M for ``'none'``), on the
device of ``inputs.attn``. Each pruner also declares which attention rows (query positions)
it reads, given the prompt's layout (:func:`needed_rows`), so the engine computes only those:
one row for FastV or ``semantic_rows='last'``, none for divprune, random or grid.

Pruners that use the smoothed action scores (``vlapruner``, ``score_fusion``,
``action_only``) fall back to their semantic half - top-k of S_sem with
``inputs.semantic_rows`` - when ``action_estimate`` is None (no history yet); the engine
normally runs warm-up frames unpruned anyway, so the fallback only matters to callers that
prune during warm-up.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import checks
from .checks import require_finite
from .scores import (
    SEMANTIC_ROWS,
    attention_rows,
    check_row_block,
    semantic_row_range,
    semantic_scores,
    take_rows,
)
from .selection import (
    combine_then_filter,
    combine_then_filter_batch,
    diversity_filter,
    stable_topk_batched,
    stable_topk_many,
)

__all__ = [
    "PRUNERS",
    "PromptLayout",
    "PruneInputs",
    "QKRequest",
    "budget_for",
    "get_pruner",
    "needed_rows",
    "needs_action_history",
    "register_pruner",
    "select_batch",
    "select_from_qk",
    "select_tokens",
    "validate_inputs",
]

PrunerFn = Callable[["PruneInputs", int], Tensor]


@dataclass(frozen=True)
class PromptLayout:
    """What decides which attention rows a pruner reads: host-side facts about one request's
    prompt, known before any attention is computed."""

    num_tokens: int  # T, prompt rows (= keys)
    visual_start: int
    num_visual: int  # M
    text_start: int | None = None  # first text row; default right after the visual tokens
    semantic_rows: str = "all"
    has_action_estimate: bool = False


RowsFn = Callable[[PromptLayout], range]


@dataclass
class PruneInputs:
    """Everything a pruner may look at for one request's frame.

    ``attn`` holds R query rows over all T keys, at the prompt positions ``row_positions``
    (a contiguous range that must cover the pruner's :func:`needed_rows`; the engine passes
    exactly those); with ``row_positions=None`` it is the full square T x T matrix.
    ``text_start`` (optional) is the first text row for ``semantic_rows='text'`` and
    ``sparsevlm``; default right after the visual tokens.
    """

    attn: Tensor  # [R, T] head-averaged layer K-1 prefill attention of R query rows (causal)
    visual_start: int  # first visual row/column (1: right after BOS)
    num_visual: int  # M
    embeddings: Tensor  # [M, E] visual tokens' LLM input embeddings (projector output)
    action_estimate: Tensor | None = None  # smoothed S_hat [M] from ActionHistory.estimate
    grid_shape: tuple[int, int] | None = None  # (rows, cols) of the patch grid, for 'grid'
    seed: int = 0  # for 'random'
    semantic_rows: str = "all"  # 'all' | 'last' | 'text'
    fusion_alpha: float = 0.5  # score_fusion weight on S_sem
    text_start: int | None = None
    row_positions: range | None = None  # prompt positions of attn's rows; None = 0..T-1

    @property
    def layout(self) -> PromptLayout:
        """The row-deciding facts of these inputs."""
        return PromptLayout(
            num_tokens=self.attn.shape[-1],
            visual_start=self.visual_start,
            num_visual=self.num_visual,
            text_start=self.text_start,
            semantic_rows=self.semantic_rows,
            has_action_estimate=self.action_estimate is not None,
        )


# Raw pruners assume validated inputs; PRUNERS holds the validating wrappers.
_RAW: dict[str, PrunerFn] = {}
PRUNERS: dict[str, PrunerFn] = {}
_NEEDS_HISTORY: set[str] = set()
_ROWS: dict[str, RowsFn] = {}
# Pruners whose output contract holds by construction (this module's); third-party ones get
# their output values checked on every call, the built-ins only with debug checks on.
_BUILTIN: set[str] = set()
# Top-k family: method -> score function; lets select_batch stack their sorts.
_SCORE_FNS: dict[str, Callable[[PruneInputs], Tensor]] = {}


def _all_rows(p: PromptLayout) -> range:
    return range(p.num_tokens)


def _no_rows(p: PromptLayout) -> range:
    return range(0)


def _semantic_rows(p: PromptLayout) -> range:
    return semantic_row_range(
        p.semantic_rows, p.num_tokens, p.visual_start, p.num_visual, p.text_start
    )


def _last_row(p: PromptLayout) -> range:
    return range(p.num_tokens - 1, p.num_tokens)


def _semantic_rows_without_history(p: PromptLayout) -> range:
    return _no_rows(p) if p.has_action_estimate else _semantic_rows(p)


def _sparsevlm_rows(p: PromptLayout) -> range:
    ts = p.visual_start + p.num_visual if p.text_start is None else p.text_start
    return range(ts, p.num_tokens) if ts < p.num_tokens else _last_row(p)


def register_pruner(
    name: str, *, needs_action_history: bool = False, rows: RowsFn = _all_rows
) -> Callable[[PrunerFn], PrunerFn]:
    """Decorator: register ``fn(inputs, budget) -> indices`` under ``name``.

    ``rows`` maps a :class:`PromptLayout` to the attention rows (query positions) ``fn``
    reads; the default, every row, suits any pruner. The stored entry validates the inputs
    and the output, so third-party pruners get the same guarantees. Re-registering a name
    replaces it.
    """

    def deco(fn: PrunerFn) -> PrunerFn:
        @functools.wraps(fn)
        def checked(inputs: PruneInputs, budget: int) -> Tensor:
            validate_inputs(inputs, budget, name)
            budget = operator.index(budget)
            return _check_output(name, fn(inputs, budget), inputs, budget)

        _RAW[name] = fn
        PRUNERS[name] = checked
        _ROWS[name] = rows
        _BUILTIN.discard(name)
        _SCORE_FNS.pop(name, None)
        if needs_action_history:
            _NEEDS_HISTORY.add(name)
        else:
            _NEEDS_HISTORY.discard(name)
        return fn

    return deco


def _builtin(
    name: str, *, rows: RowsFn, needs_action_history: bool = False
) -> Callable[[PrunerFn], PrunerFn]:
    """register_pruner for this module's pruners (output contract holds by construction)."""

    def deco(fn: PrunerFn) -> PrunerFn:
        register_pruner(name, needs_action_history=needs_action_history, rows=rows)(fn)
        _BUILTIN.add(name)
        return fn

    return deco


def _register_topk(
    name: str, *, rows: RowsFn, needs_action_history: bool = False
) -> Callable[[Callable[[PruneInputs], Tensor]], Callable[[PruneInputs], Tensor]]:
    """Register a pruner defined as 'top-k of a score vector' (batchable sort)."""

    def deco(score_fn: Callable[[PruneInputs], Tensor]) -> Callable[[PruneInputs], Tensor]:
        def pruner(inputs: PruneInputs, budget: int) -> Tensor:
            return _topk_sorted(score_fn(inputs), budget)

        pruner.__name__ = name
        pruner.__doc__ = score_fn.__doc__
        _builtin(name, rows=rows, needs_action_history=needs_action_history)(pruner)
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


def needed_rows(method: str, layout: PromptLayout) -> range:
    """Prompt positions of the attention rows ``method`` reads for a prompt of this layout
    (empty if none): the engine computes exactly these rows over all T keys."""
    get_pruner(method)
    return _ROWS[method](layout)


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


def validate_inputs(inputs: PruneInputs, budget: int, method: str | None = None) -> None:
    """Raise ValueError naming the offending field if ``inputs``/``budget`` are unusable (for
    ``method``: its rows must be in ``attn``). Value checks (finite) only with debug checks."""
    a = inputs.attn
    if not isinstance(a, Tensor):
        raise ValueError(f"attn must be an [R, T] tensor, got {type(a).__name__}")
    have = check_row_block(a, inputs.row_positions)
    t = a.shape[1]
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
        require_finite("action_estimate", s)
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
    if method is not None:
        take_rows(a, have, needed_rows(method, inputs.layout), f"pruner {method!r}")
    require_finite("attn", a)
    require_finite("embeddings", e)


def _check_output(name: str, idx: Tensor, inputs: PruneInputs, budget: int) -> Tensor:
    """Guard the contract for every pruner: the shape always; the values (sorted, unique, in
    range: device-to-host reads) for third-party pruners, and for all with debug checks."""
    m = inputs.num_visual
    want = m if name == "none" else budget
    if not isinstance(idx, Tensor) or idx.dim() != 1 or idx.numel() != want:
        raise RuntimeError(f"pruner {name!r} returned {getattr(idx, 'shape', idx)}, want [{want}]")
    idx = idx.to(device=inputs.attn.device, dtype=torch.long)
    if name in _BUILTIN and not checks.enabled():
        return idx
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
        row_positions=inputs.row_positions,
    )


def _action(inputs: PruneInputs) -> Tensor | None:
    s = inputs.action_estimate
    return None if s is None else s.to(torch.float32)


def _minmax(x: Tensor) -> Tensor:
    """Scale to [0, 1]; a constant vector maps to 0 (decided on the device, no host read)."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span, torch.zeros_like(x))


def _grid_shape(inputs: PruneInputs) -> tuple[int, int]:
    if inputs.grid_shape is not None:
        return int(inputs.grid_shape[0]), int(inputs.grid_shape[1])
    m = inputs.num_visual
    side = math.isqrt(m)
    return (side, side) if side * side == m else (1, m)


# -- top-k family ------------------------------------------------------------------------------
@_register_topk("semantic_only", rows=_semantic_rows)
def _semantic_only(inputs: PruneInputs) -> Tensor:
    """Top-k of S_sem (rows per ``semantic_rows``): VLA-Pruner's semantic half."""
    return _sem(inputs)


@_register_topk("fastv", rows=_last_row)
def _fastv(inputs: PruneInputs) -> Tensor:
    """FastV: top-k by the last prompt row's attention at layer K-1."""
    return _sem(inputs, rows="last")


@_register_topk("action_only", rows=_semantic_rows_without_history, needs_action_history=True)
def _action_only(inputs: PruneInputs) -> Tensor:
    """Top-k of S_hat: VLA-Pruner's action half; S_sem without history."""
    s = _action(inputs)
    return _sem(inputs) if s is None else s


@_register_topk("score_fusion", rows=_semantic_rows, needs_action_history=True)
def _score_fusion(inputs: PruneInputs) -> Tensor:
    """Ablation baseline: a*minmax(S_sem) + (1-a)*minmax(S_hat); S_sem without history."""
    sem = _sem(inputs)
    s = _action(inputs)
    if s is None:
        return sem
    a = float(inputs.fusion_alpha)
    return a * _minmax(sem) + (1.0 - a) * _minmax(s)


@_register_topk("sparsevlm", rows=_sparsevlm_rows)
def _sparsevlm(inputs: PruneInputs) -> Tensor:
    """SparseVLM, single stage: raters = text rows whose attention mass on the visual tokens
    is >= the mean over text rows; score = raters' mean attention. No text rows -> FastV."""
    m, vs = inputs.num_visual, inputs.visual_start
    want = _sparsevlm_rows(inputs.layout)  # the text rows, else the last row (FastV's)
    have = check_row_block(inputs.attn, inputs.row_positions)
    a = take_rows(inputs.attn, have, want, "sparsevlm")
    text_vis = a[:, vs : vs + m].to(torch.float32)  # [N, M]
    relevance = text_vis.sum(dim=1)
    # Masked mean over the raters (not boolean indexing, whose size the host would read).
    w = (relevance >= relevance.mean()).to(torch.float32)
    return (text_vis * w.unsqueeze(1)).sum(dim=0) / w.sum()


# -- other pruners -----------------------------------------------------------------------------
@_builtin("vlapruner", rows=_semantic_rows, needs_action_history=True)
def _vlapruner(inputs: PruneInputs, budget: int) -> Tensor:
    """Combine-then-Filter (S_sem, S_hat); semantic top-k without history."""
    return combine_then_filter(_sem(inputs), _action(inputs), inputs.embeddings, budget)


@_builtin("divprune", rows=_no_rows)
def _divprune(inputs: PruneInputs, budget: int) -> Tensor:
    """DivPrune: greedy max-min cosine diversity over all M tokens, no scores."""
    if budget == inputs.num_visual:
        return torch.arange(inputs.num_visual, device=inputs.attn.device)
    return diversity_filter([(inputs.embeddings, None, inputs.num_visual, budget)])[0]


@_builtin("random", rows=_no_rows)
def _random(inputs: PruneInputs, budget: int) -> Tensor:
    """Uniformly random subset, reproducible from ``inputs.seed`` on any device."""
    gen = torch.Generator(device="cpu").manual_seed(int(inputs.seed))
    idx = torch.randperm(inputs.num_visual, generator=gen)[:budget]
    return torch.sort(idx).values.to(inputs.attn.device)


@_builtin("grid", rows=_no_rows)
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


@_builtin("none", rows=_no_rows)
def _none(inputs: PruneInputs, budget: int) -> Tensor:
    """Unpruned: all M indices (budget ignored)."""
    return torch.arange(inputs.num_visual, device=inputs.attn.device)


# -- batched selection -------------------------------------------------------------------------
def select_tokens(inputs: PruneInputs, method: str, budget: int) -> Tensor:
    """Kept visual indices for one request: sorted, unique, in range, exactly ``budget``
    entries (all M for ``'none'``). ValueError on bad inputs or an unknown method."""
    return get_pruner(method)(inputs, budget)


def select_batch(items: Sequence[tuple[PruneInputs, str, int]]) -> list[Tensor]:
    """:func:`select_tokens` for many requests (mixed pruners and budgets), in item order.

    Vectorised where it pays: all top-k-style selections of equal M share one stacked sort;
    vlapruner requests go through :func:`combine_then_filter_batch` together (one stacked
    dual top-k, one greedy loop), divprune requests through one greedy loop. Results equal
    the per-request ones (each request's distances are computed on its own).
    """
    for inputs, method, budget in items:
        get_pruner(method)
        validate_inputs(inputs, budget, method)
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
        elif method == "divprune" and _RAW.get(method) is _divprune and budget < inputs.num_visual:
            div_ids.append(i)
        else:
            out[i] = _RAW[method](inputs, budget)
    if topk_ids:
        jobs = [(_SCORE_FNS[items[i][1]](items[i][0]), items[i][2]) for i in topk_ids]
        for i, idx in zip(topk_ids, stable_topk_many(jobs), strict=True):
            out[i] = torch.sort(idx).values
    if vla_ids:
        vla = [items[i][0] for i in vla_ids]
        kept = combine_then_filter_batch(
            [_sem(inp) for inp in vla],
            [_action(inp) for inp in vla],
            [inp.embeddings for inp in vla],
            [items[i][2] for i in vla_ids],
        )
        for i, idx in zip(vla_ids, kept, strict=True):
            out[i] = idx
    if div_ids:
        div = [(items[i][0].embeddings, None, items[i][0].num_visual, items[i][2]) for i in div_ids]
        for i, idx in zip(div_ids, diversity_filter(div), strict=True):
            out[i] = idx
    return [
        _check_output(items[i][1], idx, items[i][0], items[i][2])  # type: ignore[arg-type]
        for i, idx in enumerate(out)
    ]


# -- from captured queries/keys (what the engine runs) ----------------------------------------
class QKRequest(NamedTuple):
    """One request's prompt at the scoring layer (K-1), before any attention is computed."""

    q: Tensor  # [T, Hq, D] post-RoPE queries of the prompt, row i at position i (any dtype)
    k: Tensor  # [T, Hkv, D] post-RoPE keys
    method: str
    budget: int
    fields: Mapping[str, Any]  # the other PruneInputs fields (visual_start, num_visual, ...)
    # Prefix-LM prompts (pi0): every row attends to every key, so the score rows are
    # computed without the causal mask.
    bidirectional: bool = False


def select_from_qk(requests: Sequence[QKRequest]) -> list[Tensor]:
    """The engine's selection step: for each request, the attention rows its pruner reads
    (:func:`needed_rows`, over all T keys; none for divprune/random/grid), then one
    :func:`select_batch`. Equals selecting from the full T x T matrix, at R/T of its cost."""
    items = []
    for q, k, method, budget, fields, bidirectional in requests:
        no_rows = k.new_empty(0, k.shape[0], dtype=torch.float32)
        inputs = PruneInputs(attn=no_rows, row_positions=range(0), **fields)
        rows = needed_rows(method, inputs.layout)
        if len(rows):
            positions = torch.arange(rows.start, rows.stop, device=k.device)
            attn = attention_rows(
                q[rows.start : rows.stop], k, positions, bidirectional=bidirectional
            )
        else:
            attn = inputs.attn
        items.append((replace(inputs, attn=attn, row_positions=rows), method, budget))
    return select_batch(items)
