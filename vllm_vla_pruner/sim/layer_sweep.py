"""Choose the pruning layer K and the action-attention layer on validation goals.

The paper prunes after layer K=3 of 32 and reads action attention at the middle layer; a
policy with a handful of layers has no such obvious choice. This sweep runs one pruner at one
keep ratio through the real engine for every ``(K, action layer)`` pair, on validation goals
(never the held-out ones the report uses), and compares each with the unpruned policy on the
same goals. Unpruned runs every layer over every token whatever K is, so it runs once.

K runs up to L/2 by default: at least half the layers then run on the kept tokens, the regime
the method is for (the paper prunes 29 of 32 layers); a K near L would "win" by pruning
almost nothing.

``vla-pruner bench metaworld-layers`` writes ``layers.json``, ``layers.md`` and a heatmap
``layers.png`` of success relative to unpruned.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .benchmark import DEFAULT_MODEL, MAX_PARALLEL, EnginePolicy, RunRecord, run_closed_loop


def _run(
    model_dir: Path,
    method: str,
    keep: float,
    tasks: list[str],
    episodes: int,
    layer: int,
    action_layer: int | None,
    goals: str,
    image_size: int,
    max_steps: int | None,
) -> RunRecord:
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    llm = make_llm(
        model_dir,
        max_num_seqs=max(16, min(MAX_PARALLEL, len(tasks) * episodes)),
        pruning={"layer": layer, "action_layer": action_layer},
    )
    try:
        policy = EnginePolicy(llm, model_dir, method, keep, tag=f"K{layer}A{action_layer}")
        return run_closed_loop(
            policy,
            tasks,
            episodes,
            keep_frames=False,
            max_steps=max_steps,
            image_size=image_size,
            goals=goals,
        )
    finally:
        shutdown_llm(llm)


def sweep(
    model_dir: Path,
    out: Path,
    layers: Sequence[int],
    action_layers: Sequence[int],
    method: str = "vlapruner",
    keep: float = 0.25,
    tasks: Sequence[str] | None = None,
    episodes: int = 10,
    goals: str = "validation",
    max_steps: int | None = None,
) -> dict[str, Any]:
    from vllm_vla_pruner.config import image_size, load_config_json

    from .evaluate import paired_ratio_ci
    from .metaworld_env import DEFAULT_TASKS

    out.mkdir(parents=True, exist_ok=True)
    tasks = list(tasks or DEFAULT_TASKS)
    cfg = load_config_json(model_dir)
    size = image_size(cfg)
    num_layers = cfg["text_config"]["num_hidden_layers"]
    run = dict(tasks=tasks, episodes=episodes, goals=goals, image_size=size, max_steps=max_steps)
    base = _run(model_dir, "none", 1.0, layer=layers[0], action_layer=None, **run).result
    base_eps = [r.per_episode for r in base.tasks.values()]
    print(f"unpruned: {base.mean_success:.0%}", flush=True)
    result = {
        "model": str(model_dir),
        "num_layers": num_layers,
        "method": method,
        "keep_ratio": keep,
        "goals": goals,
        "tasks": tasks,
        "episodes_per_task": episodes,
        "unpruned_success": base.mean_success,
        "unpruned_per_task": {t: r.success_rate for t, r in base.tasks.items()},
        "cells": [],
    }
    cells = result["cells"]
    for k in layers:
        for a in action_layers:
            res = _run(model_dir, method, keep, layer=k, action_layer=a, **run).result
            eps = [r.per_episode for r in res.tasks.values()]
            flat_b, flat_o = sum(base_eps, []), sum(eps, [])
            cells.append(
                {
                    "layer_k": k,
                    "action_layer": a,
                    "success": res.mean_success,
                    "relative_success": res.mean_success / base.mean_success
                    if base.mean_success
                    else None,
                    "relative_ci95": list(paired_ratio_ci(base_eps, eps)),
                    "lost": sum(b and not o for b, o in zip(flat_b, flat_o)),
                    "gained": sum(o and not b for b, o in zip(flat_b, flat_o)),
                    "per_task": {t: r.success_rate for t, r in res.tasks.items()},
                    "engine_ms_per_step": 1000 * res.policy_seconds_per_step,
                }
            )
            print(f"K={k} action layer={a}: {res.mean_success:.0%}", flush=True)
            (out / "layers.json").write_text(json.dumps(result, indent=2))  # progress so far
    best = max(cells, key=lambda c: (c["success"], -c["lost"]))
    result["best"] = {"layer_k": best["layer_k"], "action_layer": best["action_layer"]}
    result["plot"] = str(plot_heatmap(result, out))
    (out / "layers.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "layers.md").write_text(table)
    print(table)
    return result


def plot_heatmap(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ks = sorted({c["layer_k"] for c in result["cells"]})
    acts = sorted({c["action_layer"] for c in result["cells"]})
    grid = np.full((len(ks), len(acts)), np.nan)
    for c in result["cells"]:
        grid[ks.index(c["layer_k"]), acts.index(c["action_layer"])] = c["relative_success"] or 0
    fig, ax = plt.subplots(figsize=(1.2 * len(acts) + 2, 1.0 * len(ks) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.1)
    for i in range(len(ks)):
        for j in range(len(acts)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", color="w")
    ax.set_xticks(range(len(acts)), [str(a) for a in acts])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("action-attention layer")
    ax.set_ylabel("pruning layer K")
    ax.set_title(
        f"{result['method']} @ keep {result['keep_ratio']}: success / unpruned\n"
        f"({result['goals']} goals, {result['episodes_per_task']} eps x "
        f"{len(result['tasks'])} tasks)",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path = out / "layers.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    lines = [
        f"{result['method']} @ keep {result['keep_ratio']} on {len(tasks)} tasks x "
        f"{result['episodes_per_task']} {result['goals']} episodes, {result['num_layers']}-layer "
        f"model; unpruned: {result['unpruned_success']:.0%}. Best: K="
        f"{result['best']['layer_k']}, action layer {result['best']['action_layer']}.",
        "",
        "| K | action layer | success | rel. to unpruned (paired 95% CI) | lost / gained | "
        + " | ".join(t.replace("-v3", "") for t in tasks)
        + " | engine ms/step |",
        "|" + "---|" * (len(tasks) + 6),
    ]
    for c in result["cells"]:
        lo, hi = c["relative_ci95"]
        rel = "-" if c["relative_success"] is None else f"{c['relative_success']:.0%}"
        per = " | ".join(f"{c['per_task'][t]:.0%}" for t in tasks)
        lines.append(
            f"| {c['layer_k']} | {c['action_layer']} | {c['success']:.0%} | {rel} "
            f"({lo:.0%}-{hi:.0%}) | {c['lost']} / {c['gained']} | {per} "
            f"| {c['engine_ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla-pruner bench metaworld-layers", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metaworld-layers"))
    p.add_argument("--layers", type=int, nargs="+", default=None, help="K (default: 1..L/2)")
    p.add_argument(
        "--action-layers", type=int, nargs="+", default=None, help="default: every layer"
    )
    p.add_argument("--method", default="vlapruner")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--episodes", type=int, default=10, help="validation episodes per task")
    p.add_argument("--goals", choices=["validation", "heldout"], default="validation")
    a = p.parse_args(argv)
    from vllm_vla_pruner.config import load_config_json

    n = load_config_json(a.model)["text_config"]["num_hidden_layers"]
    sweep(
        a.model,
        a.out,
        a.layers or list(range(1, n // 2 + 1)),
        a.action_layers or list(range(n)),
        a.method,
        a.keep,
        a.tasks,
        a.episodes,
        a.goals,
    )
    return 0
