"""Closed-loop Meta-World evaluation of chunk policies (OpenVLA-OFT, pi0) through the real
vLLM engine.

Each robot asks the engine for an action chunk exactly as a ``/v1/actions`` client of an OFT
or pi0 checkpoint would (``RequestBuilder.build_chunk``: both camera views in the model's
order, the raw proprio state, the instruction; for pi0 also a noise seed, fixed per episode
and chunk so that every configuration denoises from the same noise), executes the first
``execute_steps`` rows, then asks again. One session per episode, so VLA-Pruner's history
is the episode's previous chunks and its warm-up is the episode's first ``window`` chunks,
as deployed. All running episodes share one engine call whenever any of them needs a new
chunk (``rollout_lockstep``).

Reports, per policy: success per task with 95% intervals, success relative to the same
policy unpruned with paired 95% CIs, and engine time per *control step* (engine wall time /
executed actions) for every configuration measured in the same run. An AR checkpoint given
beside the OFT one is run by ``sim.benchmark`` on its own engine, so one table holds both.

``vla-pruner bench metaworld-oft --models OFT_DIR [PI0_DIR] [AR_DIR] ...``; ``vla-pruner
demo`` runs a short version (``sim/demo.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .benchmark import (
    DEFAULT_MODEL as AR_MODEL,
)
from .benchmark import (
    GOAL_NAMES,
    MAX_PARALLEL,
    EnginePolicy,
    _kept_for,
    _trace,
    compare_with_unpruned,
    overlay,
    pruning_settings_for,
    run_closed_loop,
    save_overlays,
    start_engine,
)

if TYPE_CHECKING:
    from vllm_vla_pruner.api.request_builder import EngineRequest

    from .evaluate import StepBatch

OFT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "metaworld-oft"
PI0_MODEL = Path(__file__).resolve().parents[2] / "assets" / "metaworld-pi0"
KEEPS = (0.5, 0.25, 0.125)
DEFAULT_EXECUTE_STEPS = 4  # of the 8-step chunk: re-plan twice per chunk length


def is_chunk_policy(model_dir: Path) -> bool:
    """An OpenVLA-OFT or pi0 checkpoint (a chunk per request), not an AR OpenVLA one."""
    from vllm_vla_pruner.config import is_oft_checkpoint
    from vllm_vla_pruner.pi0_spec import is_pi0_checkpoint

    return is_oft_checkpoint(model_dir) or is_pi0_checkpoint(model_dir)


def registry_pruners() -> list[str]:
    """Every pruner of the registry except ``none`` (the unpruned row is always run)."""
    from vllm_vla_pruner.pruning import PRUNERS

    return sorted(set(PRUNERS) - {"none"})


@dataclass
class ChunkRunRecord:
    """One configuration's closed-loop run of a chunk policy."""

    method: str
    keep_ratio: float
    result: Any  # sim.evaluate.EvalResult
    engine_seconds: float = 0.0
    engine_calls: int = 0
    requests: int = 0
    pruned_requests: int = 0
    visual_kept: int = 0  # summed over pruned requests (worker-reported)
    visual_total: int = 0
    chunk_shapes: set[tuple[int, int]] = field(default_factory=set)
    # Episode 0 only (kept-patch figure, tests): each chunk request's views, id and chunk.
    views: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    action_min: np.ndarray | None = None  # per action dimension, over every chunk returned
    action_max: np.ndarray | None = None
    # Which process ran it (``run_store``): rows run by another process than their
    # unpruned row are compared in success, not side by side in speed.
    invocation: str = ""


class ChunkEnginePolicy:
    """A lockstep policy (``rollout_lockstep``) that asks the engine for action chunks of an
    OFT or a pi0 checkpoint (``kind``).

    Per episode it keeps the rows of its last chunk still to execute; an episode whose queue
    is empty (or that just started) is observed - ``render_views()``, ``proprio()`` - and asks
    for a new chunk; all such episodes of a step go to the engine in one ``generate`` call.
    """

    def __init__(
        self,
        llm: Any,
        model_dir: Path,
        method: str,
        keep_ratio: float,
        tag: str,
        execute_steps: int = DEFAULT_EXECUTE_STEPS,
        record_episode: int | None = 0,
    ) -> None:
        from vllm_vla_pruner.api.protocol import check_execute_steps
        from vllm_vla_pruner.api.request_builder import RequestBuilder

        self.llm = llm
        self.builder = RequestBuilder.from_pretrained(model_dir)
        oft, pi0 = self.builder.oft, self.builder.pi0
        if oft is not None:
            self.kind, self.num_images = "oft", oft.num_images
            self.chunk, self.state_dim = oft.chunk, oft.proprio_dim
        elif pi0 is not None:
            self.kind, self.num_images = "pi0", pi0.num_cameras
            self.chunk, self.state_dim = pi0.horizon, pi0.state_dim
        else:
            raise ValueError(f"{model_dir} is neither an OpenVLA-OFT nor a pi0 checkpoint")
        # The same bound the endpoint's `execute_steps` field has (1..chunk).
        self.execute_steps = check_execute_steps(execute_steps, self.chunk)
        self.method, self.keep_ratio, self.tag = method, keep_ratio, tag
        self.record_episode = record_episode
        self.queues: dict[int, list[np.ndarray]] = {}
        self.asked: dict[int, int] = {}  # chunks requested so far, per episode
        self.rec = ChunkRunRecord(method, keep_ratio, None)

    def request(
        self,
        views: Sequence[np.ndarray],
        state: Sequence[float],
        instruction: str,
        episode: int,
        new: bool,
    ) -> EngineRequest:
        """One episode's chunk request: what ``/v1/actions`` sends for the same body. pi0's
        noise seed is the episode's goal and chunk number (not the configuration): every
        configuration's n-th chunk of an episode starts from the same noise."""
        self.asked[episode] = 0 if new else self.asked.get(episode, 0) + 1
        seed = 1000 * episode + self.asked[episode] if self.kind == "pi0" else None
        return self.builder.build_chunk(
            instruction,
            list(views),
            [float(x) for x in state],
            method=self.method,
            keep_ratio=None if self.method == "none" else self.keep_ratio,
            session_id=f"{self.tag}/{episode}",
            new_episode=bool(new),
            noise_seed=seed,
        )

    def infer(self, reqs: Sequence[EngineRequest]) -> tuple[list[np.ndarray], list[Any]]:
        """One engine call: the chunks (``chunk x action_dim``) and the requests' outputs."""
        from vllm_vla_pruner.engine.plan import ActionChunk, PruningResult

        t0 = time.perf_counter()
        outs = self.llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)
        self.rec.engine_seconds += time.perf_counter() - t0
        self.rec.engine_calls += 1
        self.rec.requests += len(reqs)
        chunks = []
        for o in outs:
            if any(getattr(c, "finish_reason", None) == "error" for c in o.outputs):
                raise RuntimeError(f"{self.method}@{self.keep_ratio}: request failed in engine")
            chunk = ActionChunk.from_public(o.kv_transfer_params)
            if chunk is None or chunk.error is not None:
                raise RuntimeError(f"{self.method}@{self.keep_ratio}: no chunk: {chunk}")
            arr = np.asarray(chunk.rows(), np.float32)
            self.rec.chunk_shapes.add(arr.shape)
            if not np.isfinite(arr).all():  # never executed: a model or engine bug
                raise RuntimeError(f"{self.method}@{self.keep_ratio}: non-finite chunk {arr}")
            lo, hi = arr.min(0), arr.max(0)
            r = self.rec
            r.action_min = lo if r.action_min is None else np.minimum(r.action_min, lo)
            r.action_max = hi if r.action_max is None else np.maximum(r.action_max, hi)
            chunks.append(arr)
            res = PruningResult.from_public(o.kv_transfer_params)
            if res is not None and res.outcome is not None and res.outcome.pruned:
                self.rec.pruned_requests += 1
                self.rec.visual_kept += res.outcome.visual_tokens_kept
                self.rec.visual_total += res.outcome.visual_tokens_total
        return chunks, outs

    def __call__(self, batch: StepBatch) -> np.ndarray:
        need = [j for j, e in enumerate(batch.episodes) if batch.first[j] or not self.queues.get(e)]
        if need:
            reqs, observed = [], []
            for j in need:
                env, e = batch.envs[j], batch.episodes[j]
                views = env.render_views()
                observed.append(views)
                reqs.append(
                    self.request(views, env.proprio(), batch.instructions[j], e, batch.first[j])
                )
            chunks, outs = self.infer(reqs)
            for j, views, chunk, out in zip(need, observed, chunks, outs, strict=True):
                e = batch.episodes[j]
                self.queues[e] = list(chunk[: self.execute_steps])
                if e == self.record_episode:
                    self.rec.views.append(tuple(views))
                    self.rec.request_ids.append(out.request_id)
                    self.rec.chunks.append(chunk)
        return np.stack([self.queues[e].pop(0) for e in batch.episodes])


def run_chunked(
    policy: ChunkEnginePolicy,
    tasks: Sequence[str],
    episodes_per_task: int,
    max_steps: int | None = None,
    progress: bool = True,
    image_size: int = 64,
    goals: str = "heldout",
) -> ChunkRunRecord:
    """All episodes in lockstep, chunks requested as episodes run out of rows."""
    from .evaluate import rollout_lockstep
    from .metaworld_env import GOAL_SETS

    pairs = [(t, s) for t in tasks for s in GOAL_SETS[goals](episodes_per_task)]
    res = rollout_lockstep(
        policy,
        pairs,
        image_size,
        max_steps,
        progress=progress,
        max_parallel=MAX_PARALLEL,
        desc="unpruned" if policy.method == "none" else f"{policy.method}@{policy.keep_ratio}",
        render=False,
    )
    rec = policy.rec
    # Engine time only, per executed action (the wrapper's rendering and building excluded).
    rec.result = replace(res, policy_seconds_per_step=rec.engine_seconds / max(1, res.total_steps))
    return rec


class InterleavedPolicies:
    """Several configurations' robots in one lockstep roll-out. Episode ``e`` belongs to
    configuration ``e // n_pairs`` (its goal is pair ``e % n_pairs``); each step, each
    configuration's robots that need a chunk go to the engine in a call of their own, so every
    call's time is one configuration's, and the calls' order rotates step by step: a change
    in machine load hits every configuration alike (run one after the other, the unpruned
    and pruned runs would see different loads)."""

    def __init__(self, policies: Sequence[ChunkEnginePolicy], n_pairs: int) -> None:
        self.policies = list(policies)
        self.n_pairs = n_pairs
        self.steps = 0

    def __call__(self, batch: StepBatch) -> np.ndarray:
        from .evaluate import StepBatch

        out: list[np.ndarray | None] = [None] * len(batch.episodes)
        n = len(self.policies)
        for c in [(self.steps + i) % n for i in range(n)]:
            idx = [j for j, e in enumerate(batch.episodes) if e // self.n_pairs == c]
            if not idx:
                continue
            sub = StepBatch(
                episodes=[batch.episodes[j] % self.n_pairs for j in idx],
                images=batch.images[idx],
                instructions=[batch.instructions[j] for j in idx],
                first=[batch.first[j] for j in idx],
                envs=[batch.envs[j] for j in idx],
            )
            for j, action in zip(idx, self.policies[c](sub), strict=True):
                out[j] = action
        self.steps += 1
        return np.stack(out)


def run_interleaved(
    policies: Sequence[ChunkEnginePolicy],
    tasks: Sequence[str],
    episodes_per_task: int,
    max_steps: int | None = None,
    progress: bool = True,
    image_size: int = 64,
    goals: str = "heldout",
) -> list[ChunkRunRecord]:
    """Every configuration on the same goals in one lockstep roll-out (``InterleavedPolicies``);
    needs ``len(policies) * episodes`` <= ``MAX_PARALLEL``."""
    from .evaluate import _result, rollout_lockstep
    from .metaworld_env import GOAL_SETS

    pairs = [(t, s) for t in tasks for s in GOAL_SETS[goals](episodes_per_task)]
    every = pairs * len(policies)
    if len(every) > MAX_PARALLEL:
        raise ValueError(f"{len(every)} episodes do not fit one lockstep batch ({MAX_PARALLEL})")
    results: list[tuple[bool, int]] = []
    names = ["unpruned" if p.method == "none" else f"{p.method}@{p.keep_ratio}" for p in policies]
    rollout_lockstep(
        InterleavedPolicies(policies, len(pairs)),
        every,
        image_size,
        max_steps,
        progress=progress,
        max_parallel=len(every),
        desc=" + ".join(names),
        render=False,
        pair_results=results,
    )
    for c, policy in enumerate(policies):
        mine = results[c * len(pairs) : (c + 1) * len(pairs)]
        outcomes: dict[str, list[tuple[bool, int]]] = {t: [] for t in tasks}
        for (task, _), r in zip(pairs, mine, strict=True):
            outcomes[task].append(r)
        steps = sum(n for _, n in mine)
        # Engine time only, per executed action, as run_chunked.
        policy.rec.result = _result(outcomes, policy.rec.engine_seconds, 0.0, steps, 0.0)
    return [p.rec for p in policies]


def _summary_row(
    policy: str, kind: str, rec: Any, execute_steps: int, visual_total: int
) -> dict[str, Any]:
    res = rec.result
    requests = getattr(rec, "requests", None) or res.total_steps
    pruned = getattr(rec, "pruned_requests", None)
    kept_mean = (
        rec.visual_kept / pruned if pruned else (visual_total if rec.method == "none" else None)
    )
    return {
        "policy": policy,
        "kind": kind,
        "method": rec.method,
        "keep_ratio": rec.keep_ratio,
        "execute_steps": execute_steps,
        "success": res.mean_success,
        "ci95": list(res.ci95),
        "per_task": {
            t: {"success": r.success_rate, "ci95": list(r.ci95), "episodes": r.episodes}
            for t, r in res.tasks.items()
        },
        "control_steps": res.total_steps,
        "engine_calls": rec.engine_calls,
        "requests": requests,
        "mean_batch": requests / max(1, rec.engine_calls),
        "engine_ms_per_call": 1000 * rec.engine_seconds / max(1, rec.engine_calls),
        "engine_ms_per_control_step": 1000 * res.policy_seconds_per_step,
        "pruned_requests": pruned,
        "visual_tokens_total": visual_total,
        "visual_tokens_kept_mean": kept_mean,
        "chunk_shapes": [list(s) for s in sorted(getattr(rec, "chunk_shapes", ()))],
        "action_range": _range(rec),
        "invocation": getattr(rec, "invocation", ""),
    }


def _range(rec: Any) -> list[list[float]] | None:
    """[min, max] per action dimension over every chunk the engine returned (OFT)."""
    lo, hi = getattr(rec, "action_min", None), getattr(rec, "action_max", None)
    return None if lo is None else [[float(a), float(b)] for a, b in zip(lo, hi)]


def _compare(rows: list[dict[str, Any]], results: list[Any]) -> None:
    """Paired comparison and speed of every row against its own policy's unpruned row."""
    base, base_row = results[0], rows[0]
    for row, res in zip(rows, results, strict=True):
        c = compare_with_unpruned(base, res)
        row["relative_success"], row["relative_ci95"] = c["relative_success"], c["relative_ci95"]
        row["paired"] = {"only_unpruned_succeeded": c["lost"], "only_this_succeeded": c["gained"]}
        ms = row["engine_ms_per_control_step"]
        row["speedup_vs_unpruned"] = base_row["engine_ms_per_control_step"] / ms if ms else None
        row["same_run_as_unpruned"] = row.get("invocation") == base_row.get("invocation")


def evaluate_oft(
    model_dir: Path,
    configs: Sequence[tuple[str, float]],
    tasks: Sequence[str],
    episodes_per_task: int,
    *,
    execute_steps: int = DEFAULT_EXECUTE_STEPS,
    goals: str = "heldout",
    max_steps: int | None = None,
    progress: bool = True,
    trace_path: Path | None = None,
    runs_dir: Path | None = None,
    resume: bool = False,
    report_only: bool = False,
) -> tuple[list[dict[str, Any]], list[ChunkRunRecord], dict[str, Any]]:
    """An OFT or pi0 checkpoint: every ``(method, keep)`` of ``configs`` (the first must be
    ``("none", 1.0)``) on one engine: the summary rows, the records and the pruning settings
    the engine ran. When all configurations' episodes fit one lockstep batch they run
    interleaved (``run_interleaved``), else one after the other; then each finished
    configuration is saved under ``runs_dir`` and, with ``resume``, one saved by an earlier
    invocation under the same settings is loaded instead of run (``run_store``).
    ``report_only``: no engine; the table of the configurations the store holds so far."""
    from vllm_vla_pruner.api.protocol import check_execute_steps
    from vllm_vla_pruner.config import image_size, load_config_json, num_visual_tokens
    from vllm_vla_pruner.engine.local import shutdown_llm

    check_execute_steps(execute_steps, chunk_length(model_dir))  # before the engine starts
    cfg = load_config_json(model_dir)
    engine_pruning = resolved_pruning(cfg)
    pruning = {k: engine_pruning[k] for k in ("layer", "action_layer")}
    interleaved = len(configs) * len(tasks) * episodes_per_task <= MAX_PARALLEL
    store = None
    if runs_dir is not None and (report_only or not interleaved):
        from .run_store import RunSettings, RunStore, model_identity

        run_settings = RunSettings.of(
            model=model_identity(model_dir),
            goals=goals,
            tasks=tasks,
            episodes_per_task=episodes_per_task,
            execute_steps=execute_steps,
            max_steps=max_steps,
            pruning=engine_pruning,
        )
        store = RunStore(runs_dir, run_settings, resume or report_only)
    meta = {**engine_pruning, "interleaved": interleaved}
    if report_only:
        if store is None:
            raise ValueError("--report-only reads the run store of a run one config at a time")
        spec = ChunkEnginePolicy(None, model_dir, "none", 1.0, "report", execute_steps)
        loaded = [store.load(m, k, ChunkRunRecord) for m, k in configs]
        records = [r for r in loaded if r is not None]
        if not records or records[0].method != "none":
            raise ValueError(f"--report-only: no finished unpruned run under {runs_dir}")
        total = num_visual_tokens(cfg) * spec.num_images
        rows = [
            _summary_row(model_dir.name, spec.kind, rec, spec.execute_steps, total)
            for rec in records
        ]
        _compare(rows, [r.result for r in records])
        meta["missing"] = [f"{m}@{k}" for (m, k), r in zip(configs, loaded) if r is None]
        return rows, records, meta
    _set_trace(trace_path)
    llm = _start(model_dir, len(tasks) * episodes_per_task, pruning)
    rows: list[dict[str, Any]] = []
    records: list[ChunkRunRecord] = []
    try:
        warm = ChunkEnginePolicy(llm, model_dir, "none", 1.0, "warmup", execute_steps)
        side, n = image_size(cfg), min(MAX_PARALLEL, len(tasks) * episodes_per_task)
        views = [np.zeros((side, side, 3), np.uint8)] * warm.num_images
        state = [0.0] * warm.state_dim
        _warm_up(llm, [warm.request(views, state, "warm up", e, True) for e in range(n)])
        policies = [
            ChunkEnginePolicy(llm, model_dir, method, keep, f"oft{i}", execute_steps)
            for i, (method, keep) in enumerate(configs)
        ]
        run = (side, goals)
        if interleaved:
            records = run_interleaved(policies, tasks, episodes_per_task, max_steps, progress, *run)
        else:
            for p in policies:
                rec = store.load(p.method, p.keep_ratio, ChunkRunRecord) if store else None
                if rec is None:
                    rec = run_chunked(p, tasks, episodes_per_task, max_steps, progress, *run)
                    if store is not None:
                        rec.invocation = store.invocation
                        store.save(rec)
                records.append(rec)
        total = num_visual_tokens(cfg) * warm.num_images
        rows = [
            _summary_row(model_dir.name, warm.kind, rec, warm.execute_steps, total)
            for rec in records
        ]
    finally:
        shutdown_llm(llm)
    _compare(rows, [r.result for r in records])
    return rows, records, meta


def resolved_pruning(cfg: dict[str, Any]) -> dict[str, Any]:
    """The pruning settings a checkpoint runs with (its recommendation over the engine
    defaults): what the table reports and what a saved run must match to be resumed."""
    settings = pruning_settings_for(cfg)
    layers = cfg["text_config"]["num_hidden_layers"]
    return {
        "layer": settings.layer,
        "action_layer": settings.action_layer_for(layers),
        "semantic_rows": settings.semantic_rows,
        "window": settings.window,
    }


def chunk_length(model_dir: Path) -> int:
    """Rows of the checkpoint's chunk: OFT's chunk, pi0's horizon."""
    from vllm_vla_pruner.config import oft_spec
    from vllm_vla_pruner.pi0_spec import is_pi0_checkpoint, pi0_spec

    return (
        pi0_spec(model_dir).horizon if is_pi0_checkpoint(model_dir) else oft_spec(model_dir).chunk
    )


def evaluate_ar(
    model_dir: Path,
    configs: Sequence[tuple[str, float]],
    tasks: Sequence[str],
    episodes_per_task: int,
    *,
    goals: str = "heldout",
    max_steps: int | None = None,
    progress: bool = True,
    trace_path: Path | None = None,
) -> tuple[list[dict[str, Any]], list[Any], dict[str, Any]]:
    """The AR policy's rows (one action per request) on its own engine (``sim.benchmark``)."""
    from vllm_vla_pruner.config import image_size, load_config_json, num_visual_tokens
    from vllm_vla_pruner.engine.local import shutdown_llm

    cfg = load_config_json(model_dir)
    settings = pruning_settings_for(cfg)
    layers = cfg["text_config"]["num_hidden_layers"]
    pruning = {"layer": settings.layer, "action_layer": settings.action_layer_for(layers)}
    _set_trace(trace_path)
    llm = _start(model_dir, len(tasks) * episodes_per_task, pruning)
    rows, records = [], []
    try:
        warm = EnginePolicy(llm, model_dir, "none", 1.0, tag="warmup")
        side, n = image_size(cfg), min(MAX_PARALLEL, len(tasks) * episodes_per_task)
        frame = np.zeros((side, side, 3), np.uint8)
        _warm_up(llm, [warm.request(frame, "warm up", e, True) for e in range(n)])
        for i, (method, keep) in enumerate(configs):
            policy = EnginePolicy(llm, model_dir, method, keep, tag=f"ar{i}")
            rec = run_closed_loop(
                policy,
                tasks,
                episodes_per_task,
                # Frames for the kept-patch figure (short runs only: they are all kept).
                keep_frames=len(tasks) * episodes_per_task <= MAX_PARALLEL
                and (method == "none" or keep == 0.25),
                max_steps=max_steps,
                progress=progress,
                image_size=image_size(cfg),
                goals=goals,
            )
            records.append(rec)
            rows.append(_summary_row(model_dir.name, "ar", rec, 1, num_visual_tokens(cfg)))
    finally:
        shutdown_llm(llm)
    _compare(rows, [r.result for r in records])
    meta = {**pruning, "semantic_rows": settings.semantic_rows, "window": settings.window}
    return rows, records, meta


def _start(model_dir: Path, episodes: int, pruning: dict[str, Any]) -> Any:
    """``sim.benchmark``'s engine without the weight-loading bar (the roll-out has its own)."""
    return start_engine(model_dir, episodes, pruning, use_tqdm_on_load=False)


def _warm_up(llm: Any, reqs: Sequence[EngineRequest]) -> None:
    """One untimed batch first: a fresh engine's first steps are slow (allocations, lazy
    inits), which would otherwise be billed to the first (unpruned) configuration."""
    for _ in range(2):
        llm.generate([r.prompt for r in reqs], [r.params for r in reqs], use_tqdm=False)


def _set_trace(path: Path | None) -> None:
    """The worker appends each pruned request's kept indices here (read at engine start)."""
    if path is None:
        os.environ.pop("VLA_PRUNER_TRACE", None)
        return
    path.unlink(missing_ok=True)
    os.environ["VLA_PRUNER_TRACE"] = str(path)


def evaluate_policies(
    models: Sequence[Path],
    out: Path,
    methods: Sequence[str],
    keeps: Sequence[float],
    tasks: Sequence[str] | None,
    episodes_per_task: int,
    *,
    execute_steps: int = DEFAULT_EXECUTE_STEPS,
    goals: str = "heldout",
    max_steps: int | None = None,
    progress: bool = True,
    print_table: bool = True,
    resume: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Each model (OFT, pi0 or AR, detected from its files) unpruned and with every ``method`` at
    every ``keep``, on the same goals; writes ``metaworld-oft.{json,md}``, plots and the
    kept-patch figure (OFT: both cameras) under ``out``."""
    from vllm_vla_pruner.config import grid_shape, load_config_json

    from .metaworld_env import DEFAULT_TASKS

    out.mkdir(parents=True, exist_ok=True)
    tasks = list(tasks or DEFAULT_TASKS)
    configs = [("none", 1.0)] + [(m, k) for m in methods if m != "none" for k in keeps]
    rows: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []
    figures: dict[str, str] = {}
    t0 = time.perf_counter()
    for model in models:
        model = Path(model)
        trace = out / f"pruning_trace-{model.name}.jsonl"
        common = {"goals": goals, "max_steps": max_steps, "progress": progress}
        if is_chunk_policy(model):
            r, recs, meta = evaluate_oft(
                model,
                configs,
                tasks,
                episodes_per_task,
                execute_steps=execute_steps,
                trace_path=trace,
                runs_dir=out / "runs" / model.name,
                resume=resume,
                report_only=report_only,
                **common,
            )
            if any(rec.views for rec in recs):  # records loaded from the store have no frames
                cfg = load_config_json(model)
                grid = grid_shape(cfg)[0]
                fig = save_chunk_overlays(recs, _trace(trace), grid, out, model.name)
                figures[f"kept_patches_{model.name}"] = str(fig)
            kind = r[0]["kind"]
        elif report_only:
            raise ValueError(f"--report-only: {model} is an AR checkpoint (no run store)")
        else:
            r, recs, meta = evaluate_ar(
                model, configs, tasks, episodes_per_task, trace_path=trace, **common
            )
            kind = "ar"
            if recs[0].frames:
                cfg = load_config_json(model)
                fig = save_overlays(recs, _trace(trace), grid_shape(cfg)[0], out)
                figures[f"kept_patches_{model.name}"] = str(
                    fig.rename(out / f"kept_patches_{model.name}.png")
                )
        os.environ.pop("VLA_PRUNER_TRACE", None)
        rows += r
        policies.append({"policy": model.name, "model": str(model), "kind": kind, **meta})
    result = {
        "policies": policies,
        "goals": goals,
        "tasks": tasks,
        "episodes_per_task": episodes_per_task,
        "execute_steps": execute_steps,
        "max_steps": max_steps,
        "wall_seconds": time.perf_counter() - t0,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "summary": rows,
    }
    result["plot"] = str(plot_results(result, out))
    result.update(figures)
    (out / "metaworld-oft.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "metaworld-oft.md").write_text(table)
    if print_table:
        print(table)
    return result


def markdown(result: dict[str, Any]) -> str:
    """One table: every policy's rows, each compared with its own unpruned row."""
    tasks = result["tasks"]
    ex = result["execute_steps"]
    lines = [
        f"Meta-World closed loop through the vLLM engine: {len(tasks)} tasks x "
        f"{result['episodes_per_task']} {GOAL_NAMES[result['goals']]} episodes each (the same "
        f"goals for every row). Chunk policies (OFT, pi0) execute the first {ex} rows of each "
        "chunk, then ask again; AR policies ask every step. *engine ms / call*: wall time of "
        "one engine call (the running episodes' requests batched; an OFT call returns a chunk per "
        "episode); *engine ms / "
        "control step*: engine wall time / executed actions; both measured in this run on one "
        "engine per policy. "
        "*rel.*: success relative to the same policy unpruned, paired bootstrap 95% CI; "
        "*lost / gained*: episodes only the unpruned policy / only this row solved.",
        "",
        "| policy | method | keep | kept tokens | mean success (95% CI) | rel. (paired 95% CI) "
        "| lost / gained | "
        + " | ".join(t.replace("-v3", "") for t in tasks)
        + " | engine ms / call (mean batch) | engine ms / control step | speedup |",
        "|" + "---|" * (len(tasks) + 10),
    ]
    for s in result["summary"]:
        per = " | ".join(f"{s['per_task'][t]['success']:.0%}" for t in tasks)
        if s["method"] == "none":
            rel = "100%"
        elif s["relative_success"] is None:
            rel = "-"
        else:
            lo, hi = s["relative_ci95"]
            rel = f"{s['relative_success']:.0%} ({lo:.0%}-{hi:.0%})"
        pair = s["paired"]
        kept = s["visual_tokens_kept_mean"]
        kept_s = "-" if kept is None else f"{kept:.0f}/{s['visual_tokens_total']}"
        speed = "-" if s["speedup_vs_unpruned"] is None else f"{s['speedup_vs_unpruned']:.2f}x"
        if not s.get("same_run_as_unpruned", True):
            speed += " *"
        lines.append(
            f"| {s['policy']} ({s['kind']}) | {s['method']} | {s['keep_ratio']} | {kept_s} "
            f"| {s['success']:.0%} ({s['ci95'][0]:.0%}-{s['ci95'][1]:.0%}) | {rel} "
            f"| {pair['only_unpruned_succeeded']} / {pair['only_this_succeeded']} | {per} "
            f"| {s['engine_ms_per_call']:.1f} ({s['mean_batch']:.1f}) "
            f"| {s['engine_ms_per_control_step']:.2f} | {speed} |"
        )
    if not all(s.get("same_run_as_unpruned", True) for s in result["summary"]):
        lines += [
            "",
            "\\* run by another invocation of this benchmark than its unpruned row "
            "(``--resume``, same goals and settings): its success is paired on the same goals, "
            "but its engine times come from another engine process under another load, so "
            "its speedup is not a side-by-side measurement.",
        ]
    for p in result["policies"]:
        if p.get("missing"):
            lines += ["", f"Not run yet for {p['policy']}: {', '.join(p['missing'])}."]
    lines += [
        "",
        "Pruning settings per policy (checkpoint recommendation over the engine defaults):",
        "",
    ]
    for p in result["policies"]:
        how = (
            "configurations interleaved step by step in one roll-out"
            if p.get("interleaved")
            else "configurations one after the other"
        )
        lines.append(
            f"- {p['policy']} ({p['kind']}): K={p['layer']}, action layer {p['action_layer']}, "
            f"semantic rows {p['semantic_rows']!r}, warm-up window {p['window']} requests; "
            f"{how}"
        )
    return "\n".join(lines) + "\n"


def plot_results(result: dict[str, Any], out: Path) -> Path:
    """Per policy: success vs keep ratio (each pruner, CI bars) and engine ms per control
    step vs keep ratio, the unpruned level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p["policy"] for p in result["policies"]]
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for row_axes, name in zip(axes, names, strict=True):
        rows = [s for s in result["summary"] if s["policy"] == name]
        base = next(s for s in rows if s["method"] == "none")
        keeps = sorted({s["keep_ratio"] for s in rows if s["method"] != "none"}) or [1.0]
        for ax, key, label in (
            (row_axes[0], "success", "closed-loop success"),
            (row_axes[1], "engine_ms_per_control_step", "engine ms per control step"),
        ):
            ax.axhline(base[key], color="k", ls="--", label="unpruned")
            for method in sorted({s["method"] for s in rows} - {"none"}):
                pts = sorted((s["keep_ratio"], s) for s in rows if s["method"] == method)
                xs = [k for k, _ in pts]
                ys = [s[key] for _, s in pts]
                if key == "success":
                    err = [
                        # max(0, .): Wilson's bound at 100% is 1 - 1e-16 in floats.
                        [max(0.0, y - s["ci95"][0]) for y, (_, s) in zip(ys, pts)],
                        [max(0.0, s["ci95"][1] - y) for y, (_, s) in zip(ys, pts)],
                    ]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
                else:
                    ax.plot(xs, ys, marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(keeps)
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("keep ratio (visual tokens kept after layer K)")
            ax.set_ylabel(label)
            if key == "success":
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(
                f"{name} ({base['kind']}), {GOAL_NAMES[result['goals']]} goals", fontsize=9
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "success_and_speed_vs_keep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_chunk_overlays(
    records: Sequence[ChunkRunRecord],
    trace: dict[str, list[int]],
    grid: int,
    out: Path,
    name: str,
    chunks: Sequence[int] = (0, 3, 6, 12),
    keep: float = 0.25,
) -> Path:
    """Episode 0's observations at a few chunk requests, both cameras side by side, per
    configuration at ``keep`` (and unpruned): pruned patches dimmed. The kept indices span
    all views (one budget): index ``i`` is view ``i // grid**2``, patch ``i % grid**2``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Records loaded by --resume carry no frames: the figure shows the ones run now (all of
    # them when none of those is at ``keep`` or unpruned).
    with_frames = [r for r in records if r.views]
    rows = [r for r in with_frames if r.method == "none" or r.keep_ratio == keep] or with_frames
    n_req = min((len(r.views) for r in rows), default=0)
    cols = [c for c in chunks if c < n_req] or [0]
    n_views = len(rows[0].views[0]) if rows and rows[0].views else 2
    fig, axes = plt.subplots(
        len(rows),
        len(cols) * n_views,
        figsize=(1.6 * len(cols) * n_views, 1.7 * len(rows)),
        squeeze=False,
    )
    per_view = grid * grid
    for r_i, rec in enumerate(rows):
        for c_i, c in enumerate(cols):
            views = rec.views[min(c, len(rec.views) - 1)] if rec.views else ()
            rid = rec.request_ids[c] if c < len(rec.request_ids) else None
            kept = None if rec.method == "none" or rid is None else _kept_for(trace, rid)
            for v in range(n_views):
                ax = axes[r_i][c_i * n_views + v]
                ax.set_xticks([]), ax.set_yticks([])
                if v >= len(views):
                    continue
                mine = None
                if kept is not None:
                    mine = [i - v * per_view for i in kept if i // per_view == v]
                ax.imshow(overlay(views[v], mine, grid, scale=2))
                if r_i == 0:
                    cam = "fixed" if v == 0 else "wrist"
                    ax.set_title(f"chunk {c} {cam}", fontsize=7)
            if c_i == 0:
                label = "unpruned" if rec.method == "none" else f"{rec.method}@{rec.keep_ratio}"
                axes[r_i][0].set_ylabel(label, fontsize=7)
    fig.suptitle(
        f"{name}: kept patches, both cameras, one budget\n(dimmed: pruned after layer K; "
        "an episode's first chunks are the warm-up)",
        fontsize=8,
    )
    fig.tight_layout()
    path = out / f"kept_patches_{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vla-pruner bench metaworld-oft", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--models",
        type=Path,
        nargs="+",
        default=[OFT_MODEL],
        help=f"checkpoints, OFT or AR (e.g. {OFT_MODEL.name} {AR_MODEL.name}); one table",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metaworld-oft"))
    p.add_argument(
        "--methods", nargs="+", default=None, help="pruners (default: the whole registry)"
    )
    p.add_argument("--keep", type=float, nargs="+", default=list(KEEPS))
    p.add_argument("--tasks", nargs="+", default=None, help="default: the seven tasks")
    p.add_argument("--episodes", type=int, default=20, help="episodes per task")
    p.add_argument(
        "--goals",
        choices=sorted(GOAL_NAMES),
        default="heldout",
        help="report on held-out goals, choose settings on validation goals",
    )
    p.add_argument(
        "--execute-steps",
        type=int,
        default=DEFAULT_EXECUTE_STEPS,
        help="OFT: chunk rows executed before asking again, 1..chunk",
    )
    p.add_argument("--max-steps", type=int, default=None, help="episode cap (default 200)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the configurations an earlier run with the same --out and settings "
        "finished (saved under OUT/runs/); without it they are cleared",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no engine: write the table of the configurations OUT/runs/ holds so far",
    )
    a = p.parse_args(argv)
    unknown = sorted(set(a.methods or []) - set(registry_pruners()))
    if unknown:
        p.error(f"--methods: unknown {unknown}; the registry: {registry_pruners()}")
    for m in a.models:
        if not (m / "config.json").is_file():
            p.error(f"--models: no checkpoint at {m}")
    evaluate_policies(
        a.models,
        a.out,
        a.methods or registry_pruners(),
        a.keep,
        a.tasks,
        a.episodes,
        execute_steps=a.execute_steps,
        goals=a.goals,
        max_steps=a.max_steps,
        resume=a.resume,
        report_only=a.report_only,
    )
    return 0
