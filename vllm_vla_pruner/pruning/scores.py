"""Attention rows -> semantic and action importance scores over the visual tokens.

Everything here is engine-free: plain tensors in, plain tensors out. The engine integration
captures post-RoPE queries/keys (or attention probabilities) and calls these functions; the
math is kept in float32 whatever the model dtype, because the scores feed a top-k whose
ordering must not depend on bf16 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks
from .checks import require_finite

__all__ = [
    "SEMANTIC_ROWS",
    "action_scores",
    "attention_rows",
    "semantic_row_range",
    "semantic_scores",
]

#: Valid ``rows`` choices for :func:`semantic_scores`.
SEMANTIC_ROWS: tuple[str, ...] = ("all", "last", "text")

# Bound on the [Hq, rows, T] float32 score block attention_rows works on at once (elements):
# larger requests go in row chunks through one reused buffer, so a long prompt cannot spike
# memory and each block's logits -> softmax -> head mean stays in cache. Reusing the buffer
# matters as much as bounding it: a fresh 4 MB block per chunk is page-faulted in every time.
# A pi0 prefix's 816 x 816 x 8 heads on one thread: 8 ms, against 12-23 ms (depending on the
# allocator's state) with a new block per chunk; same chunks, same bits.
_MAX_BLOCK_ELEMS = 1 << 20


def attention_rows(
    q: Tensor,
    k: Tensor,
    q_positions: Tensor,
    k_positions: Tensor | None = None,
    scale: float | None = None,
    bidirectional: bool = False,
) -> Tensor:
    """Head-averaged causal attention probabilities of R query rows over T keys.

    Recomputes what eager attention would have returned for a few rows, so the engine can
    keep its fused attention kernel and only pay for the rows the pruner needs.

    Args:
        q: ``[R, Hq, D]`` post-RoPE queries.
        k: ``[T, Hkv, D]`` post-RoPE keys of the request; GQA requires ``Hq % Hkv == 0``
            (query head ``h`` reads kv head ``h // (Hq // Hkv)``, the usual grouping).
        q_positions: ``[R]`` position of each query row. Row ``r`` sees key ``j`` iff
            ``key_pos[j] <= q_positions[r]``.
        k_positions: ``[T]`` positions of the keys; default ``0..T-1`` (keys in order, no
            gaps). Pass it when the key set is compacted (e.g. after pruning).
        scale: softmax scale; default ``1 / sqrt(D)``.
        bidirectional: every row sees every key (a prefix-LM prompt such as pi0's); the
            positions are then only shape-checked and no mask is built.

    Returns:
        ``[R, T]`` float32 probabilities (each row sums to 1 over its visible keys, 0 on
        masked keys), averaged over the Hq heads.

    Shapes are always checked; values (finite q/k, every row sees a key) only with debug
    checks on, since reading them would stall a GPU forward.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [R, Hq, D], got shape {tuple(q.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k must be [T, Hkv, D], got shape {tuple(k.shape)}")
    r, hq, d = q.shape
    t, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"q and k head dims differ: q has D={d}, k has D={dk}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"GQA needs Hq % Hkv == 0: q has Hq={hq} heads, k has Hkv={hkv}")
    if t == 0 or r == 0:
        raise ValueError(f"q and k must be non-empty (R={r}, T={t})")
    if q_positions.dim() != 1 or q_positions.shape[0] != r:
        raise ValueError(f"q_positions must be [R]=[{r}], got shape {tuple(q_positions.shape)}")
    if k_positions is None:
        key_pos = torch.arange(t, device=k.device)
    else:
        if k_positions.dim() != 1 or k_positions.shape[0] != t:
            raise ValueError(f"k_positions must be [T]=[{t}], got shape {tuple(k_positions.shape)}")
        key_pos = k_positions.to(k.device)
    q_pos = q_positions.to(k.device)
    if not bidirectional and checks.enabled() and bool((q_pos < key_pos.min()).any()):
        raise ValueError("q_positions: some query row sees no key (position before every key)")
    require_finite("q", q)
    require_finite("k", k)
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    group = hq // hkv
    # [Hkv, group*R, D] x [Hkv, D, T]: shares each kv head across its query group without
    # materialising repeated keys. Rows are group-major, so [Hkv, group*R, T] views as
    # [Hq, R, T] for the head mean.
    qf = q.to(torch.float32).permute(1, 0, 2).reshape(hkv, group, r, d)
    kf = k.to(torch.float32).permute(1, 2, 0)  # [Hkv, D, T]
    out = torch.empty(r, t, dtype=torch.float32, device=k.device)
    chunk = min(r, max(1, _MAX_BLOCK_ELEMS // max(1, hq * t)))
    block = torch.empty(hq * chunk * t, dtype=torch.float32, device=k.device)
    zero = block.new_zeros(1, 1, 1)
    for s in range(0, r, chunk):
        e = min(r, s + chunk)
        n = e - s
        qc = qf[:, :, s:e, :].reshape(hkv, group * n, d)
        logits = block[: hq * n * t].view(hkv, group * n, t)  # contiguous for every n
        if bidirectional:  # no mask: a broadcast zero bias (same kernel, same bits)
            bias = zero.expand(hkv, group * n, t)
        else:
            # Additive causal mask fused into the scaled matmul (cheaper than masked_fill).
            mask = torch.zeros(n, t, dtype=torch.float32, device=k.device)
            mask.masked_fill_(key_pos.view(1, t) > q_pos[s:e].view(-1, 1), float("-inf"))
            bias = mask.repeat(group, 1).unsqueeze(0)
        torch.baddbmm(bias, qc, kf, alpha=scale, out=logits)
        torch.softmax(logits, dim=-1, out=logits)  # in place: the row kernel reads, then writes
        torch.mean(logits.view(hq, n, t), dim=0, out=out[s:e])
    return out


def semantic_row_range(
    rows: str, num_tokens: int, visual_start: int, num_visual: int, text_start: int | None = None
) -> range:
    """Positions of the query rows that vote in :func:`semantic_scores` for ``rows``.

    ``'all'``: every row ``0..T-1``; ``'last'``: ``T-1``; ``'text'``: ``text_start..T-1``
    (default right after the visual span). Host arithmetic only: the engine calls it to decide
    which attention rows to compute before computing any.
    """
    if rows == "all":
        return range(num_tokens)
    if rows == "last":
        return range(num_tokens - 1, num_tokens)
    if rows == "text":
        ts = visual_start + num_visual if text_start is None else text_start
        if ts < 0 or ts >= num_tokens:
            raise ValueError(f"text_start={ts} leaves no text rows in a prompt of T={num_tokens}")
        return range(ts, num_tokens)
    raise ValueError(f"rows must be one of {SEMANTIC_ROWS}, got {rows!r}")


def check_row_block(attn: Tensor, row_positions: range | None) -> range:
    """The positions of ``attn``'s rows (``[R, T]``, R rows of T keys); ValueError if they do
    not fit. ``row_positions=None`` means every row, so ``attn`` must be square."""
    if attn.dim() != 2:
        raise ValueError(f"attn must be an [R, T] matrix, got shape {tuple(attn.shape)}")
    t = attn.shape[1]
    if row_positions is None:
        if attn.shape[0] != t:
            raise ValueError(
                f"attn must be a square [T, T] matrix when row_positions is not given, "
                f"got shape {tuple(attn.shape)}"
            )
        return range(t)
    if not isinstance(row_positions, range) or row_positions.step != 1:
        raise ValueError(f"row_positions must be a range with step 1, got {row_positions!r}")
    if len(row_positions) != attn.shape[0]:
        raise ValueError(
            f"row_positions has {len(row_positions)} rows but attn has {attn.shape[0]}"
        )
    if len(row_positions) and (row_positions.start < 0 or row_positions.stop > t):
        raise ValueError(f"row_positions={row_positions!r} out of range [0, T={t})")
    return row_positions


def take_rows(attn: Tensor, have: range, want: range, what: str) -> Tensor:
    """The rows of ``attn`` at positions ``want`` (a view); ValueError if some were not given."""
    if len(want) and (want.start < have.start or want.stop > have.stop):
        raise ValueError(
            f"{what} needs attention rows {want.start}..{want.stop - 1}, but attn holds rows "
            f"{have.start}..{have.stop - 1} (row_positions)"
        )
    return attn[want.start - have.start : want.stop - have.start]


def semantic_scores(
    attn: Tensor,
    visual_start: int,
    num_visual: int,
    rows: str = "all",
    text_start: int | None = None,
    row_positions: range | None = None,
) -> Tensor:
    """Semantic importance S_sem of each visual token from layer K-1 prefill attention.

    Args:
        attn: ``[R, T]`` head-averaged attention probabilities of R query rows over all T
            keys of the prompt (``[T, T]`` when every row is given).
        visual_start: column of the first visual token.
        num_visual: M, the number of visual tokens (contiguous from ``visual_start``).
        rows: which query rows vote: ``'all'`` (mean over every prefill row, the paper's
            rule; rows before the image contribute 0 under causal masking, which is a
            constant factor and does not change the ranking), ``'last'`` (last prompt row,
            FastV's rule) or ``'text'`` (rows ``text_start..T-1``).
        text_start: first text row for ``rows='text'``; default right after the visual span.
        row_positions: prompt positions of ``attn``'s rows; ``None`` = all ``0..T-1``. It
            must cover :func:`semantic_row_range` for ``rows``; the result is the same as
            from the full matrix (the same rows are averaged).

    Returns:
        ``[M]`` float32 scores in original visual-token order.
    """
    have = check_row_block(attn, row_positions)
    t = attn.shape[1]
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    if visual_start < 0 or visual_start + num_visual > t:
        raise ValueError(
            f"visual span [visual_start={visual_start}, +num_visual={num_visual}) does not fit "
            f"in attn with T={t} keys"
        )
    want = semantic_row_range(rows, t, visual_start, num_visual, text_start)
    sel = take_rows(attn, have, want, f"semantic_rows={rows!r}")
    return sel[:, visual_start : visual_start + num_visual].to(torch.float32).mean(dim=0)


def action_scores(
    action_rows: Tensor,
    visual_key_index: Tensor,
    kept_visual_ids: Tensor,
    num_visual: int,
) -> Tensor:
    """Action importance S_act of one frame, scattered back to original visual coordinates.

    The action queries of a pruned frame only saw the kept visual keys, possibly stored
    compacted; ``visual_key_index`` says where they sit on the key axis and
    ``kept_visual_ids`` which original visual token each one is. Tokens pruned at this frame
    score 0 (they received no attention).

    Args:
        action_rows: ``[A, Tk]`` head-averaged attention of the A action queries over the
            Tk keys they saw.
        visual_key_index: ``[Mk]`` key-axis columns holding visual tokens.
        kept_visual_ids: ``[Mk]`` original visual index (0..M-1) of each of those columns;
            must be unique.
        num_visual: M.

    Returns:
        ``[M]`` float32: mean over action queries; 0 for tokens not in ``kept_visual_ids``.
    """
    if action_rows.dim() != 2 or action_rows.shape[0] == 0:
        raise ValueError(f"action_rows must be [A>=1, Tk], got shape {tuple(action_rows.shape)}")
    if visual_key_index.dim() != 1 or kept_visual_ids.dim() != 1:
        raise ValueError("visual_key_index and kept_visual_ids must be 1-D")
    mk = visual_key_index.shape[0]
    if kept_visual_ids.shape[0] != mk:
        raise ValueError(
            f"kept_visual_ids has {kept_visual_ids.shape[0]} entries but visual_key_index has {mk}"
        )
    if num_visual < 1 or mk > num_visual:
        raise ValueError(f"num_visual={num_visual} must be >= 1 and >= the {mk} kept tokens")
    tk = action_rows.shape[1]
    vki = visual_key_index.to(device=action_rows.device, dtype=torch.long)
    ids = kept_visual_ids.to(device=action_rows.device, dtype=torch.long)
    if checks.enabled():  # value checks read device memory: debug only
        if mk and (int(vki.min()) < 0 or int(vki.max()) >= tk):
            raise ValueError(f"visual_key_index out of range for Tk={tk} keys")
        if mk and (int(ids.min()) < 0 or int(ids.max()) >= num_visual):
            raise ValueError(f"kept_visual_ids out of range [0, {num_visual})")
        if torch.unique(ids).numel() != mk:
            raise ValueError("kept_visual_ids must be unique")
        require_finite("action_rows", action_rows)
    out = torch.zeros(num_visual, dtype=torch.float32, device=action_rows.device)
    if mk:
        out[ids] = action_rows.to(torch.float32)[:, vki].mean(dim=0)
    return out
