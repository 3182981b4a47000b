"""Bidirectional attention for a request's action rows inside a causal engine forward.

Parallel-decoding VLAs (OpenVLA-OFT) append a block of action rows to the prompt and let
those rows attend to each other in both directions, while the prompt stays causal. vLLM's
attention kernels are causal for decoder models. Within one forward that holds a request's
whole prefill, the block's rows are the request's last rows, so:

* the kernel runs as usual on every row and writes the K/V of every row (K/V depend only on
  a row's own input, not on the mask, so the paged KV stays exactly what the model computed);
* the block rows' outputs are then recomputed by hand over all of the request's rows, with
  no mask (a few dozen rows against a few hundred keys per request).

The same function serves the fully bidirectional variant (block = every row of the request)
and compacted (pruned) layouts: a block is given as rows of the current layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ActionBlock:
    """One request's rows in the current layout: ``[start, end)``, of which ``[block_start,
    end)`` attend bidirectionally (to every row of the request)."""

    start: int
    block_start: int
    end: int

    def __post_init__(self) -> None:
        if not self.start <= self.block_start < self.end:
            raise ValueError(f"invalid action block {self}")


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: ActionBlock,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
) -> torch.Tensor:
    """Unmasked attention of the block's query rows over all of its request's rows.

    ``q`` [T, Hq*D], ``k``/``v`` [T, Hkv*D] (post-RoPE, the layer's rows); returns
    [block rows, Hq*D]. Computed in float32 (as the reference), cast back.
    """
    rows = slice(block.block_start, block.end)
    keys = slice(block.start, block.end)
    nq = block.end - block.block_start
    nk = block.end - block.start
    qb = q[rows].view(nq, num_heads, head_dim).transpose(0, 1).float()
    kb = k[keys].view(nk, num_kv_heads, head_dim).transpose(0, 1).float()
    vb = v[keys].view(nk, num_kv_heads, head_dim).transpose(0, 1).float()
    group = num_heads // num_kv_heads
    if group > 1:
        kb = kb.repeat_interleave(group, dim=0)
        vb = vb.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
    return out.transpose(0, 1).reshape(nq, num_heads * head_dim).to(q.dtype)


def layer_with_blocks(
    layer: Any,
    positions: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    blocks: list[ActionBlock],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vLLM decoder layer (Llama, Gemma) whose action blocks attend bidirectionally.

    Returns (hidden, residual, q, k, v) with q/k post-RoPE copies (for attention scores) and
    v (for models that reuse the layer's K/V outside the kernel, pi0's action expert)."""
    if residual is None:
        residual = hidden
        x = layer.input_layernorm(hidden)
    else:
        x, residual = layer.input_layernorm(hidden, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    q_copy, k_copy, v_copy = q.clone(), k.clone(), v.clone()
    out = attn.attn(q, k, v)  # the causal kernel: writes every row's K/V to the paged cache
    if blocks:
        out = out.clone()
        heads, kv_heads = attn.num_heads, attn.num_kv_heads
        for b in blocks:
            out[b.block_start : b.end] = block_attention(
                q_copy, k_copy, v_copy, b, heads, kv_heads, attn.head_dim, attn.scaling
            )
    out, _ = attn.o_proj(out)
    x, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(x), residual, q_copy, k_copy, v_copy
