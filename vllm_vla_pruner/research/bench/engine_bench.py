"""``vla-pruner bench engine``: pruned vs unpruned on the real engine, measured side by side.

For each batch size, pruner and keep ratio it times the prefill (one generated token) and the
full action (prefill + decode of every action token) over interleaved repetitions, against
``none`` (unpruned) measured in the same run, and prints beside each speedup the FLOPs-ideal
one, the share of the pruned step spent on scoring + selection, and the KV blocks the engine
actually allocated per request. Writes a markdown table and a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vllm_vla_pruner.config import load_config_json, num_visual_tokens
from vllm_vla_pruner.metrics import ModelDims, prefill_flops

#: The instruction of every timed request (OpenVLA wraps it in its prompt).
INSTRUCTION = "put the red block in the drawer"


def _images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)
    ]


def run(
    model_dir: str | Path,
    out_dir: str | Path = "benchmarks/results",
    batch_sizes: tuple[int, ...] = (1, 8),
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125),
    methods: tuple[str, ...] = ("vlapruner", "fastv"),
    repeats: int = 3,
    action_tokens: int | None = None,
) -> dict[str, Any]:
    from vllm_vla_pruner.api.request_builder import RequestBuilder
    from vllm_vla_pruner.engine.local import decoder_report, kv_layout, make_llm

    cfg = load_config_json(model_dir)
    dims = ModelDims.from_config(cfg)
    m = num_visual_tokens(cfg)
    side = cfg["image_sizes"][0]
    # The request a robot sends to /v1/actions; the prefill is timed as a one-token action.
    builder = RequestBuilder.from_pretrained(model_dir)
    decoder = builder.decoder
    n_act = action_tokens or decoder.action_dim(
        decoder.default_unnorm_key or decoder.unnorm_keys[0]
    )
    ids = builder.prompt_token_ids(INSTRUCTION)
    layer_k = 3
    llm = make_llm(model_dir, max_num_seqs=max(batch_sizes))
    layout = kv_layout(llm)

    configs = [("none", 1.0)] + [(meth, r) for meth in methods for r in keep_ratios if r < 1.0]
    session_seq = iter(range(10**9))

    def timed(
        batch: int, method: str, ratio: float, sessions: list[str], max_tokens: int, seed: int
    ):
        reqs = [
            builder.build(
                INSTRUCTION, im, max_tokens, method=method, keep_ratio=ratio, session_id=s
            )
            for im, s in zip(_images(batch, side, seed), sessions)
        ]
        before = decoder_report(llm)["stats"]["select_seconds"]
        t0 = time.perf_counter()
        llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)
        wall = time.perf_counter() - t0
        select = decoder_report(llm)["stats"]["select_seconds"] - before
        return wall, select

    results: list[dict[str, Any]] = []
    total = len(batch_sizes) * len(configs) * (repeats + 1)
    bar = tqdm(total=total, desc="bench engine")
    for batch in batch_sizes:
        sessions = {c: [f"bench-{next(session_seq)}" for _ in range(batch)] for c in configs}
        # Warm-up: fills each session's action history (VLA-Pruner's first frames run unpruned)
        # and lets the engine settle before anything is timed.
        for c in configs:
            for frame in range(4):
                timed(batch, *c, sessions[c], n_act, seed=frame)
            bar.update(1)
        samples: dict[tuple[str, float], dict[str, list[float]]] = {
            c: {"prefill": [], "action": [], "select": []} for c in configs
        }
        for rep in range(repeats):
            for c in configs:  # interleaved: drift hits every configuration alike
                pre, sel = timed(batch, *c, sessions[c], 1, seed=100 + rep)
                act, sel_a = timed(batch, *c, sessions[c], n_act, seed=200 + rep)
                samples[c]["prefill"].append(pre)
                samples[c]["action"].append(act)
                samples[c]["select"].append(sel_a / act)
                bar.update(1)
        base = {k: statistics.median(v) for k, v in samples[("none", 1.0)].items()}
        prompt_len = len(ids) + m
        for c in configs:
            method, ratio = c
            med = {k: statistics.median(v) for k, v in samples[c].items()}
            kept = m if method == "none" else max(1, round(m * ratio))
            ideal = prefill_flops(dims, prompt_len, prompt_len, layer_k) / prefill_flops(
                dims, prompt_len, prompt_len - (m - kept), layer_k
            )
            speed = base["prefill"] / med["prefill"]
            results.append(
                {
                    "batch": batch,
                    "method": method,
                    "keep_ratio": ratio,
                    "visual_tokens_kept": kept,
                    "prefill_ms": 1000 * med["prefill"],
                    "action_ms": 1000 * med["action"],
                    "actions_per_s": batch / med["action"],
                    "tokens_per_s": batch * (prompt_len + n_act) / med["action"],
                    "prefill_speedup": speed,
                    "action_speedup": base["action"] / med["action"],
                    "flops_ideal_prefill_speedup": ideal,
                    "share_of_ideal": (speed - 1) / (ideal - 1) if ideal > 1.0001 else None,
                    "select_share": med["select"],
                }
            )
    bar.close()
    report = decoder_report(llm)
    kv = kv_summary(report["kv_blocks"], layout)
    out = {
        "model": str(model_dir),
        "visual_tokens": m,
        "prompt_tokens": len(ids) + m,
        "action_tokens": n_act,
        "layer_k": layer_k,
        "repeats": repeats,
        "results": results,
        "kv": kv,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine.json").write_text(json.dumps(out, indent=2))
    table = markdown(out)
    (out_dir / "engine.md").write_text(table)
    print(table)
    return out


def kv_summary(blocks_log: list, layout: list[dict[str, Any]]) -> dict[str, Any]:
    """KV bytes per request from the blocks the engine allocated, and the concurrency they allow."""
    by_total: dict[tuple[int, ...], int] = {}
    for _, blocks in blocks_log:
        by_total[tuple(blocks)] = by_total.get(tuple(blocks), 0) + 1
    rows = []
    pool = layout[0]["num_blocks"] if layout else 0
    for blocks, count in sorted(by_total.items(), key=lambda kv: -sum(kv[0])):
        nbytes = sum(b * g["page_bytes"] * g["layers"] for b, g in zip(blocks, layout))
        rows.append(
            {
                "blocks_per_group": list(blocks),
                "requests": count,
                "kv_bytes": nbytes,
                "max_concurrent_requests": pool // max(1, sum(blocks)),
            }
        )
    return {"groups": layout, "per_request": rows}


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"Engine benchmark: {out['model']} — {out['visual_tokens']} visual tokens, prompt "
        f"{out['prompt_tokens']} tokens, {out['action_tokens']} action tokens, K={out['layer_k']}, "
        f"median of {out['repeats']} interleaved runs.",
        "",
        "| batch | method | keep | kept | prefill ms | action ms | actions/s | tokens/s "
        "| prefill speedup | FLOPs-ideal | share of ideal | action speedup | select share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        share = "-" if r["share_of_ideal"] is None else f"{100 * r['share_of_ideal']:.0f}%"
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['keep_ratio']} | {r['visual_tokens_kept']} "
            f"| {r['prefill_ms']:.1f} | {r['action_ms']:.1f} | {r['actions_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['prefill_speedup']:.2f}x "
            f"| {r['flops_ideal_prefill_speedup']:.2f}x | {share} | {r['action_speedup']:.2f}x "
            f"| {100 * r['select_share']:.2f}% |"
        )
    lines += ["", "KV cache per request (blocks the engine allocated, per KV group):", ""]
    lines += [
        "| blocks per group | requests | KV bytes | max concurrent at this pool |",
        "|---|---|---|---|",
    ]
    for r in out["kv"]["per_request"]:
        lines.append(
            f"| {r['blocks_per_group']} | {r['requests']} | {r['kv_bytes']:,} "
            f"| {r['max_concurrent_requests']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla-pruner bench engine", description=__doc__)
    p.add_argument("--model", help="checkpoint dir (default: build the 'bench' preset)")
    p.add_argument("--out", default="benchmarks/results", help="where engine.md/json go")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--methods", nargs="+", default=["vlapruner", "fastv"])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from vllm_vla_pruner.research.checkpoint import build_checkpoint

        model = Path(args.out) / "bench-ckpt"
        if not (model / "config.json").exists():
            build_checkpoint("bench", model, seed=0)
    run(model, args.out, tuple(args.batch), tuple(args.keep), tuple(args.methods), args.repeats)
    return 0
