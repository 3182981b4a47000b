"""``vla-pruner bench engine --model <pi0 checkpoint>``: whole-chunk time pruned vs unpruned.

For each batch size, pruner and keep ratio: the wall time of one chunk request per robot
(SigLIP towers, the prefix prefill through paged attention, the expert's Euler steps, all in
one engine step), median of interleaved repetitions against ``none`` measured in the same run;
beside it the FLOPs-ideal speedup of the whole chunk (``metrics.flow_chunk_flops``: towers,
bidirectional prefix, denoising over the smaller prefix), the worker's time split between
the towers, the prefix pass and the denoising loop (wall, and the worker thread's CPU time,
which other processes' load on a shared machine does not inflate), the scoring + selection
share, and the KV blocks the engine allocated per request. Every configuration and repetition
sends its own images: vLLM caches tower outputs by image hash, so a configuration that
re-sent another's images would skip the towers the other paid for. Prompts fill pi0's 48
language slots (a long instruction, truncated as openpi does), so the prefix has pi0's row
count. Writes engine-pi0.md/json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_vla_pruner.config import load_config_json, num_visual_tokens
from vllm_vla_pruner.metrics import ModelDims, flow_chunk_flops, vit_flops
from vllm_vla_pruner.pi0_spec import spec_from_config
from vllm_vla_pruner.research.bench.engine_bench import (
    _loadavg,
    kv_summary,
    kv_table_lines,
    random_images,
    share_of_ideal,
)

#: Long enough to fill pi0's 48 language slots with the bench tokenizer.
INSTRUCTION = (
    "pick up the red block from the table and put it in the top drawer of the wooden "
    "cabinet next to the blue bowl then close the drawer and move the gripper back to the "
    "middle of the table above the plate"
)
#: Issue 17's target: the pruned chunk at keep 0.25 realises >= 90% of the FLOPs-ideal gain
#: ((speedup - 1) / (ideal - 1), ``share_of_ideal``; the plain speedup / ideal is beside it).
PI0_TARGET_SHARE = 0.9
#: The parts of a chunk the worker times, and its counters for each
#: (``Pi0ForActionPrediction._add_times``).
CHUNK_PARTS = ("vision", "prefix", "denoise")
PARTS = tuple(f"{p}_{u}" for p in CHUNK_PARTS for u in ("s", "cpu_s"))


def pi0_flops(cfg: dict[str, Any], rows: int, kept_rows: int, steps: int, images: int) -> dict:
    """The one FLOPs model (``metrics``) on a pi0 config: towers, prefix, denoising."""
    pi0 = cfg["pi0"]
    lm = ModelDims.from_config(cfg)
    ex = pi0["expert"]
    expert = ModelDims(
        ex["width"], ex["mlp_dim"], ex["num_heads"], ex["num_kv_heads"], ex["depth"], ex["head_dim"]
    )
    t = cfg["vision_towers"][0]
    n = num_visual_tokens(cfg)
    width = cfg["text_config"]["hidden_size"]
    vision = images * (
        vit_flops(t["width"], t["mlp_hidden"], t["depth"], n) + 2 * t["width"] * width * n
    )
    we, a, h = ex["width"], pi0["action_dim"], pi0["action_horizon"]
    spec = spec_from_config(cfg)
    if spec.pi05:  # action in/out per row; the time MLP and the norms' dense once per step
        heads = 2 * h * (a * we + we * a) + 2 * (2 * we * we + (2 * ex["depth"] + 1) * 3 * we * we)
    else:
        heads = 2 * h * (a * we + 2 * we * we + we * we + we * a) + 2 * a * we
    suffix = spec.suffix_len
    return flow_chunk_flops(lm, expert, rows, kept_rows, lm_k(cfg), suffix, steps, vision, heads)


def lm_k(cfg: dict[str, Any]) -> int:
    from vllm_vla_pruner.engine.settings import PruningSettings

    return PruningSettings.resolve(cfg.get("vla_pruner")).layer


def run_pi0(
    model_dir: str | Path,
    out_dir: str | Path = "benchmarks/results/engine-pi0",
    batch_sizes: tuple[int, ...] = (1, 8),
    keep_ratios: tuple[float, ...] = (0.5, 0.25, 0.125),
    methods: tuple[str, ...] = ("vlapruner", "fastv"),
    repeats: int = 3,
    progress: bool = True,
    print_table: bool = True,
) -> dict[str, Any]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_vla_pruner.engine.local import decoder_report, kv_layout, make_llm, shutdown_llm
    from vllm_vla_pruner.engine.plan import KEY_STATE, ActionChunk, PruningResult
    from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED, PruningSettings
    from vllm_vla_pruner.pi0_spec import pi0_normalizer, pi0_prompt_token_ids, pi0_spec

    load_before = _loadavg()  # before the engine starts (the old code read it at the end)
    cfg = load_config_json(model_dir)
    spec = pi0_spec(model_dir)
    m = num_visual_tokens(cfg) * spec.num_cameras
    side = cfg["image_sizes"][0]
    state = [0.0] * spec.state_dim
    # pi0.5 carries the state in the prompt (its bins); pi0 in the request.
    bins = pi0_normalizer(model_dir).state_bins(state) if spec.pi05 else None
    ids = pi0_prompt_token_ids(
        AutoTokenizer.from_pretrained(str(model_dir)), INSTRUCTION, spec.max_token_len, bins
    )
    rows_total = len(ids) + m
    settings = PruningSettings.resolve(cfg.get("vla_pruner"))
    layer_k, window = settings.layer, settings.window
    llm = make_llm(model_dir, max_num_seqs=max(batch_sizes), use_tqdm_on_load=progress)
    layout = kv_layout(llm)
    configs = [("none", 1.0)] + [(meth, r) for meth in methods for r in keep_ratios if r < 1.0]
    session_seq = iter(range(10**9))

    def step(batch: int, method: str, ratio: float, sessions: list[str], seed: int):
        tag = configs.index((method, ratio))  # images of their own (see the module doc)
        params = []
        for i, s in enumerate(sessions):
            xa: dict[str, Any] = {KEY_STATE: state, "vla_session_id": s, KEY_NOISE_SEED: seed + i}
            if method != "none":
                xa.update(vla_pruner=method, vla_keep_ratio=ratio)
            params.append(SamplingParams(max_tokens=1, temperature=0.0, extra_args=xa))
        prompts = [
            {
                "prompt_token_ids": ids,
                "multi_modal_data": {
                    "image": random_images(spec.num_cameras, side, (seed * 100 + tag) * 1000 + b)
                },
            }
            for b in range(batch)
        ]
        before = decoder_report(llm)["stats"]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = decoder_report(llm)["stats"]
        chunks = [ActionChunk.from_public(o.kv_transfer_params) for o in outs]
        if any(c is None or c.error for c in chunks):
            raise RuntimeError(f"{method} {ratio}: a request returned no chunk: {chunks}")
        res = [PruningResult.from_public(o.kv_transfer_params) for o in outs]
        kept = [r.outcome.visual_tokens_kept if r and r.outcome.pruned else m for r in res]
        history = [bool(r and r.outcome.used_history) for r in res]

        def delta(key: str) -> float:
            return float(after["extra"].get(key, 0.0) - before["extra"].get(key, 0.0))

        select = after["select_seconds"] - before["select_seconds"]
        parts = {k: delta(f"pi0_{k}") for k in PARTS}
        return wall, select, parts, kept, history

    results: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(batch_sizes) * len(configs) * (repeats + 1),
        desc="bench engine pi0",
        disable=not progress,
    )
    for batch in batch_sizes:
        sessions = {c: [f"pi0-{next(session_seq)}" for _ in range(batch)] for c in configs}
        for c in configs:  # VLA-Pruner: the sessions' warm-up window, then one pruned frame
            for frame in range(window + 1 if c[0] == "vlapruner" else 1):
                step(batch, *c, sessions[c], seed=frame)
            bar.update(1)
        keys = ("wall", "select", "kept", "history", "cpu", *PARTS)
        samples = {c: {k: [] for k in keys} for c in configs}
        for rep in range(repeats):
            for c in configs:  # interleaved: drift hits every configuration alike
                wall, sel, parts, kept, hist = step(batch, *c, sessions[c], seed=100 + rep)
                s = samples[c]
                s["wall"].append(wall)
                s["select"].append(sel / wall)
                for k, v in parts.items():
                    s[k].append(v)
                s["cpu"].append(sum(parts[f"{k}_cpu_s"] for k in CHUNK_PARTS))
                s["kept"] += kept
                s["history"] += hist
                bar.update(1)
        base = statistics.median(samples[("none", 1.0)]["wall"])
        base_den = statistics.median(samples[("none", 1.0)]["denoise_s"])
        base_cpu = statistics.median(samples[("none", 1.0)]["cpu"])
        full = pi0_flops(cfg, rows_total, rows_total, spec.num_steps, spec.num_cameras)
        for c in configs:
            method, ratio = c
            s = samples[c]
            wall = statistics.median(s["wall"])
            kept = round(statistics.median(s["kept"]))
            flops = pi0_flops(
                cfg, rows_total, rows_total - (m - kept), spec.num_steps, spec.num_cameras
            )
            ideal = full["total"] / flops["total"]
            speed = base / wall
            den = statistics.median(s["denoise_s"])
            cpu = statistics.median(s["cpu"])
            results.append(
                {
                    "batch": batch,
                    "method": method,
                    "keep_ratio": ratio,
                    "visual_tokens_kept": kept,
                    "used_history": sum(s["history"]) / len(s["history"]),
                    "chunk_ms": 1000 * wall,
                    "vision_ms": 1000 * statistics.median(s["vision_s"]),
                    "prefix_ms": 1000 * statistics.median(s["prefix_s"]),
                    "denoise_ms": 1000 * den,
                    "cpu_ms": {k: 1000 * statistics.median(s[f"{k}_cpu_s"]) for k in CHUNK_PARTS}
                    | {"chunk": 1000 * cpu},
                    "chunks_per_s": batch / wall,
                    "chunk_speedup": speed,
                    "cpu_speedup": base_cpu / cpu if cpu else None,
                    "denoise_speedup": base_den / den if den else None,
                    "flops_ideal_speedup": ideal,
                    "flops_ideal_denoise_speedup": full["denoise"] / flops["denoise"],
                    "share_of_ideal": share_of_ideal(speed, ideal),
                    "ratio_to_ideal": speed / ideal,
                    "cpu_share_of_ideal": share_of_ideal(base_cpu / cpu, ideal) if cpu else None,
                    "select_share": statistics.median(s["select"]),
                    "gflops": {k: v / 1e9 for k, v in flops.items()},
                }
            )
    bar.close()
    kv = kv_summary(decoder_report(llm)["kv_blocks"], layout)
    shutdown_llm(llm)
    out: dict[str, Any] = {
        "model": str(model_dir),
        "cameras": spec.num_cameras,
        "visual_tokens": m,
        "prompt_rows": rows_total,
        "horizon": spec.horizon,
        "action_dim": spec.action_dim,
        "num_steps": spec.num_steps,
        "layer_k": layer_k,
        "window": window,
        "repeats": repeats,
        "load_before": load_before,
        "results": results,
        "kv": kv,
    }
    out["load_after"] = _loadavg()
    out["targets"] = pi0_targets(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine-pi0.json").write_text(json.dumps(out, indent=2))
    table = markdown_pi0(out)
    (out_dir / "engine-pi0.md").write_text(table)
    if print_table:
        print(table)
    return out


def pi0_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 17's target per pruner at keep 0.25, read two ways: ``met`` on the share of the
    ideal gain ((s-1)/(i-1), the stricter reading this project holds itself to) and
    ``met_as_ratio`` on the issue's words (speedup >= 90% of the ideal speedup). Either is
    met only when both wall and worker CPU reach it: on a shared machine another process's
    burst can stretch one configuration's wall median (it did: an unpruned chunk of 0.9 s
    CPU took 3.3 s wall), and the wall alone would then report a gain the model did not make."""

    def ok(x: float | None) -> bool:
        return x is not None and x >= PI0_TARGET_SHARE

    return [
        {
            "target": f"batch {r['batch']} {r['method']} keep 0.25: whole chunk >= 90% of "
            "FLOPs-ideal speedup",
            "value": r["share_of_ideal"],
            "ratio": r["ratio_to_ideal"],
            "cpu_value": r["cpu_share_of_ideal"],
            "met": ok(r["share_of_ideal"]) and ok(r["cpu_share_of_ideal"]),
            # The issue's own words: the speedup is >= 90% of the ideal speedup.
            "met_as_ratio": ok(r["ratio_to_ideal"])
            and ok(r["cpu_speedup"] / r["flops_ideal_speedup"] if r["cpu_speedup"] else None),
        }
        for r in results
        if r["method"] != "none" and r["keep_ratio"] == 0.25
    ]


def markdown_pi0(out: dict[str, Any]) -> str:
    lines = [
        f"pi0 engine benchmark: {out['model']} — {out['cameras']} cameras, "
        f"{out['visual_tokens']} visual tokens, {out['prompt_rows']} prefix rows, horizon "
        f"{out['horizon']} x {out['action_dim']}, {out['num_steps']} Euler steps, "
        f"K={out['layer_k']}, median of {out['repeats']} interleaved runs; load average before "
        f"{out['load_before']}, after {out['load_after']} (2 shared cores).",
        "",
        "Share of ideal = (speedup - 1) / (FLOPs-ideal - 1) (the target's definition); "
        "speedup / ideal is the plain ratio. CPU columns: the worker thread's CPU time for "
        "towers + prefix + denoising, which other processes' load does not inflate.",
        "",
        "| batch | method | keep | kept | chunk ms | vision ms | prefix ms | denoise ms "
        "| chunks/s | chunk speedup | FLOPs-ideal | share of ideal | speedup / ideal "
        "| denoise speedup | denoise ideal | select share | CPU ms | CPU speedup "
        "| CPU share of ideal |",
        "|" + "---|" * 19,
    ]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    for r in out["results"]:
        den = "-" if r["denoise_speedup"] is None else f"{r['denoise_speedup']:.2f}x"
        cpu = "-" if r["cpu_speedup"] is None else f"{r['cpu_speedup']:.2f}x"
        lines.append(
            f"| {r['batch']} | {r['method']} | {r['keep_ratio']} | {r['visual_tokens_kept']} "
            f"| {r['chunk_ms']:.1f} | {r['vision_ms']:.1f} | {r['prefix_ms']:.1f} "
            f"| {r['denoise_ms']:.1f} | {r['chunks_per_s']:.2f} | {r['chunk_speedup']:.2f}x "
            f"| {r['flops_ideal_speedup']:.2f}x | {pct(r['share_of_ideal'])} "
            f"| {pct(r['ratio_to_ideal'])} | {den} | {r['flops_ideal_denoise_speedup']:.2f}x "
            f"| {100 * r['select_share']:.2f}% | {r['cpu_ms']['chunk']:.1f} | {cpu} "
            f"| {pct(r['cpu_share_of_ideal'])} |"
        )
    lines += [
        "",
        "| target | share of ideal | speedup / ideal | CPU share of ideal | gain reading "
        "| speedup / ideal reading |",
        "|---|---|---|---|---|---|",
    ]
    for t in out["targets"]:
        v = "-" if t["value"] is None else f"{100 * t['value']:.1f}%"
        lines.append(
            f"| {t['target']} | {v} | {pct(t['ratio'])} | {pct(t['cpu_value'])} "
            f"| {'met' if t['met'] else 'missed'} | {'met' if t['met_as_ratio'] else 'missed'} |"
        )
    return "\n".join(lines + part_lines(out["results"]) + kv_table_lines(out["kv"])) + "\n"


def part_lines(results: list[dict[str, Any]]) -> list[str]:
    """Where each pruned chunk at keep 0.25 falls short of its FLOPs, part by part, in worker
    CPU time: each part's ideal is the unpruned run's time for it divided by that part's own
    FLOPs ratio. Their sum is the chunk a pruner that lost nothing would take; it sits above
    the FLOPs-ideal whenever the parts pruning does not shrink (the towers, the expert's
    GEMMs) run at fewer GFLOP/s than the prefix it does shrink."""
    lines = [
        "",
        "Per part at keep 0.25, worker CPU ms: measured / ideal (the unpruned part's time over "
        "the part's FLOPs ratio). Per-part ideal = unpruned CPU / the sum of the part ideals.",
        "",
        "| batch | method | vision | prefix | denoise | chunk | per-part ideal | CPU speedup "
        "| share of per-part ideal |",
        "|" + "---|" * 9,
    ]
    base = {r["batch"]: r for r in results if r["method"] == "none"}
    for r in results:
        b = base.get(r["batch"])
        if r["method"] == "none" or r["keep_ratio"] != 0.25 or b is None or not r["cpu_speedup"]:
            continue
        cells, ideal_sum = [], 0.0
        for part in CHUNK_PARTS:
            ideal = b["cpu_ms"][part] * r["gflops"][part] / b["gflops"][part]
            ideal_sum += ideal
            cells.append(f"{r['cpu_ms'][part]:.1f} / {ideal:.1f}")
        part_ideal = b["cpu_ms"]["chunk"] / ideal_sum
        cpu = r["cpu_speedup"]
        lines.append(
            f"| {r['batch']} | {r['method']} | {' | '.join(cells)} "
            f"| {r['cpu_ms']['chunk']:.1f} / {ideal_sum:.1f} | {part_ideal:.2f}x "
            f"| {cpu:.2f}x | {100 * cpu / part_ideal:.0f}% |"
        )
    return lines
