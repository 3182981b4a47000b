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

import torch
from torch import Tensor

from .scores import all_finite

__all__ = [
    "combine_then_filter",
    "cosine_distance_matrix",
    "greedy_maxmin",
    "greedy_maxmin_batched",
    "greedy_maxmin_from_distances",
    "stable_topk",
    "stable_topk_batched",
    "union_indices",
]

_QUANT = float(1 << 20)  # distance grid: 2^-20 (~1e-6), integers stay exact in float32


def _check_scores(name: str, s: Tensor, m: int | None = None) -> None:
    if s.dim() != 1:
        raise ValueError(f"{name} must be 1-D [M], got shape {tuple(s.shape)}")
    if m is not None and s.shape[0] != m:
        raise ValueError(f"{name} has {s.shape[0]} entries, expected M={m}")
    if not all_finite(s):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


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
    """
    return greedy_maxmin_from_distances(cosine_distance_matrix(embeddings), valid, budgets)


def greedy_maxmin_from_distances(
    dist: Tensor, valid: Tensor, budgets: Sequence[int]
) -> list[Tensor]:
    """The greedy solver on precomputed ``[B, n, n]`` distances (padding entries ignored).

    First pick: the candidate whose nearest other candidate is farthest; then repeatedly the
    candidate with the largest min distance to the picked set; ties to the lowest position.
    Batched callers compute each set's distances on its own and pad the small ``n x n``
    matrices, so a set's picks do not depend on what it was batched with.
    """
    bsz, n, _ = dist.shape
    device = dist.device
    sizes = valid.sum(dim=1)
    kk = torch.as_tensor(list(budgets), dtype=torch.long, device=device)
    kk = torch.minimum(kk, sizes)
    # Nearest *other* valid candidate: mask self and padding columns with +inf.
    eye = torch.eye(n, dtype=torch.bool, device=device)
    col_invalid = ~valid.unsqueeze(1)  # [B, 1, n]
    nearest = dist.masked_fill(eye | col_invalid, float("inf")).amin(dim=-1)  # [B, n]
    nearest = nearest.masked_fill(~valid, float("-inf"))  # padding is never picked
    first = nearest.argmax(dim=-1)  # lone candidate: nearest=+inf; ties -> lowest position
    rows = torch.arange(bsz, device=device)
    # score = min distance to the picked set, -inf where not pickable (picked or padding);
    # min(-inf, x) keeps picked entries out without re-masking every step.
    score = dist[rows, first].masked_fill(~valid, float("-inf"))
    score[rows, first] = float("-inf")
    picks = [first]
    kmax = int(kk.max()) if bsz else 0
    for _ in range(1, kmax):
        nxt = score.argmax(dim=-1)
        torch.minimum(score, dist[rows, nxt], out=score)
        score[rows, nxt] = float("-inf")
        picks.append(nxt)
    order = torch.stack(picks, dim=1)  # [B, kmax] in pick order
    take = torch.arange(len(picks), device=device).unsqueeze(0) < kk.unsqueeze(1)
    picked = torch.zeros(bsz, n, dtype=torch.bool, device=device)
    picked[rows.unsqueeze(1).expand_as(order)[take], order[take]] = True
    return [picked[b].nonzero().squeeze(1) for b in range(bsz)]


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
    if not all_finite(embeddings):
        raise ValueError("embeddings contains non-finite values (NaN or inf)")
    m = embeddings.shape[0]
    if candidates is None:
        cand = torch.arange(m, device=embeddings.device)
    else:
        cand = torch.sort(torch.as_tensor(candidates, device=embeddings.device).long()).values
        if cand.dim() != 1 or cand.numel() == 0:
            raise ValueError("candidates must be a non-empty 1-D index tensor")
        if int(cand[0]) < 0 or int(cand[-1]) >= m:
            raise ValueError(f"candidates out of range [0, M={m})")
        if bool((cand[1:] == cand[:-1]).any()):
            raise ValueError("candidates must be unique")
    _check_budget(budget, cand.numel())
    if budget == cand.numel():
        return cand
    dist = cosine_distance_matrix(embeddings[cand]).unsqueeze(0)
    valid = torch.ones(1, cand.numel(), dtype=torch.bool, device=embeddings.device)
    pos = greedy_maxmin_from_distances(dist, valid, [budget])[0]
    return cand[pos]


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
    _check_scores("semantic_scores", semantic_scores)
    m = semantic_scores.shape[0]
    if action_scores is not None:
        _check_scores("action_scores", action_scores, m)
    if embeddings.dim() != 2 or embeddings.shape[0] != m:
        raise ValueError(f"embeddings must be [M={m}, E], got shape {tuple(embeddings.shape)}")
    if not all_finite(embeddings):
        raise ValueError("embeddings contains non-finite values (NaN or inf)")
    _check_budget(budget, m)
    c_sem = stable_topk_batched(semantic_scores.unsqueeze(0), budget)[0]
    if action_scores is None:
        return torch.sort(c_sem).values
    c_act = stable_topk_batched(action_scores.to(semantic_scores.device).unsqueeze(0), budget)[0]
    union = union_indices(c_sem, c_act, size=m)
    if union.numel() == budget:
        return union
    return greedy_maxmin(embeddings.to(semantic_scores.device), budget, union)
