"""Token selection: deterministic top-k, union, greedy max-min cosine diversity, and
VLA-Pruner's Combine-then-Filter.

Determinism matters: the same frame must prune the same tokens whether it is served alone or
in a batch, on any run. CPU ``torch.topk`` does not order ties, so top-k here is a stable
descending sort (ties -> lowest index). The diversity solver quantises distances to a 2^-20
grid before comparing them, so geometrically tied candidates (e.g. duplicate or symmetric
embeddings) compare equal despite float rounding, and exact ties go to the lowest index
(``argmax`` returns the first). Batched selection computes each request's distances on its
own, so batching never changes a result.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from . import checks
from .checks import require_finite

__all__ = [
    "combine_then_filter",
    "combine_then_filter_batch",
    "cosine_distance_matrix",
    "diversity_filter",
    "greedy_maxmin",
    "greedy_maxmin_batched",
    "greedy_maxmin_from_distances",
    "stable_topk",
    "stable_topk_batched",
    "stable_topk_many",
    "union_indices",
]

_QUANT = float(1 << 20)  # distance grid: 2^-20 (~1e-6), integers stay exact in float32


def _check_scores(name: str, s: Tensor, m: int | None = None) -> None:
    if s.dim() != 1:
        raise ValueError(f"{name} must be 1-D [M], got shape {tuple(s.shape)}")
    if m is not None and s.shape[0] != m:
        raise ValueError(f"{name} has {s.shape[0]} entries, expected M={m}")
    require_finite(name, s)


def _check_budget(budget: int, m: int) -> None:
    try:
        ok = not isinstance(budget, bool) and operator.index(budget) == budget
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"budget must be an int, got {type(budget).__name__}")
    if not 1 <= budget <= m:
        raise ValueError(f"budget={budget} out of range [1, M={m}]")


def stable_topk_batched(scores: Tensor, budget: int) -> Tensor:
    """Row-wise indices of the ``budget`` largest scores, ties to the lowest index.

    ``scores``: ``[B, M]``. Returns ``[B, budget]`` in rank order (not sorted by index).
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :budget]


def stable_topk(scores: Tensor, budget: int) -> Tensor:
    """Indices of the ``budget`` largest scores, sorted ascending; ties to the lowest index."""
    _check_scores("scores", scores)
    _check_budget(budget, scores.shape[0])
    return torch.sort(stable_topk_batched(scores.unsqueeze(0), budget)[0]).values


def stable_topk_many(jobs: Sequence[tuple[Tensor, int]]) -> list[Tensor]:
    """Stable top-k for many ``(scores [M], budget)`` jobs, in rank order: one stacked sort
    per (M, device) group instead of one per job. Same result as one sort per job."""
    out: list[Tensor | None] = [None] * len(jobs)
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, (s, _) in enumerate(jobs):
        groups.setdefault((s.shape[0], s.device), []).append(i)
    for ids in groups.values():
        stacked = torch.stack([jobs[i][0].to(torch.float32) for i in ids])
        ranked = stable_topk_batched(stacked, max(jobs[i][1] for i in ids))
        for row, i in enumerate(ids):
            out[i] = ranked[row, : jobs[i][1]]
    return out  # type: ignore[return-value]


def union_indices(*index_sets: Tensor, size: int) -> Tensor:
    """Sorted union of index sets over ``0..size-1`` (a mask, not a sort-unique)."""
    device = index_sets[0].device
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    for idx in index_sets:
        mask[idx] = True
    return mask.nonzero().squeeze(1)


def cosine_distance_matrix(embeddings: Tensor) -> Tensor:
    """Pairwise ``1 - cos`` over the last two dims (``[..., n, E] -> [..., n, n]``), float32.

    Zero vectors are treated as orthogonal to everything (distance 1). The result is
    symmetrised, clamped to [0, 2], its diagonal zeroed, and quantised (see module doc).
    """
    x = embeddings.to(torch.float32)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = x @ x.transpose(-1, -2)
    d = 1.0 - 0.5 * (g + g.transpose(-1, -2))
    d = d.clamp_(0.0, 2.0).mul_(_QUANT).round_().div_(_QUANT)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d


def greedy_maxmin_batched(
    embeddings: Tensor, valid: Tensor, budgets: Sequence[int]
) -> list[Tensor]:
    """Greedy max-min cosine diversity for a batch of padded candidate sets, in one loop.

    Args:
        embeddings: ``[B, n, E]`` candidate embeddings (rows past a set's size are padding).
        valid: ``[B, n]`` bool, True for real candidates.
        budgets: per-set number to pick (clamped to the set's size).

    Returns:
        Per set, the picked positions on the ``n`` axis, sorted ascending.

    A convenience for callers holding padded sets; the clamp reads the set sizes on the host,
    so the engine's path (:func:`diversity_filter`) does not use it.
    """
    sizes = valid.sum(dim=1).tolist()
    budgets = [min(int(b), int(n)) for b, n in zip(budgets, sizes, strict=True)]
    return greedy_maxmin_from_distances(cosine_distance_matrix(embeddings), valid, budgets)


def greedy_maxmin_from_distances(
    dist: Tensor, valid: Tensor, budgets: Sequence[int]
) -> list[Tensor]:
    """The greedy solver on precomputed ``[B, n, n]`` distances (padding entries ignored).

    First pick: the candidate whose nearest other candidate is farthest; then repeatedly the
    candidate with the largest min distance to the picked set; ties to the lowest position.
    Batched callers compute each set's distances on its own and pad the small ``n x n``
    matrices, so a set's picks do not depend on what it was batched with.

    ``budgets[b]`` must not exceed set b's number of valid candidates (checked only with
    debug checks on): the result sizes are then known on the host, so nothing here waits for
    the device. Returns per set the ``budgets[b]`` picked positions, sorted ascending.
    """
    bsz, n, _ = dist.shape
    device = dist.device
    budgets = [int(b) for b in budgets]
    if checks.enabled():
        for b, (k, size) in enumerate(zip(budgets, valid.sum(dim=1).tolist(), strict=True)):
            if not 0 <= k <= size:
                raise ValueError(f"budget {k} of set {b} not in [0, its {size} candidates]")
    if bsz == 0:
        return []
    # Nearest *other* valid candidate: mask self and padding columns with +inf.
    eye = torch.eye(n, dtype=torch.bool, device=device)
    col_invalid = ~valid.unsqueeze(1)  # [B, 1, n]
    nearest = dist.masked_fill(eye | col_invalid, float("inf")).amin(dim=-1)  # [B, n]
    nearest = nearest.masked_fill(~valid, float("-inf"))  # padding is never picked
    first = nearest.argmax(dim=-1)  # lone candidate: nearest=+inf; ties -> lowest position
    # score = min distance to the picked set, -inf where not pickable (picked or padding).
    # The distance rows read in the loop carry -inf on their diagonal, so min(score, row of
    # the pick) also takes the pick itself out: two small ops per step, no index_put. A set
    # whose budget is reached keeps picking (-inf everywhere -> position 0); those picks are
    # cut. Rows are gathered from the [B*n, n] view with index_select (less dispatch than
    # advanced indexing; the loop is dispatch-bound at these sizes).
    pick_rows = dist.masked_fill(eye, float("-inf")).view(bsz * n, n)
    base = torch.arange(bsz, device=device) * n
    score = pick_rows.index_select(0, base + first).masked_fill(~valid, float("-inf"))
    loop = _greedy_loop_numpy if device.type == "cpu" else _greedy_loop_torch
    order = loop(pick_rows, score, first, max(budgets))  # [B, kmax] in pick order
    return [torch.sort(order[b, : budgets[b]]).values for b in range(bsz)]


def _greedy_loop_torch(pick_rows: Tensor, score: Tensor, first: Tensor, kmax: int) -> Tensor:
    """The greedy steps on the tensors' device, nothing read back to the host."""
    bsz, n = score.shape
    base = torch.arange(bsz, device=score.device) * n
    picks = [first]
    for _ in range(1, kmax):
        nxt = score.argmax(dim=-1)
        torch.minimum(score, pick_rows.index_select(0, base + nxt), out=score)
        picks.append(nxt)
    return torch.stack(picks, dim=1)


def _greedy_loop_numpy(pick_rows: Tensor, score: Tensor, first: Tensor, kmax: int) -> Tensor:
    """The same steps on CPU through NumPy views of the same memory: identical picks (float32
    ``minimum`` is exact, ``argmax`` takes the first maximum in both), at a fraction of
    torch's per-op dispatch, which dominates this loop's ~budget tiny steps."""
    bsz, n = score.shape
    rows = pick_rows.numpy().reshape(bsz, n, n)
    s = score.numpy()
    sets = np.arange(bsz)
    order = np.empty((bsz, max(kmax, 1)), dtype=np.int64)
    order[:, 0] = first.numpy()
    for step in range(1, kmax):
        nxt = s.argmax(axis=-1)
        np.minimum(s, rows[sets, nxt], out=s)
        order[:, step] = nxt
    return torch.from_numpy(order[:, :kmax])


def diversity_filter(
    jobs: Sequence[tuple[Tensor, Tensor | None, Tensor | int, int]],
) -> list[Tensor]:
    """Greedy max-min for many ``(embeddings [M, E], candidates, size, budget)`` jobs.

    ``candidates`` is ``[n]`` token ids whose first ``size`` entries (a 0-d tensor or an
    int) are the real candidates in ascending order, the rest padding; ``None`` means all M
    tokens. ``budget <= size``. Each job's n x n distances are computed on its own (no result
    depends on the batch), then padded into one ``[B, n, n]`` block per device for a single
    greedy loop. Returns each job's ``budget`` kept ids, sorted; no device-to-host reads.
    """
    out: list[Tensor | None] = [None] * len(jobs)
    groups: dict[torch.device, list[int]] = {}
    for i, (emb, _, _, _) in enumerate(jobs):
        groups.setdefault(emb.device, []).append(i)
    for device, ids in groups.items():
        lens = [jobs[i][0].shape[0] if jobs[i][1] is None else jobs[i][1].numel() for i in ids]
        n = max(lens)
        dist = torch.zeros(len(ids), n, n, dtype=torch.float32, device=device)
        valid = torch.zeros(len(ids), n, dtype=torch.bool, device=device)
        for row, (i, c) in enumerate(zip(ids, lens, strict=True)):
            emb, cand, size, _ = jobs[i]
            dist[row, :c, :c] = cosine_distance_matrix(emb if cand is None else emb[cand])
            valid[row, :c] = torch.arange(c, device=device) < size
        picks = greedy_maxmin_from_distances(dist, valid, [jobs[i][3] for i in ids])
        for row, i in enumerate(ids):
            cand = jobs[i][1]
            out[i] = picks[row] if cand is None else cand[picks[row]]
    return out  # type: ignore[return-value]


def greedy_maxmin(embeddings: Tensor, budget: int, candidates: Tensor | None = None) -> Tensor:
    """Greedy max-min cosine diversity: ``budget`` indices from ``candidates``, sorted.

    Args:
        embeddings: ``[M, E]`` token embeddings (only candidate rows are read).
        budget: number to keep, ``1 <= budget <= len(candidates)``.
        candidates: ``[C]`` indices into ``embeddings``; default all M rows.

    Returns:
        LongTensor ``[budget]`` of indices into ``embeddings``, ascending.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [M, E], got shape {tuple(embeddings.shape)}")
    require_finite("embeddings", embeddings)
    m = embeddings.shape[0]
    cand = None
    if candidates is not None:
        cand = torch.sort(torch.as_tensor(candidates, device=embeddings.device).long()).values
        if cand.dim() != 1 or cand.numel() == 0:
            raise ValueError("candidates must be a non-empty 1-D index tensor")
        if checks.enabled():
            if int(cand[0]) < 0 or int(cand[-1]) >= m:
                raise ValueError(f"candidates out of range [0, M={m})")
            if bool((cand[1:] == cand[:-1]).any()):
                raise ValueError("candidates must be unique")
    size = m if cand is None else cand.numel()
    _check_budget(budget, size)
    if budget == size:
        return torch.arange(m, device=embeddings.device) if cand is None else cand
    return diversity_filter([(embeddings, cand, size, budget)])[0]


def _union_candidates(c_sem: Tensor, c_act: Tensor, m: int, n: int) -> tuple[Tensor, Tensor]:
    """The union of two top-k sets as ``n`` candidate ids (members ascending first, then
    padding) and its size as a 0-d tensor: fixed shapes, so no device-to-host read."""
    mask = torch.zeros(m, dtype=torch.bool, device=c_sem.device)
    mask[c_sem] = True
    mask[c_act] = True
    ids = torch.arange(m, device=c_sem.device)
    members_first = torch.sort(torch.where(mask, ids, ids + m)).indices
    return members_first[:n], mask.sum()


def combine_then_filter_batch(
    semantic_scores: Sequence[Tensor],
    action_scores: Sequence[Tensor | None],
    embeddings: Sequence[Tensor],
    budgets: Sequence[int],
) -> list[Tensor]:
    """:func:`combine_then_filter` for many requests: one stacked sort per (M, device) for the
    dual top-k, one greedy loop per device for the diversity filters. Each request's result
    equals its own :func:`combine_then_filter` (distances are computed per request)."""
    n_req = len(semantic_scores)
    if not (len(action_scores) == len(embeddings) == len(budgets) == n_req):
        raise ValueError("semantic_scores, action_scores, embeddings, budgets differ in length")
    for sem, act, emb, budget in zip(semantic_scores, action_scores, embeddings, budgets):
        _check_scores("semantic_scores", sem)
        m = sem.shape[0]
        if act is not None:
            _check_scores("action_scores", act, m)
        if emb.dim() != 2 or emb.shape[0] != m:
            raise ValueError(f"embeddings must be [M={m}, E], got shape {tuple(emb.shape)}")
        require_finite("embeddings", emb)
        _check_budget(budget, m)
    topk_jobs = [(s, b) for s, b in zip(semantic_scores, budgets, strict=True)]
    topk_jobs += [
        (a.to(s.device), b)
        for s, a, b in zip(semantic_scores, action_scores, budgets, strict=True)
        if a is not None
    ]
    ranked = stable_topk_many(topk_jobs)
    c_act = iter(ranked[n_req:])
    out: list[Tensor | None] = [None] * n_req
    jobs: list[tuple[Tensor, Tensor | None, Tensor | int, int]] = []
    owners: list[int] = []
    for i, (sem, act, budget) in enumerate(zip(semantic_scores, action_scores, budgets)):
        m = sem.shape[0]
        if act is None:  # no action history yet: semantic top-k alone
            out[i] = torch.sort(ranked[i]).values
            continue
        cand, size = _union_candidates(ranked[i], next(c_act), m, min(m, 2 * budget))
        if budget == m:
            out[i] = cand  # the union is every token
            continue
        # |union| is in [budget, 2*budget]; the greedy picks all of it when |union| == budget.
        jobs.append((embeddings[i].to(sem.device), cand, size, budget))
        owners.append(i)
    for i, idx in zip(owners, diversity_filter(jobs), strict=True):
        out[i] = idx
    return out  # type: ignore[return-value]


def combine_then_filter(
    semantic_scores: Tensor,
    action_scores: Tensor | None,
    embeddings: Tensor,
    budget: int,
) -> Tensor:
    """VLA-Pruner's Combine-then-Filter: sorted kept indices, LongTensor ``[budget]``.

    Dual top-k with the full budget each (semantic S_sem, smoothed action S_hat), union, and
    when the union exceeds the budget a greedy max-min cosine-diversity filter over the
    union's embeddings (scores are not used in that step). ``action_scores=None`` (no action
    history yet) -> semantic top-k alone.
    """
    return combine_then_filter_batch([semantic_scores], [action_scores], [embeddings], [budget])[0]
