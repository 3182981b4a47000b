"""Benchmark of the pruning core: scoring + selection for M=256 visual tokens.

Measures, per pruner, keep ratio and batch size, the host-side cost of what the engine calls
once per frame: ``attention_rows`` on captured post-RoPE q/k plus ``semantic_scores`` (only
the rows the pruner needs: all T rows for vlapruner, the last row for fastv, none for
divprune), vlapruner's per-frame action bookkeeping (7 action rows -> ``action_scores`` ->
``ActionHistory.push``/``estimate``), and ``select_batch``. Shapes follow OpenVLA-7B's
``bench`` preset: T=290 prompt (BOS + 256 visual + 33 text), Hq=Hkv=8 heads of D=64, and
projector-output embeddings of E=512 (the bench preset's hidden size) and E=4096 (OpenVLA-7B).
Selection is timed per E; scoring does not depend on E and is timed once.

Run: ``vla-pruner bench pruning`` (writes benchmarks/results/pruning.json). CPU,
one torch thread by default. The dominant CPU cost at E=4096 is the C x C cosine Gram (C =
the diversity candidates); on a GPU that matmul is cheap and the greedy loop's per-step
kernel launches are expected to dominate instead (not measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_vla_pruner.pruning import (
    ActionHistory,
    PruneInputs,
    action_scores,
    attention_rows,
    budget_for,
    select_batch,
    semantic_scores,
)

T, M, VISUAL_START, HQ, HKV, D, A = 290, 256, 1, 8, 8, 64, 7
METHODS = ("vlapruner", "fastv", "divprune")
KEEPS = (0.5, 0.25, 0.125)
BATCHES = (1, 32)


def timed(fn, budget_s: float = 0.5, max_reps: int = 15) -> tuple[float, float]:
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


def make_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(T, HQ, D, generator=g),
        "k": torch.randn(T + A, HKV, D, generator=g),
        "act_q": torch.randn(A, HQ, D, generator=g),
        "session": f"robot-{seed}",
    }


def semantic_scoring(req: dict, method: str) -> torch.Tensor:
    """Scores the engine would compute at layer K-1 for this method."""
    k = req["k"][:T]
    if method == "fastv":
        rows = attention_rows(req["q"][-1:], k, torch.tensor([T - 1]))
        attn = torch.zeros(T, T)
        attn[-1] = rows[0]
        return attn
    attn = attention_rows(req["q"], k, torch.arange(T))
    semantic_scores(attn, VISUAL_START, M)
    return attn


def action_bookkeeping(req: dict, history: ActionHistory, kept: torch.Tensor) -> None:
    """Per frame: the A action queries over the pruned key set -> S_act -> history."""
    vis_pos = VISUAL_START + kept
    key_pos = torch.cat(
        [torch.arange(VISUAL_START), vis_pos, torch.arange(VISUAL_START + M, T + A)]
    )
    keys = req["k"][key_pos]
    rows = attention_rows(req["act_q"], keys, torch.arange(T, T + A), k_positions=key_pos)
    vki = torch.arange(VISUAL_START, VISUAL_START + kept.numel())
    s_act = action_scores(rows, vki, kept, M)
    history.push(req["session"], s_act)
    history.estimate(req["session"])


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
        "--embed-dims",
        default="512,4096",
        help="comma-separated E values (the bench preset's hidden size 512; OpenVLA-7B 4096)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    embed_dims = [int(x) for x in args.embed_dims.split(",")]
    started = time.perf_counter()
    reqs = [make_request(i) for i in range(max(BATCHES))]
    history = ActionHistory()
    for r in reqs:  # warm history so vlapruner runs its full path
        for _ in range(3):
            history.push(r["session"], torch.rand(M))

    # Scoring does not depend on E or the budget: time it once per (method, batch).
    attn_cache = {m: [semantic_scoring(r, m) for r in reqs] for m in ("vlapruner", "fastv")}
    scoring: dict[tuple[str, int], tuple[float, float]] = {}
    for method in METHODS:
        for bsz in BATCHES:
            scoring[method, bsz] = (
                (0.0, 0.0)
                if method == "divprune"
                else timed(lambda b=reqs[:bsz], m=method: [semantic_scoring(r, m) for r in b])
            )
    results = []
    for e_dim in embed_dims:
        g = torch.Generator().manual_seed(e_dim)
        embs = [torch.randn(M, e_dim, generator=g) for _ in reqs]
        for method in METHODS:
            attn_src = attn_cache["fastv" if method == "fastv" else "vlapruner"]
            for keep in KEEPS:
                budget = budget_for(M, keep)
                for bsz in BATCHES:
                    items = [
                        (
                            PruneInputs(
                                attn=attn_src[i],
                                visual_start=VISUAL_START,
                                num_visual=M,
                                embeddings=embs[i],
                                action_estimate=history.estimate(reqs[i]["session"])
                                if method == "vlapruner"
                                else None,
                                semantic_rows="last" if method == "fastv" else "all",
                            ),
                            method,
                            budget,
                        )
                        for i in range(bsz)
                    ]
                    select_ms = timed(lambda it=items: select_batch(it))
                    history_ms = (0.0, 0.0)
                    if method == "vlapruner":
                        kept = select_batch(items[:1])[0]
                        history_ms = timed(
                            lambda b=reqs[:bsz], k=kept: [
                                action_bookkeeping(r, history, k) for r in b
                            ]
                        )
                    scoring_ms = scoring[method, bsz]
                    total = scoring_ms[0] + select_ms[0] + history_ms[0]
                    total_min = scoring_ms[1] + select_ms[1] + history_ms[1]
                    results.append(
                        {
                            "E": e_dim,
                            "method": method,
                            "keep_ratio": keep,
                            "budget": budget,
                            "batch": bsz,
                            "scoring_ms": round(scoring_ms[0], 3),
                            "selection_ms": round(select_ms[0], 3),
                            "action_history_ms": round(history_ms[0], 3),
                            "total_ms": round(total, 3),
                            "total_per_request_ms": round(total / bsz, 3),
                            "total_min_ms": round(total_min, 3),
                            "total_min_per_request_ms": round(total_min / bsz, 3),
                        }
                    )
                    print(
                        f"  E={e_dim:<5} {method:10s} keep={keep:<5} batch={bsz:<2} "
                        f"total={total:8.2f} ms",
                        flush=True,
                    )

    header = (
        "| E | method | keep | budget | batch | scoring ms | selection ms | action+history ms "
        "| total ms | per request ms | per request ms (min) |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in results:
        lines.append(
            f"| {r['E']} | {r['method']} | {r['keep_ratio']} | {r['budget']} | {r['batch']} "
            f"| {r['scoring_ms']:.2f} | {r['selection_ms']:.2f} | {r['action_history_ms']:.2f} "
            f"| {r['total_ms']:.2f} | {r['total_per_request_ms']:.2f} "
            f"| {r['total_min_per_request_ms']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "shapes": {
            "T": T,
            "M": M,
            "Hq": HQ,
            "Hkv": HKV,
            "D": D,
            "E": embed_dims,
            "action_queries": A,
        },
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
