"""Choose engine pruning settings (pruning layer K, action-attention layer, ...) on validation
goals.

The paper prunes after layer K=3 of 32 and reads action attention at the middle layer; a
policy with a handful of layers has no such obvious choice. This sweep runs one pruner at one
keep ratio through the real engine for every combination of a grid of engine settings
(``PruningSettings`` fields), on validation goals (never the held-out ones the report uses),
and compares each with the unpruned policy on the same goals. Unpruned runs every layer over
every token whatever the settings, so it runs once. AR (OpenVLA) policies ask every control
step; chunk policies (OFT, pi0) ask for a chunk and execute its first rows, as
``bench metaworld-oft`` runs them.

The default grid is K = 1..L/2 x action layer = 0..L-1. K stops at L/2: at least half the
layers then run on the kept tokens, the regime the method is for (the paper prunes 29 of 32
layers); a K near L would "win" by pruning almost nothing.

``vla-pruner bench metaworld-layers`` writes ``layers.json``, ``layers.md`` and ``layers.png``
(a heatmap of success relative to unpruned when two settings vary, else bars).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .benchmark import (
    DEFAULT_MODEL,
    EnginePolicy,
    RunRecord,
    compare_with_unpruned,
    run_closed_loop,
    start_engine,
)
from .chunk_benchmark import ChunkEnginePolicy, ChunkRunRecord, is_chunk_policy, run_chunked

Grid = dict[str, list[Any]]


def _run(
    model_dir: Path,
    method: str,
    keep: float,
    settings: dict[str, Any],
    tasks: list[str],
    episodes: int,
    goals: str,
    image_size: int,
    max_steps: int | None,
) -> RunRecord | ChunkRunRecord:
    """One configuration's closed-loop record; both kinds carry the ``EvalResult`` the sweep
    compares."""
    from vllm_vla_pruner.engine.local import shutdown_llm

    llm = start_engine(model_dir, len(tasks) * episodes, settings)
    try:
        tag = ",".join(f"{k}={v}" for k, v in settings.items())
        if is_chunk_policy(model_dir):
            # OFT / pi0: a chunk per request, the first rows executed (engine ms per control step).
            chunked = ChunkEnginePolicy(llm, model_dir, method, keep, tag, record_episode=None)
            return run_chunked(chunked, tasks, episodes, max_steps, True, image_size, goals)
        policy = EnginePolicy(llm, model_dir, method, keep, tag=tag)
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
    grid: Grid,
    method: str = "vlapruner",
    keep: float = 0.25,
    tasks: Sequence[str] | None = None,
    episodes: int = 10,
    goals: str = "validation",
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Run ``method`` @ ``keep`` for every combination in ``grid``; the best cell is the one
    with the highest success (fewest episodes lost to unpruned on ties)."""
    from vllm_vla_pruner.config import image_size, load_config_json
    from vllm_vla_pruner.engine.settings import PruningSettings

    from .metaworld_env import DEFAULT_TASKS

    out.mkdir(parents=True, exist_ok=True)
    tasks = list(tasks or DEFAULT_TASKS)
    cfg = load_config_json(model_dir)
    num_layers = cfg["text_config"]["num_hidden_layers"]
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    for c in combos:  # a bad grid fails here, not after an hour of roll-outs
        PruningSettings.resolve(cfg.get("vla_pruner"), c).check(num_layers)
    run = dict(
        tasks=tasks, episodes=episodes, goals=goals, image_size=image_size(cfg), max_steps=max_steps
    )
    base = _run(model_dir, "none", 1.0, {}, **run).result
    print(f"unpruned: {base.mean_success:.0%}", flush=True)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "num_layers": num_layers,
        "method": method,
        "keep_ratio": keep,
        "goals": goals,
        "tasks": tasks,
        "episodes_per_task": episodes,
        "grid": grid,
        "unpruned_success": base.mean_success,
        "unpruned_per_task": {t: r.success_rate for t, r in base.tasks.items()},
        "cells": [],
    }
    for settings in combos:
        res = _run(model_dir, method, keep, settings, **run).result
        result["cells"].append(
            {
                "settings": settings,
                "success": res.mean_success,
                **compare_with_unpruned(base, res),
                "per_task": {t: r.success_rate for t, r in res.tasks.items()},
                "engine_ms_per_step": 1000 * res.policy_seconds_per_step,
            }
        )
        print(f"{settings}: {res.mean_success:.0%}", flush=True)
        (out / "layers.json").write_text(json.dumps(result, indent=2))  # progress so far
    render(result, out)
    print((out / "layers.md").read_text())
    return result


def render(result: dict[str, Any], out: Path) -> None:
    """Pick the best cell and write ``layers.json``, ``layers.md`` and ``layers.png``."""
    # Success is a mean of per-task rates: round before comparing so ties are ties.
    best = max(result["cells"], key=lambda c: (round(c["success"], 9), -c["lost"]))
    result["best"] = best["settings"]
    result["plot"] = str(plot(result, out))
    (out / "layers.json").write_text(json.dumps(result, indent=2))
    (out / "layers.md").write_text(markdown(result))


def _varying(result: dict[str, Any]) -> list[str]:
    return [k for k, v in result["grid"].items() if len(v) > 1]


def _label(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = result["cells"]
    rel = [c["relative_success"] or 0.0 for c in cells]
    varying = _varying(result)
    if len(varying) == 2:
        rows, cols = (result["grid"][k] for k in varying)
        grid = np.full((len(rows), len(cols)), np.nan)
        for c, r in zip(cells, rel):
            grid[rows.index(c["settings"][varying[0]]), cols.index(c["settings"][varying[1]])] = r
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 1.0 * len(rows) + 1.8))
        im = ax.imshow(grid, cmap="viridis", vmin=0.5, vmax=1.1)
        for i, j in itertools.product(range(len(rows)), range(len(cols))):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", color="w")
        ax.set_xticks(range(len(cols)), [str(v) for v in cols])
        ax.set_yticks(range(len(rows)), [str(v) for v in rows])
        ax.set_xlabel(varying[1])
        ax.set_ylabel(varying[0])
        fig.colorbar(im, ax=ax, shrink=0.8)
    else:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(cells) + 2), 3.5))
        lo = [r - c["relative_ci95"][0] for c, r in zip(cells, rel)]
        hi = [c["relative_ci95"][1] - r for c, r in zip(cells, rel)]
        ax.bar(range(len(cells)), rel, yerr=[lo, hi], capsize=3)
        ax.axhline(0.95, ls="--", color="gray", lw=1)
        names = [_label({k: c["settings"][k] for k in varying}) for c in cells]
        ax.set_xticks(range(len(cells)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("success / unpruned (paired 95% CI)")
    ax.set_title(
        f"{result['method']} @ keep {result['keep_ratio']}: success / unpruned\n"
        f"({result['goals']} goals, {result['episodes_per_task']} eps x "
        f"{len(result['tasks'])} tasks)",
        fontsize=9,
    )
    fig.tight_layout()
    path = out / "layers.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    keys = list(result["grid"])
    lines = [
        f"{result['method']} @ keep {result['keep_ratio']} on {len(tasks)} tasks x "
        f"{result['episodes_per_task']} {result['goals']} episodes, {result['num_layers']}-layer "
        f"model; unpruned: {result['unpruned_success']:.0%}. Best: {_label(result['best'])}.",
        "",
        "| "
        + " | ".join(keys)
        + " | success | rel. to unpruned (paired 95% CI) | lost / gained | "
        + " | ".join(t.replace("-v3", "") for t in tasks)
        + " | engine ms/step |",
        "|" + "---|" * (len(keys) + len(tasks) + 4),
    ]
    for c in result["cells"]:
        lo, hi = c["relative_ci95"]
        rel = "-" if c["relative_success"] is None else f"{c['relative_success']:.0%}"
        per = " | ".join(f"{c['per_task'][t]:.0%}" for t in tasks)
        values = " | ".join(str(c["settings"][k]) for k in keys)
        lines.append(
            f"| {values} | {c['success']:.0%} | {rel} ({lo:.0%}-{hi:.0%}) "
            f"| {c['lost']} / {c['gained']} | {per} | {c['engine_ms_per_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def parse_grid(items: Sequence[str]) -> Grid:
    """``["layer=1,2", "semantic_rows=all,text"]`` -> ``{"layer": [1, 2], ...}``; values are
    parsed as JSON where they can be (numbers, null), else kept as strings."""
    from vllm_vla_pruner.engine.settings import PruningSettings

    known = {f.name for f in fields(PruningSettings)}
    grid: Grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in known or not values:
            raise ValueError(f"--grid {item!r}: expected KEY=V1,V2,... with KEY in {sorted(known)}")
        grid[key] = [_value(v) for v in values.split(",")]
    return grid


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla-pruner bench metaworld-layers", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metaworld-layers"))
    p.add_argument(
        "--grid",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help="engine settings to combine (default: layer=1..L/2 action_layer=0..L-1)",
    )
    p.add_argument("--method", default="vlapruner")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--episodes", type=int, default=10, help="validation episodes per task")
    p.add_argument("--goals", choices=["validation", "heldout"], default="validation")
    p.add_argument("--max-steps", type=int, default=None)
    a = p.parse_args(argv)
    from vllm_vla_pruner.config import load_config_json

    n = load_config_json(a.model)["text_config"]["num_hidden_layers"]
    try:
        grid = parse_grid(a.grid) if a.grid else {}
    except ValueError as e:
        p.error(str(e))
    if not grid:
        grid = {"layer": list(range(1, n // 2 + 1)), "action_layer": list(range(n))}
    sweep(a.model, a.out, grid, a.method, a.keep, a.tasks, a.episodes, a.goals, a.max_steps)
    return 0
