"""Closed-loop Meta-World evaluation of pruners through the real vLLM engine.

Every frame of every episode goes through the engine with the plugin, as a robot's request
would: one session per episode (so VLA-Pruner's temporal history and warm-up work as
deployed), a batch of all running episodes per engine call. Reports success per task with 95%
intervals for each pruner and keep ratio, action fidelity (token agreement with the unpruned
policy, replayed on the unpruned trajectory's frames), and engine time per step; writes a
markdown table, JSON, a success-vs-keep plot and images of the kept patches per pruner.

``vla-pruner bench metaworld`` runs the full evaluation; ``vla-pruner demo --policy ar`` a
short one (through ``chunk_benchmark``, which runs AR checkpoints with this module).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from vllm_vla_pruner.api.request_builder import EngineRequest
    from vllm_vla_pruner.engine.settings import PruningSettings

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "metaworld-vla"
PRUNERS = ("vlapruner", "fastv", "sparsevlm", "divprune", "random")
KEEPS = (0.5, 0.25, 0.125)
MAX_PARALLEL = 50  # episodes per engine call (``rollout_lockstep``'s chunk size)
GOAL_NAMES = {"heldout": "held-out", "validation": "validation"}


@dataclass
class RunRecord:
    """One configuration's closed-loop run."""

    method: str
    keep_ratio: float
    result: Any  # sim.evaluate.EvalResult
    engine_seconds: float
    engine_calls: int
    frames: dict[int, list[np.ndarray]] = field(default_factory=dict)  # episode -> frames
    tokens: dict[int, list[list[int]]] = field(default_factory=dict)  # episode -> tokens/step
    request_ids: dict[int, list[str]] = field(default_factory=dict)
    instructions: dict[int, str] = field(default_factory=dict)


class EnginePolicy:
    """Batched closed-loop policy backed by the vLLM engine (``vllm.LLM``) with pruning.

    Each frame is the request a robot sends to ``/v1/actions`` (``api/request_builder.py``).
    """

    def __init__(self, llm: Any, model_dir: Path, method: str, keep_ratio: float, tag: str):
        from vllm_vla_pruner.api.request_builder import RequestBuilder

        self.llm = llm
        self.builder = RequestBuilder.from_pretrained(model_dir)
        self.decoder = self.builder.decoder
        self.unnorm_key = self.decoder.default_unnorm_key or self.decoder.unnorm_keys[0]
        self.dim = self.decoder.action_dim(self.unnorm_key)
        self.method, self.keep_ratio, self.tag = method, keep_ratio, tag
        self.seconds = 0.0
        self.calls = 0

    def request(
        self, image: np.ndarray, instruction: str, episode: int, new: bool
    ) -> EngineRequest:
        """One episode's frame: the request ``/v1/actions`` would send for it."""
        return self.builder.build(
            instruction,
            image,
            self.dim,
            method=self.method,
            keep_ratio=None if self.method == "none" else self.keep_ratio,
            session_id=f"{self.tag}/{episode}",
            new_episode=bool(new),
        )

    def __call__(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        episodes: Sequence[int],
        first: Sequence[bool],
    ) -> tuple[np.ndarray, list[list[int]], list[str]]:
        reqs = [self.request(*frame) for frame in zip(images, instructions, episodes, first)]
        t0 = time.perf_counter()
        outs = self.llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        actions = np.array([self.decoder.decode(t, self.unnorm_key) for t in tokens], np.float32)
        return actions, tokens, [o.request_id for o in outs]


def run_closed_loop(
    policy: EnginePolicy,
    tasks: Sequence[str],
    episodes_per_task: int,
    keep_frames: bool,
    max_steps: int | None = None,
    progress: bool = True,
    image_size: int = 64,
    goals: str = "heldout",
) -> RunRecord:
    """All episodes in lockstep; each engine call carries every running episode's frame.
    ``goals`` names the goal seeds (``metaworld_env.GOAL_SETS``)."""
    from .evaluate import StepBatch, rollout_lockstep
    from .metaworld_env import GOAL_SETS

    pairs = [(t, s) for t in tasks for s in GOAL_SETS[goals](episodes_per_task)]
    rec = RunRecord(policy.method, policy.keep_ratio, None, 0.0, 0)

    def step(batch: StepBatch) -> np.ndarray:
        actions, tokens, rids = policy(
            batch.images, batch.instructions, batch.episodes, batch.first
        )
        for j, e in enumerate(batch.episodes):
            if keep_frames:
                rec.frames.setdefault(e, []).append(batch.images[j])
            rec.tokens.setdefault(e, []).append(tokens[j])
            rec.request_ids.setdefault(e, []).append(rids[j])
            rec.instructions[e] = batch.instructions[j]
        return actions

    res = rollout_lockstep(
        step,
        pairs,
        image_size,
        max_steps,
        progress=progress,
        max_parallel=MAX_PARALLEL,
        desc=f"{policy.method}@{policy.keep_ratio}",
    )
    # Engine time only (the wrapper's prompt building and action decoding excluded).
    rec.result = dataclasses.replace(
        res, policy_seconds_per_step=policy.seconds / max(1, res.total_steps)
    )
    rec.engine_seconds, rec.engine_calls = policy.seconds, policy.calls
    return rec


def fidelity(policy: EnginePolicy, reference: RunRecord) -> float:
    """Action-token agreement with the unpruned policy on the unpruned trajectory's frames."""
    episodes = sorted(reference.frames)
    horizon = max(len(reference.frames[e]) for e in episodes)
    agree = total = 0
    for step in range(horizon):
        live = [e for e in episodes if step < len(reference.frames[e])]
        images = [reference.frames[e][step] for e in live]
        instructions = [reference.instructions[e] for e in live]
        _, tokens, _ = policy(images, instructions, live, [step == 0] * len(live))
        for e, toks in zip(live, tokens):
            ref = reference.tokens[e][step]
            agree += sum(a == b for a, b in zip(toks, ref))
            total += len(ref)
    return agree / max(1, total)


def start_engine(
    model_dir: Path, num_episodes: int, pruning: dict[str, Any], **engine_args: Any
) -> Any:
    """An engine sized for a lockstep roll-out (at most ``MAX_PARALLEL`` episodes per call);
    ``engine_args``: further ``vllm.LLM`` keywords."""
    from vllm_vla_pruner.engine.local import make_llm

    return make_llm(
        model_dir,
        max_num_seqs=max(16, min(MAX_PARALLEL, num_episodes)),
        pruning=pruning,
        **engine_args,
    )


def compare_with_unpruned(base: Any, other: Any) -> dict[str, Any]:
    """``other``'s success relative to ``base`` (``EvalResult``s on the same goals): the ratio,
    its paired bootstrap 95% CI, and the episodes only ``base`` (lost) / only ``other``
    (gained) solved."""
    from .evaluate import paired_ratio_ci

    base_eps = [r.per_episode for r in base.tasks.values()]
    eps = [r.per_episode for r in other.tasks.values()]
    flat_b, flat_o = sum(base_eps, []), sum(eps, [])
    return {
        "relative_success": other.mean_success / base.mean_success if base.mean_success else None,
        "relative_ci95": list(paired_ratio_ci(base_eps, eps)),
        "lost": sum(b and not o for b, o in zip(flat_b, flat_o)),
        "gained": sum(o and not b for b, o in zip(flat_b, flat_o)),
    }


def pruning_settings_for(
    cfg: dict[str, Any], layer: int | None = None, action_layer: int | None = None
) -> PruningSettings:
    """The pruning settings the engine will run: ``layer`` / ``action_layer`` if given, over
    the checkpoint's recommendation (``"vla_pruner"`` in config.json), over the engine's
    defaults (the paper's K = 3, the middle layer, all semantic rows) - the one resolution
    ``PruningSettings.resolve`` that ``vllm serve`` uses, so the benchmark measures what a
    deployment of the same checkpoint runs. Refuses layers the model does not have."""
    from vllm_vla_pruner.engine.settings import PruningSettings

    given = {"layer": layer, "action_layer": action_layer}
    return PruningSettings.resolve(
        cfg.get("vla_pruner"), {k: v for k, v in given.items() if v is not None}
    ).check(cfg["text_config"]["num_hidden_layers"])


def pruning_layers_for(
    cfg: dict[str, Any], layer: int | None = None, action_layer: int | None = None
) -> tuple[int, int]:
    """K and the action-attention layer of ``pruning_settings_for``."""
    settings = pruning_settings_for(cfg, layer, action_layer)
    return settings.layer, settings.action_layer_for(cfg["text_config"]["num_hidden_layers"])


def _trace(path: Path) -> dict[str, list[int]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["req_id"]] = r["kept"]
    return out


def _kept_for(trace: dict[str, list[int]], request_id: str) -> list[int] | None:
    for rid, kept in trace.items():
        if rid == request_id or rid.startswith(request_id + "-"):
            return kept
    return None


def overlay(image: np.ndarray, kept: list[int] | None, grid: int, scale: int = 4) -> np.ndarray:
    """The frame with dropped patches dimmed (kept patches as the model saw them)."""
    img = np.asarray(Image.fromarray(image).resize((image.shape[1] * scale,) * 2, Image.NEAREST))
    img = img.astype(np.float32)
    if kept is not None:
        mask = np.zeros(grid * grid, bool)
        mask[kept] = True
        cell = img.shape[0] // grid
        full = np.kron(mask.reshape(grid, grid), np.ones((cell, cell), bool))
        img[~full] = img[~full] * 0.25 + 40
    return img.clip(0, 255).astype(np.uint8)


def save_overlays(
    records: list[RunRecord],
    trace: dict[str, list[int]],
    grid: int,
    out: Path,
    episode: int = 0,
    steps: Sequence[int] = (0, 5, 10, 20),
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in records if r.method == "none")
    rows = [base] + [r for r in records if r.method != "none" and r.keep_ratio == 0.25]
    steps = [s for s in steps if s < len(base.frames.get(episode, []))] or [0]
    fig, axes = plt.subplots(
        len(rows), len(steps), figsize=(2.2 * len(steps), 2.2 * len(rows)), squeeze=False
    )
    for r_i, rec in enumerate(rows):
        for c_i, s in enumerate(steps):
            ax = axes[r_i][c_i]
            frames = rec.frames.get(episode) or base.frames[episode]
            s_eff = min(s, len(frames) - 1)
            rid = rec.request_ids.get(episode, [None] * (s_eff + 1))[s_eff]
            kept = None if rec.method == "none" or rid is None else _kept_for(trace, rid)
            ax.imshow(overlay(frames[s_eff], kept, grid))
            ax.set_xticks([]), ax.set_yticks([])
            if c_i == 0:
                label = "unpruned" if rec.method == "none" else f"{rec.method} @ {rec.keep_ratio}"
                ax.set_ylabel(label, fontsize=8)
            if r_i == 0:
                ax.set_title(f"step {s}", fontsize=8)
    fig.suptitle("kept visual patches (dimmed: pruned after layer K)", fontsize=9)
    fig.tight_layout()
    path = out / "kept_patches.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_success(summary: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(s for s in summary if s["method"] == "none")
    ax.axhline(base["success"], color="k", ls="--", label="unpruned")
    for method in sorted({s["method"] for s in summary} - {"none"}):
        pts = sorted(
            (s["keep_ratio"], s["success"], s["ci95"]) for s in summary if s["method"] == method
        )
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        err = [[y - p[2][0] for y, p in zip(ys, pts)], [p[2][1] - y for y, p in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({s["keep_ratio"] for s in summary}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("keep ratio (visual tokens kept after layer K)")
    ax.set_ylabel("closed-loop success (held-out goals)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Meta-World success vs keep ratio, through the vLLM engine")
    fig.tight_layout()
    path = out / "success_vs_keep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_pruners(
    model_dir: Path,
    out: Path,
    methods: Sequence[str],
    keeps: Sequence[float],
    tasks: Sequence[str] | None,
    episodes_per_task: int,
    with_fidelity: bool = True,
    max_steps: int | None = None,
    layer: int | None = None,
    action_layer: int | None = None,
    goals: str = "heldout",
) -> dict[str, Any]:
    from vllm_vla_pruner.config import grid_shape, image_size, load_config_json

    from .metaworld_env import DEFAULT_TASKS

    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / "pruning_trace.jsonl"
    trace_path.unlink(missing_ok=True)
    os.environ["VLA_PRUNER_TRACE"] = str(trace_path)
    tasks = list(tasks or DEFAULT_TASKS)
    cfg = load_config_json(model_dir)
    settings = pruning_settings_for(cfg, layer, action_layer)
    layer = settings.layer
    action_layer = settings.action_layer_for(cfg["text_config"]["num_hidden_layers"])
    llm = start_engine(
        model_dir, len(tasks) * episodes_per_task, {"layer": layer, "action_layer": action_layer}
    )
    grid = grid_shape(cfg)[0]
    configs = [("none", 1.0)] + [(m, k) for m in methods for k in keeps]
    records: list[RunRecord] = []
    summary = []
    for i, (method, keep) in enumerate(configs):
        policy = EnginePolicy(llm, model_dir, method, keep, tag=f"run{i}")
        rec = run_closed_loop(
            policy,
            tasks,
            episodes_per_task,
            keep_frames=(i == 0) or keep == 0.25,
            max_steps=max_steps,
            image_size=image_size(cfg),
            goals=goals,
        )
        records.append(rec)
        fid = None
        if with_fidelity and method != "none":
            fid = fidelity(EnginePolicy(llm, model_dir, method, keep, tag=f"fid{i}"), records[0])
        res = rec.result
        summary.append(
            {
                "method": method,
                "keep_ratio": keep,
                "success": res.mean_success,
                "ci95": list(res.ci95),
                "per_task": {
                    t: {"success": r.success_rate, "ci95": list(r.ci95), "episodes": r.episodes}
                    for t, r in res.tasks.items()
                },
                "engine_ms_per_call": 1000 * rec.engine_seconds / max(1, rec.engine_calls),
                "engine_ms_per_step": 1000 * res.policy_seconds_per_step,
                "token_agreement": fid,
            }
        )
    base_ms = summary[0]["engine_ms_per_step"]
    for s, rec in zip(summary, records):
        c = compare_with_unpruned(records[0].result, rec.result)
        s["relative_success"], s["relative_ci95"] = c["relative_success"], c["relative_ci95"]
        s["paired"] = {"only_unpruned_succeeded": c["lost"], "only_this_succeeded": c["gained"]}
        s["speedup_vs_unpruned"] = (
            base_ms / s["engine_ms_per_step"] if s["engine_ms_per_step"] else None
        )
    from vllm_vla_pruner.engine.local import shutdown_llm

    shutdown_llm(llm)
    trace = _trace(trace_path)
    result = {
        "model": str(model_dir),
        "layer_k": layer,
        "action_layer": action_layer,
        "semantic_rows": settings.semantic_rows,
        "goals": goals,
        "tasks": tasks,
        "episodes_per_task": episodes_per_task,
        "summary": summary,
        "plot": str(plot_success(summary, out)),
        "overlays": str(save_overlays(records, trace, grid, out)),
    }
    (out / "metaworld.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "metaworld.md").write_text(table)
    print(table)
    return result


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    head = (
        "| method | keep | mean success (95% CI) | rel. to unpruned (paired 95% CI) | "
        "lost / gained | "
        + " | ".join(t.replace("-v3", "") for t in tasks)
        + " | token agreement | engine ms/step | speedup |"
    )
    lines = [
        f"Meta-World closed loop through the vLLM engine: {len(tasks)} tasks x "
        f"{result['episodes_per_task']} {GOAL_NAMES[result.get('goals', 'heldout')]} episodes "
        f"each (same goals for every row); pruning after layer K={result['layer_k']}, action "
        f"attention at layer {result.get('action_layer', 'L//2')}, semantic score from "
        f"{result.get('semantic_rows', 'all')!r} prompt rows. *lost / gained*: episodes "
        "only the unpruned policy / only this row solved.",
        "",
        head,
        "|" + "---|" * (len(tasks) + 8),
    ]
    for s in result["summary"]:
        per = " | ".join(f"{s['per_task'][t]['success']:.0%}" for t in tasks)
        fid = "-" if s["token_agreement"] is None else f"{s['token_agreement']:.1%}"
        if s["method"] == "none":
            rel = "100%"
        elif s["relative_success"] is None:
            rel = "-"
        else:
            lo, hi = s["relative_ci95"]
            rel = f"{s['relative_success']:.0%} ({lo:.0%}-{hi:.0%})"
        pair = s.get("paired") or {}
        lost = f"{pair.get('only_unpruned_succeeded', 0)} / {pair.get('only_this_succeeded', 0)}"
        lines.append(
            f"| {s['method']} | {s['keep_ratio']} | {s['success']:.0%} "
            f"({s['ci95'][0]:.0%}-{s['ci95'][1]:.0%}) | {rel} | {lost} | {per} | {fid} "
            f"| {s['engine_ms_per_step']:.1f} | {s['speedup_vs_unpruned']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla-pruner bench metaworld", description=__doc__)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metaworld"))
    p.add_argument("--methods", nargs="+", default=list(PRUNERS))
    p.add_argument("--keep", type=float, nargs="+", default=list(KEEPS))
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per task")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-fidelity", action="store_true")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="pruning layer K (default: the checkpoint's, else the engine's, 3)",
    )
    p.add_argument(
        "--action-layer",
        type=int,
        default=None,
        help="action-attention layer (default: the checkpoint's, else the middle one)",
    )
    p.add_argument(
        "--goals",
        choices=["heldout", "validation"],
        default="heldout",
        help="goal seeds: report on held-out ones, tune settings on validation ones",
    )
    a = p.parse_args(argv)
    evaluate_pruners(
        a.model,
        a.out,
        a.methods,
        a.keep,
        a.tasks,
        a.episodes,
        with_fidelity=not a.no_fidelity,
        max_steps=a.max_steps,
        layer=a.layer,
        action_layer=a.action_layer,
        goals=a.goals,
    )
    return 0
