"""Benchmark of the pruning step the engine runs, alone: scoring + selection for M=256.

Times, per model shape, pruner, keep ratio and batch size, exactly what the engine calls once
per pruned frame at layer K-1: ``ActionHistory.estimate`` and
:func:`~vllm_vla_pruner.pruning.select_from_qk` on the captured post-RoPE q/k of each
request's prompt - which computes only the attention rows the pruner reads (all T rows for
``semantic_rows='all'``, one for FastV and ``'last'``, none for divprune) and runs
``select_batch`` - plus, for vlapruner, the per-frame action bookkeeping of
``_finish_track`` (7 action rows over the kept keys -> ``action_scores`` ->
``ActionHistory.push``). The part spent computing attention rows is timed on its own too.

Shapes: ``bench`` is the checkpoint ``vla-pruner bench engine`` builds (T=278 prompt rows:
BOS + 256 visual + 21 text; Hq=Hkv=8 heads of D=64; E=512); ``openvla-7b`` has OpenVLA-7B's
32 heads of D=128 and E=4096 at the same prompt length.

Run: ``vla-pruner bench pruning`` (writes benchmarks/results/pruning.json). CPU, one torch
thread by default. On a GPU the same calls do not read device memory back to the host (see
``vllm_vla_pruner.pruning.checks``); this benchmark does not measure a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_vla_pruner.pruning import (
    ActionHistory,
    PromptLayout,
    QKRequest,
    action_scores,
    attention_rows,
    budget_for,
    needed_rows,
    select_from_qk,
)


@dataclass(frozen=True)
class Shape:
    """The tensor shapes of one model at the scoring layer."""

    name: str
    tokens: int  # T, prompt rows
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embed_dim: int  # E, projector output = LLM hidden size


SHAPES = {
    "bench": Shape("bench", 278, 8, 8, 64, 512),
    "openvla-7b": Shape("openvla-7b", 278, 32, 32, 128, 4096),
}
M, VISUAL_START, A = 256, 1, 7  # visual tokens, their first row, action queries per frame
#: (pruner, semantic_rows): vlapruner with the paper's rows and with the embedded
#: checkpoint's ('last'); FastV reads the last row whatever the setting; divprune none.
CONFIGS = (("vlapruner", "all"), ("vlapruner", "last"), ("fastv", "last"), ("divprune", "all"))
KEEPS = (0.5, 0.25, 0.125)
BATCHES = (1, 8)


def timed(
    fn: Callable[[], object], budget_s: float = 0.5, max_reps: int = 15
) -> tuple[float, float]:
    """(median, min) wall time in ms: one warm-up, then repeats until ~budget_s (at least 3).
    The min is the better estimate of the uncontended cost on a shared machine."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    reps = max(3, min(max_reps, int(budget_s / max(first, 1e-6))))
    samples = [first]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(samples), 1000.0 * min(samples)


@dataclass
class Frame:
    """One robot's captured tensors for a frame."""

    q: torch.Tensor  # [T, Hq, D] layer K-1 queries
    k: torch.Tensor  # [T, Hkv, D] layer K-1 keys
    embeddings: torch.Tensor  # [M, E]
    act_q: torch.Tensor  # [A, Hq, D] action-layer queries
    act_k: torch.Tensor  # [T + A, Hkv, D] action-layer keys
    session: str


def make_frame(shape: Shape, seed: int) -> Frame:
    g = torch.Generator().manual_seed(seed)
    t, hq, hkv, d = shape.tokens, shape.num_heads, shape.num_kv_heads, shape.head_dim
    return Frame(
        q=torch.randn(t, hq, d, generator=g),
        k=torch.randn(t, hkv, d, generator=g),
        embeddings=torch.randn(M, shape.embed_dim, generator=g),
        act_q=torch.randn(A, hq, d, generator=g),
        act_k=torch.randn(t + A, hkv, d, generator=g),
        session=f"robot-{seed}",
    )


def engine_select(
    frames: list[Frame], history: ActionHistory, method: str, semantic_rows: str, budget: int
) -> list[torch.Tensor]:
    """What ``PrunedDecoder._select`` does for these requests at layer K-1."""
    requests = []
    for f in frames:
        estimate = history.estimate(f.session) if method == "vlapruner" else None
        fields = dict(
            visual_start=VISUAL_START,
            num_visual=M,
            embeddings=f.embeddings,
            action_estimate=estimate,
            semantic_rows=semantic_rows,
            text_start=VISUAL_START + M,
        )
        requests.append(QKRequest(f.q, f.k, method, budget, fields))
    return select_from_qk(requests)


def attention_part(frames: list[Frame], method: str, semantic_rows: str) -> None:
    """The attention rows select_from_qk computes (its scoring part), alone."""
    for f in frames:
        layout = PromptLayout(f.k.shape[0], VISUAL_START, M, VISUAL_START + M, semantic_rows, True)
        rows = needed_rows(method, layout)
        if len(rows):
            attention_rows(f.q[rows.start : rows.stop], f.k, torch.arange(rows.start, rows.stop))


def action_bookkeeping(f: Frame, history: ActionHistory, kept: torch.Tensor) -> None:
    """What ``_finish_track`` does per frame: the A action queries over the pruned key set ->
    S_act -> history."""
    t = f.q.shape[0]
    key_pos = torch.cat(
        [torch.arange(VISUAL_START), VISUAL_START + kept, torch.arange(VISUAL_START + M, t + A)]
    )
    rows = attention_rows(f.act_q, f.act_k[key_pos], torch.arange(t, t + A), k_positions=key_pos)
    vki = torch.arange(VISUAL_START, VISUAL_START + kept.numel())
    history.push(f.session, action_scores(rows, vki, kept, M))


def run_shape(shape: Shape, history: ActionHistory) -> list[dict]:
    frames = [make_frame(shape, i) for i in range(max(BATCHES))]
    for f in frames:  # warm history so vlapruner runs its full path
        for _ in range(history.window):
            history.push(f.session, torch.rand(M))
    results = []
    for method, semantic_rows in CONFIGS:
        layout = PromptLayout(shape.tokens, VISUAL_START, M, VISUAL_START + M, semantic_rows, True)
        n_rows = len(needed_rows(method, layout))
        for bsz in BATCHES:
            batch = frames[:bsz]
            attn_ms = timed(lambda b=batch, m=method, s=semantic_rows: attention_part(b, m, s))
            for keep in KEEPS:
                budget = budget_for(M, keep)
                select_ms = timed(
                    lambda b=batch, m=method, s=semantic_rows, k=budget: engine_select(
                        b, history, m, s, k
                    )
                )
                history_ms = (0.0, 0.0)
                if method == "vlapruner":
                    kept = engine_select(batch[:1], history, method, semantic_rows, budget)[0]
                    history_ms = timed(
                        lambda b=batch, k=kept: [action_bookkeeping(f, history, k) for f in b]
                    )
                total = select_ms[0] + history_ms[0]
                total_min = select_ms[1] + history_ms[1]
                results.append(
                    {
                        "shape": shape.name,
                        "method": method,
                        "semantic_rows": semantic_rows if method == "vlapruner" else None,
                        "attention_rows": n_rows,
                        "keep_ratio": keep,
                        "budget": budget,
                        "batch": bsz,
                        "attention_ms": round(attn_ms[0], 3),
                        "select_ms": round(select_ms[0], 3),
                        "action_history_ms": round(history_ms[0], 3),
                        "total_ms": round(total, 3),
                        "total_per_request_ms": round(total / bsz, 3),
                        "total_min_per_request_ms": round(total_min / bsz, 3),
                    }
                )
                print(
                    f"  {shape.name:10s} {method:9s} rows={n_rows:<3} keep={keep:<5} "
                    f"batch={bsz:<2} total={total:8.2f} ms",
                    flush=True,
                )
    return results


def markdown(results: list[dict]) -> str:
    lines = [
        "| shape | method | semantic rows | attention rows | keep | budget | batch "
        "| of which attention ms | select_from_qk ms | action+history ms | total ms "
        "| per request ms | per request ms (min) |",
        "|" + "---|" * 13,
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['semantic_rows'] or '-'} "
            f"| {r['attention_rows']} | {r['keep_ratio']} | {r['budget']} | {r['batch']} "
            f"| {r['attention_ms']:.2f} | {r['select_ms']:.2f} | {r['action_history_ms']:.2f} "
            f"| {r['total_ms']:.2f} | {r['total_per_request_ms']:.2f} "
            f"| {r['total_min_per_request_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/pruning.json")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: reproducible on a shared machine, where "
        "oversubscribed OpenMP threads make multi-thread timings meaningless; 0 = torch default)",
    )
    ap.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated model shapes among {', '.join(SHAPES)}",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    started = time.perf_counter()
    results = []
    for shape in shapes:
        results += run_shape(shape, ActionHistory())
    table = markdown(results)
    print(table)
    meta = {
        "shapes": {
            s.name: {
                "T": s.tokens,
                "M": M,
                "Hq": s.num_heads,
                "Hkv": s.num_kv_heads,
                "D": s.head_dim,
                "E": s.embed_dim,
                "action_queries": A,
            }
            for s in shapes
        },
        "timed": "ActionHistory.estimate + select_from_qk per request batch (the engine's "
        "_select); action+history = _finish_track's work per frame",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "timing": "median (and min) wall ms over repeats after one warm-up",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "runtime_s": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2) + "\n")
    print(f"\nwrote {out} in {meta['runtime_s']} s")


if __name__ == "__main__":
    main()
