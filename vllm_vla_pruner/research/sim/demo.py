"""``vla-pruner demo``: the README's main job, one short run that shows quality and speed.

1. The embedded OFT-style Meta-World policy (fixed + wrist camera, proprio, 8-step action
   chunks of which the robot executes the first ``--execute-steps``) in closed loop through
   the vLLM engine, unpruned vs VLA-Pruner at ``--keep``, on the same held-out goals
   (``chunk_benchmark``): success of both and engine time per control step of both.
2. In the same run, a short bench at OpenVLA-OFT-7B's token layout (the ``bench-oft``
   preset: 2 x 256 visual tokens, 32 layers, chunk 8 x 7, random weights, built once into
   the temp dir): one chunk at batch 1, unpruned vs VLA-Pruner at the same keep
   (``engine_bench.run_oft``), beside its FLOPs-ideal speedup. The embedded policy is small
   (64 visual tokens per view, 8 layers of width 128): pruning saves it ~1.2-1.3x per control
   step on a CPU; the bench shows what it does where the visual tokens dominate the compute.

One short summary is printed; tables, plots and the kept-patch overlay (both cameras) go to
``--out`` (``runs/demo``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from .benchmark import DEFAULT_MODEL as AR_MODEL
from .chunk_benchmark import DEFAULT_EXECUTE_STEPS, OFT_MODEL, evaluate_policies

BENCH_PRESET = "bench-oft"
DEMO_TASKS_DEFAULT = None  # all seven tasks
DEMO_EPISODES = 2  # per task: 14 episodes per policy, under 5 minutes on 2 cores in all


def bench_checkpoint() -> Path:
    """The ``bench-oft`` checkpoint, built once into the temp dir (13 s, 420 MB)."""
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    path = Path(tempfile.gettempdir()) / "vla-pruner-bench-oft-ckpt"
    complete = (path / "config.json").is_file() and any(path.glob("action_head--*.pt"))
    if not complete or not (path / "model.safetensors").is_file():
        build_checkpoint(BENCH_PRESET, path, seed=0)
    return path


def run_bench(out: Path, keep: float, repeats: int) -> dict[str, Any]:
    """Whole-chunk time at batch 1, unpruned vs VLA-Pruner at ``keep`` (medians of
    ``repeats`` interleaved runs after VLA-Pruner's warm-up)."""
    from vllm_vla_pruner.research.bench.engine_bench import run_oft

    res = run_oft(
        bench_checkpoint(),
        out,
        batch_sizes=(1,),
        keep_ratios=(keep,),
        methods=("vlapruner",),
        repeats=repeats,
        ar_model=None,
        progress=False,
        print_table=False,
    )
    rows = {r["method"]: r for r in res["results"]}
    return {"base": rows["none"], "pruned": rows["vlapruner"], "result": res}


def summary(
    res: dict[str, Any], bench: dict[str, Any] | None, keep: float, wall: float, out: Path
) -> str:
    """The demo's few lines: success, engine time per control step, the bench speedup."""
    base, pruned = res["summary"][0], res["summary"][1]
    n = len(res["tasks"]) * res["episodes_per_task"]
    won = [
        sum(t["success"] * t["episodes"] for t in s["per_task"].values()) for s in (base, pruned)
    ]
    kind = base["kind"]
    what = (
        f"OFT policy (fixed + wrist camera, proprio, chunk of 8, first {res['execute_steps']} "
        "executed)"
        if kind == "oft"
        else "AR policy (one camera, one action per request)"
    )
    rel = pruned["relative_success"]
    lo, hi = pruned["relative_ci95"]
    ms0, ms1 = base["engine_ms_per_control_step"], pruned["engine_ms_per_control_step"]
    k = pruned["visual_tokens_kept_mean"]
    kept = "" if k is None else f"; {k:.0f} of {pruned['visual_tokens_total']} visual tokens kept"
    lines = [
        "",
        f"Meta-World closed loop through vLLM: {base['policy']}, {what}; "
        f"{len(res['tasks'])} tasks x {res['episodes_per_task']} held-out episodes.",
        f"  success                     unpruned {base['success']:.0%} ({won[0]:.0f}/{n})   "
        f"VLA-Pruner @ keep {keep}: {pruned['success']:.0%} ({won[1]:.0f}/{n}), "
        + ("-" if rel is None else f"{rel:.0%} of unpruned (paired 95% CI {lo:.0%}-{hi:.0%})"),
        f"  engine time / control step  unpruned {ms0:.2f} ms   VLA-Pruner {ms1:.2f} ms "
        f"({ms0 / ms1:.2f}x, same run{kept}"
        + ("; a model this small is overhead-bound)" if ms0 / ms1 < 1.2 else ")"),
    ]
    if bench is not None:
        b, p = bench["base"], bench["pruned"]
        r = bench["result"]
        lines += [
            f"OFT-7B token layout ({BENCH_PRESET}: {r['views']} x "
            f"{r['visual_tokens'] // r['views']} visual tokens, 32 layers, chunk {r['chunk']} x "
            f"{r['action_dim']}), one chunk at batch 1:",
            f"  unpruned {b['chunk_ms']:.0f} ms -> VLA-Pruner @ keep {keep} "
            f"{p['chunk_ms']:.0f} ms: {p['chunk_speedup']:.2f}x speedup "
            f"(FLOPs-ideal {p['flops_ideal_speedup']:.2f}x)",
        ]
    lines.append(
        f"({wall:.0f} s) table, plots, kept patches: {out}/"
        + (" - the bench table in bench-oft/engine-oft.md" if bench is not None else "")
    )
    return "\n".join(lines)


def demo(argv: list[str] | None = None) -> int:
    """The README's main job (see the module docstring)."""
    p = argparse.ArgumentParser(prog="vla-pruner demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--policy",
        choices=["oft", "ar"],
        default="oft",
        help="oft: the embedded OFT-style policy (default); ar: the first, autoregressive one",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the policy's)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--episodes", type=int, default=DEMO_EPISODES, help="held-out per task")
    p.add_argument("--tasks", nargs="+", default=DEMO_TASKS_DEFAULT)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument(
        "--execute-steps", type=int, default=DEFAULT_EXECUTE_STEPS, help="OFT: rows per chunk"
    )
    p.add_argument("--max-steps", type=int, default=None, help="episode cap (default 200)")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--no-bench", action="store_true", help="skip the OFT-7B layout bench")
    a = p.parse_args(argv)
    model = a.model or (OFT_MODEL if a.policy == "oft" else AR_MODEL)
    if not (model / "config.json").is_file():
        p.error(f"no checkpoint at {model} (pass --model DIR)")
    t0 = time.perf_counter()
    res = evaluate_policies(
        [model],
        a.out,
        ["vlapruner"],
        [a.keep],
        a.tasks,
        a.episodes,
        execute_steps=a.execute_steps,
        max_steps=a.max_steps,
        print_table=False,
    )
    bench = None
    if not a.no_bench:
        print(
            f"timing one chunk at OpenVLA-OFT-7B's token layout ({BENCH_PRESET}), unpruned vs "
            f"VLA-Pruner @ keep {a.keep}, {a.bench_repeats} interleaved repeats ...",
            flush=True,
        )
        bench = run_bench(a.out / "bench-oft", a.keep, a.bench_repeats)
    print(summary(res, bench, a.keep, time.perf_counter() - t0, a.out))
    return 0
