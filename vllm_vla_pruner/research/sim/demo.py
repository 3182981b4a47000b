"""``vla-pruner demo``: the README's main job, one short run that shows quality and speed.

1. The embedded OFT-style Meta-World policy (fixed + wrist camera, proprio, 8-step action
   chunks of which the robot executes the first ``--execute-steps``) in closed loop through
   the vLLM engine, unpruned vs VLA-Pruner at ``--keep``, on the same held-out goals
   (``chunk_benchmark``): success of both and engine time per control step of both.
   ``--policy pi0``: the embedded pi0-style policy (the same cameras and proprio as pi0's
   state, an 8-step chunk by flow matching); ``--policy ar``: the autoregressive one.
2. In the same run, a short bench at the full-size model's token layout (random weights,
   built once into the temp dir): one chunk at batch 1, unpruned vs VLA-Pruner at the same
   keep, beside its FLOPs-ideal speedup. OFT and AR: OpenVLA-OFT-7B's layout (``bench-oft``:
   2 x 256 visual tokens, 32 layers, chunk 8 x 7; ``engine_bench.run_oft``); pi0: pi0's
   (``bench-pi0``: 3 x 256 visual tokens, 18 layers, horizon 50, 10 Euler steps;
   ``engine_bench_pi0.run_pi0``). The embedded policies are small (64 visual tokens per
   view, a few layers of width 128): on a CPU they are overhead-bound; the bench shows what
   pruning does where the visual tokens dominate the compute.

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
from .chunk_benchmark import DEFAULT_EXECUTE_STEPS, OFT_MODEL, PI0_MODEL, evaluate_policies

#: Per ``--policy``: the embedded checkpoint and the bench preset at its full-size layout.
POLICIES: dict[str, tuple[Path, str]] = {
    "oft": (OFT_MODEL, "bench-oft"),
    "pi0": (PI0_MODEL, "bench-pi0"),
    "ar": (AR_MODEL, "bench-oft"),
}
DEMO_TASKS_DEFAULT = None  # all seven tasks
DEMO_EPISODES = 2  # per task: 14 episodes per policy, under 5 minutes on 2 cores in all


def bench_checkpoint(preset: str) -> Path:
    """The preset's checkpoint, built once into the temp dir (bench-oft: 13 s, 420 MB;
    bench-pi0: 3 s). A marker written last tells a finished build from an interrupted one."""
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    path = Path(tempfile.gettempdir()) / f"vla-pruner-{preset}-ckpt"
    done = path / ".built"
    if not done.is_file():
        build_checkpoint(preset, path, seed=0)
        done.write_text(preset)
    return path


def run_bench(preset: str, out: Path, keep: float, repeats: int) -> dict[str, Any]:
    """Whole-chunk time at batch 1 on ``preset``, unpruned vs VLA-Pruner at ``keep``
    (medians of ``repeats`` interleaved runs after VLA-Pruner's warm-up); the checkpoint's
    kind picks the bench (pi0 or OFT)."""
    from vllm_vla_pruner.config import load_config_json
    from vllm_vla_pruner.pi0_spec import is_pi0_checkpoint

    common = dict(
        batch_sizes=(1,),
        keep_ratios=(keep,),
        methods=("vlapruner",),
        repeats=repeats,
        progress=False,
        print_table=False,
    )
    model = bench_checkpoint(preset)
    layers = load_config_json(model)["text_config"]["num_hidden_layers"]
    if is_pi0_checkpoint(model):
        from vllm_vla_pruner.research.bench.engine_bench_pi0 import run_pi0

        res = run_pi0(model, out, **common)
        layout = (
            f"pi0's token layout ({preset}: {res['cameras']} x "
            f"{res['visual_tokens'] // res['cameras']} visual tokens, {layers} layers, horizon "
            f"{res['horizon']}, {res['num_steps']} Euler steps)"
        )
    else:
        from vllm_vla_pruner.research.bench.engine_bench import run_oft

        res = run_oft(model, out, ar_model=None, **common)
        layout = (
            f"OFT-7B token layout ({preset}: {res['views']} x "
            f"{res['visual_tokens'] // res['views']} visual tokens, {layers} layers, chunk "
            f"{res['chunk']} x {res['action_dim']})"
        )
    rows = {r["method"]: r for r in res["results"]}
    return {"base": rows["none"], "pruned": rows["vlapruner"], "layout": layout, "dir": out}


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
    what = {
        "oft": f"OFT policy (fixed + wrist camera, proprio, chunk of 8, first "
        f"{res['execute_steps']} executed)",
        "pi0": f"pi0 policy (fixed + wrist camera, proprio as pi0's state, a flow-matching "
        f"chunk of 8, first {res['execute_steps']} executed)",
        "ar": "AR policy (one camera, one action per request)",
    }[kind]
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
        lines += [
            f"{bench['layout']}, one chunk at batch 1:",
            f"  unpruned {b['chunk_ms']:.0f} ms -> VLA-Pruner @ keep {keep} "
            f"{p['chunk_ms']:.0f} ms: {p['chunk_speedup']:.2f}x speedup "
            f"(FLOPs-ideal {p['flops_ideal_speedup']:.2f}x)",
        ]
    lines.append(
        f"({wall:.0f} s) table, plots, kept patches: {out}/"
        + (f" - the bench table in {bench['dir']}/" if bench is not None else "")
    )
    return "\n".join(lines)


def demo(argv: list[str] | None = None) -> int:
    """The README's main job (see the module docstring)."""
    p = argparse.ArgumentParser(prog="vla-pruner demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="oft",
        help="oft: the embedded OFT-style policy (default); pi0: the flow-matching one; "
        "ar: the first, autoregressive one",
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
    p.add_argument("--no-bench", action="store_true", help="skip the full-size layout bench")
    a = p.parse_args(argv)
    default_model, preset = POLICIES[a.policy]
    model = a.model or default_model
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
            f"timing one chunk at the full-size token layout ({preset}), unpruned vs "
            f"VLA-Pruner @ keep {a.keep}, {a.bench_repeats} interleaved repeats ...",
            flush=True,
        )
        bench = run_bench(preset, a.out / preset, a.keep, a.bench_repeats)
    print(summary(res, bench, a.keep, time.perf_counter() - t0, a.out))
    return 0
