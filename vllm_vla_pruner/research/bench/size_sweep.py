"""``vla-pruner bench size-sweep``: at which policy size does pruning pay on this machine?

The first OFT Meta-World policy (``assets/metaworld-oft-4layer``: 2 cameras x 64 visual
tokens, proprio, chunk 8 x 4, a 4-layer Llama of width 128; "shipped" in this sweep's
tables, which were measured when it was the shipped one) is overhead-bound on 2 CPU cores:
VLA-Pruner saves FLOPs the engine never spent time on. This sweep starts from its layout and
scales one axis at a time (visual tokens per camera, LLM width, LLM depth) plus the
combination ``bench-oft`` stands for (OFT-7B's 2 x 256 tokens and 32 layers at width 512).
Every size is a random-initialised checkpoint built exactly as ``research.sim.train_oft``
builds its initial one (the engine's cost does not depend on trained weights), with the
shipped checkpoint's pruning settings.

Per size it measures, on one engine, unpruned vs VLA-Pruner side by side and interleaved
(``engine_bench.run_oft``: fresh images per configuration and repeat), at batch 1 and at the
closed loop's lockstep batch; the FLOPs-ideal speedup of the decoder and of the whole step
(the vision tower, never pruned, included); and the training cost of that size: seconds per
optimiser step of the OFT trainer (``ChunkNet`` forward + backward, bf16 autocast, AdamW,
batch 32, on random data) and what the shipped policy's 3300-step schedule would take.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_vla_pruner.metrics import ModelDims, prefill_flops, vit_flops

#: The sweep's base layout: the 4-layer policy (the shipped OFT policy grew from it to 8 layers,
#: the depth this sweep found pruning to pay at).
SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "metaworld-oft-4layer"
NORM_KEY = "metaworld"
#: The shipped policy's schedule (TRAINING.md) and batch; its execute_steps per chunk.
SCHEDULE_STEPS = 3300
TRAIN_BATCH = 32
EXECUTE_STEPS = 4
#: Lockstep robots per engine call in the Meta-World closed loop (chunk_benchmark runs
#: ~14-35 running episodes per call; 16 is the lower, 2-core-affordable end).
CLOSED_LOOP_BATCH = 16
#: Engine starts per size (a shared machine's memory comes and goes).
ENGINE_ATTEMPTS = 3
ENGINE_MEMORY_GB = 3.0
#: "Pruning pays": engine time per control step unpruned / pruned at least this.
PAYS = 1.3


@dataclass(frozen=True)
class Size:
    """One policy size in the shipped layout; only these four numbers change."""

    name: str
    axis: str
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    layers: int = 4

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SIZES: tuple[Size, ...] = (
    Size("shipped", "base"),
    Size("tokens-256", "visual tokens", image_size=128),
    Size("width-256", "width", hidden=256),
    Size("width-512", "width", hidden=512),
    Size("depth-8", "depth", layers=8),
    Size("depth-16", "depth", layers=16),
    Size("depth-32", "depth", layers=32),
    Size("bench-oft", "combined", image_size=128, hidden=512, layers=32),
)


def sizes_by_name(names: list[str] | None) -> list[Size]:
    """The chosen sizes in the sweep's order; unknown names raise naming the valid ones."""
    known = {s.name: s for s in SIZES}
    if not names:
        return list(SIZES)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown size(s) {bad}; choose from {sorted(known)}")
    return [s for s in SIZES if s.name in names]


# --- pure arithmetic (unit-tested) --------------------------------------------------------


def ms_per_control_step(chunk_ms: float, batch: int, execute: int = EXECUTE_STEPS) -> float:
    """Engine time per executed action: one call serves ``batch`` robots, each executing
    ``execute`` rows of its chunk (``chunk_benchmark``'s *engine ms / control step*)."""
    return chunk_ms / (batch * execute)


def best_of_ratio(base_ms: list[float], pruned_ms: list[float]) -> float:
    """Unpruned / pruned time of each configuration's least-disturbed repeat: on a shared
    machine interference only adds time, so the minima are the closest to what the engine
    costs; the median ratio is reported beside it."""
    return min(base_ms) / min(pruned_ms)


def spread(samples_ms: list[float]) -> float:
    """Slowest / fastest repeat of one configuration: how much the load disturbed it."""
    return max(samples_ms) / min(samples_ms)


def whole_step_ideal(decoder_full: float, decoder_pruned: float, vision: float) -> float:
    """FLOPs-ideal speedup of a whole chunk: the vision towers run in both configurations
    (visual tokens are made before the LLM prunes them)."""
    return (decoder_full + vision) / (decoder_pruned + vision)


def step_flops(
    dims: ModelDims,
    rows: int,
    visual: int,
    kept: int,
    layer_k: int,
    tower: dict[str, Any],
    views: int,
) -> dict[str, float]:
    """Decoder FLOPs unpruned / pruned (``prefill_flops``) and the towers' FLOPs of one
    request (``views`` images of ``visual / views`` patches plus class and register tokens)."""
    per_view = visual // views + int(tower.get("class_token", False))
    per_view += int(tower.get("num_registers", 0))
    vision = views * vit_flops(tower["width"], tower["mlp_hidden"], tower["depth"], per_view)
    return {
        "decoder_full": prefill_flops(dims, rows, rows, layer_k),
        "decoder_pruned": prefill_flops(dims, rows, rows - (visual - kept), layer_k),
        "vision": vision,
    }


def micro_batch(batch: int, bytes_per_sample: float, budget_bytes: float) -> int:
    """The largest divisor of ``batch`` whose activations fit ``budget_bytes`` (at least 1):
    a size whose batch-32 step would not fit memory is timed as gradient accumulation over
    micro-batches, the way it would have to be trained here."""
    for m in range(batch, 0, -1):
        if batch % m == 0 and m * bytes_per_sample <= budget_bytes:
            return m
    return 1


def activation_bytes(size: Size, rows: int, vision_width: int = 128) -> float:
    """A generous estimate of the training activations one sample keeps for backward:
    per decoder layer ~16 row vectors of the width and 5 of the MLP (bf16 and fp32 copies),
    and the attention probabilities; per tower layer the same for its patches."""
    heads = max(1, size.hidden // 64)
    layer = rows * (16 * size.hidden + 5 * 2 * size.hidden) * 4 + 2 * heads * rows * rows * 4
    tokens = size.tokens_per_view + 5
    tower = 2 * 4 * (tokens * 26 * vision_width * 4 + 2 * 2 * tokens * tokens * 4)
    return size.layers * layer + tower


def hours(seconds_per_step: float, steps: int = SCHEDULE_STEPS) -> float:
    return seconds_per_step * steps / 3600


def smallest_paying(rows: list[dict[str, Any]], batch: int, threshold: float = PAYS) -> str | None:
    """Name of the size, among those whose measured speedup per control step at ``batch``
    reaches ``threshold``, that is cheapest to train (lowest ``train.ratio_to_shipped``)."""
    paying = [
        r
        for r in rows
        if str(batch) in r["engine"] and r["engine"][str(batch)]["speedup"] >= threshold
    ]
    if not paying:
        return None
    return min(paying, key=lambda r: r["train"].get("ratio_to_shipped", float("inf")))["size"][
        "name"
    ]


# --- checkpoints and measurements ---------------------------------------------------------


def trainer_args(size: Size) -> argparse.Namespace:
    """``train_oft``'s model options for this size (its own parser defaults otherwise)."""
    from vllm_vla_pruner.research.sim.train import add_model_args
    from vllm_vla_pruner.research.sim.train_oft import CHUNK

    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(
        [
            "--image-size", str(size.image_size), "--patch-size", str(size.patch_size),
            "--hidden", str(size.hidden), "--layers", str(size.layers),
        ]
    )  # fmt: skip
    args.chunk, args.seed = CHUNK, 0
    return args


def build_size(size: Size, out: Path) -> Path:
    """The trainer's initial checkpoint of this size, with the shipped checkpoint's action
    and proprio statistics and its pruning settings (``vla_pruner`` section)."""
    from vllm_vla_pruner.config import load_config_json
    from vllm_vla_pruner.research.sim.train_oft import build_init_checkpoint

    shipped = load_config_json(SHIPPED)
    if not (out / "config.json").exists():
        stats = shipped["norm_stats"][NORM_KEY]
        build_init_checkpoint(out, trainer_args(size), stats)
        cfg = json.loads((out / "config.json").read_text())
        cfg["vla_pruner"] = dict(shipped["vla_pruner"])
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def shipped_seconds_per_step() -> float:
    """The shipped policy's recorded optimiser time per step (its training.json)."""
    meta = json.loads((SHIPPED / "training.json").read_text())
    return float(meta["train_seconds"]) / int(meta["optimizer_steps"])


class _Trainer:
    """One OFT trainer step (``train_oft``'s: ChunkNet forward under bf16 autocast, L1 loss,
    backward, clip, AdamW) on random data, as gradient accumulation over micro-batches."""

    def __init__(self, model_dir: Path, size: Size, batch: int, mem_budget_gb: float) -> None:
        import torch

        from vllm_vla_pruner.research.reference_oft import ReferenceOFT
        from vllm_vla_pruner.research.sim.metaworld_env import DEFAULT_TASKS
        from vllm_vla_pruner.research.sim.train_oft import ChunkNet

        self.torch, self.size, self.batch = torch, size, batch
        self.model = ReferenceOFT.from_pretrained(model_dir, NORM_KEY)
        self.model.train()
        self.net = ChunkNet(self.model, list(DEFAULT_TASKS))
        self.n_tasks = len(DEFAULT_TASKS)
        self.rows = int(self.net.lens.max())
        self.micro = micro_batch(batch, activation_bytes(size, self.rows), mem_budget_gb * 2**30)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=1e-3,
            betas=(0.9, 0.95),
        )
        self.rng = np.random.default_rng(0)

    def samples_timed(self, max_samples: int) -> int:
        """Samples a step with ``max_samples`` runs: whole micro-batches, at least one."""
        return self.micro * max(1, min(self.batch // self.micro, max_samples // self.micro))

    def step(self, max_samples: int) -> float:
        """Seconds of one optimiser step of ``batch`` samples; when ``max_samples`` < batch
        only that many samples' micro-batches run and their time is scaled to the batch
        (accumulated micro-batches are identical work)."""
        from vllm_vla_pruner.research.sim.evaluate import pixel_values_from_uint8
        from vllm_vla_pruner.research.sim.train import augment

        torch, rng, m, side = self.torch, self.rng, self.micro, self.size.image_size
        n_micro = self.batch // m
        run = self.samples_timed(max_samples) // m
        self.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        for _ in range(run):
            imgs = rng.integers(0, 256, (2, m, side, side, 3), dtype=np.uint8)
            fixed = pixel_values_from_uint8(augment(imgs[0], 3, rng))
            wrist = pixel_values_from_uint8(augment(imgs[1], 3, rng))
            state = rng.normal(0.3, 0.1, (m, 4)).astype(np.float32)
            chunk = self.net.spec.chunk
            label = torch.from_numpy(rng.uniform(-1, 1, (m, chunk, 4)).astype(np.float32))
            tids = rng.integers(0, self.n_tasks, m)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = self.net.forward(fixed, wrist, state, tids)
            loss = torch.nn.functional.l1_loss(pred.float(), label) * (m / self.batch)
            loss.backward()
        micro_s = (time.perf_counter() - t0) * n_micro / run
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return micro_s + time.perf_counter() - t1


def time_training(
    model_dir: Path,
    size: Size,
    reference_dir: Path,
    batch: int = TRAIN_BATCH,
    steps: int = 2,
    max_samples: int = 8,
    mem_budget_gb: float = 2.0,
    threads: int = 1,
) -> dict[str, Any]:
    """Seconds per optimiser step of this size and of the shipped size, interleaved in one
    process (one untimed step each, then ``steps`` pairs), so their ratio holds under any
    load; ``anchored_*``: the ratio times the shipped run's recorded seconds per step."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mine = _Trainer(model_dir, size, batch, mem_budget_gb)
    params = sum(p.numel() for p in mine.model.parameters())
    # Weights, gradients and AdamW's two moments (fp32), plus one micro-batch's activations.
    need_gb = (16 * params + mine.micro * activation_bytes(size, mine.rows)) / 2**30
    if not _wait_for_memory(need_gb + 1.0):
        return {
            "parameters": params,
            "rows": mine.rows,
            "skipped": f"less than "
            f"{need_gb + 1:.1f} GB available for 10 min: not timed (others' jobs)",
        }
    ref = _Trainer(reference_dir, SIZES[0], batch, mem_budget_gb)
    mine.step(min(max_samples, mine.micro))
    ref.step(batch)
    t_mine, t_ref = [], []
    for _ in range(steps):
        t_ref.append(ref.step(batch))
        t_mine.append(mine.step(max_samples))
    sec, sec_ref = statistics.median(t_mine), statistics.median(t_ref)
    anchored = sec / sec_ref * shipped_seconds_per_step()
    return {
        "parameters": sum(p.numel() for p in mine.model.parameters()),
        "rows": mine.rows,
        "batch": batch,
        "micro_batch": mine.micro,
        "samples_timed": mine.samples_timed(max_samples),
        "threads": threads,
        "step_s": t_mine,
        "shipped_step_s": t_ref,
        "s_per_step": sec,
        "ratio_to_shipped": sec / sec_ref,
        "anchored_s_per_step": anchored,
        "schedule_steps": SCHEDULE_STEPS,
        "anchored_schedule_hours": hours(anchored),
        "measured_schedule_hours": hours(sec),
    }


def measure_size(
    size: Size,
    work: Path,
    batches: tuple[int, ...],
    keep: float,
    repeats: int,
    train_steps: int,
    mem_budget_gb: float,
    threads: int = 1,
) -> dict[str, Any]:
    """Engine (unpruned vs VLA-Pruner, interleaved) and trainer cost of one size."""
    from vllm_vla_pruner.config import load_config_json
    from vllm_vla_pruner.research.bench.engine_bench import run_oft

    ckpt = build_size(size, work / size.name)
    cfg = load_config_json(ckpt)
    load_before = _loadavg()
    t0 = time.time()
    for attempt in range(ENGINE_ATTEMPTS):
        _wait_for_memory(ENGINE_MEMORY_GB)  # vLLM asks for its KV pool up front
        try:
            out = run_oft(
                ckpt,
                work / size.name / "engine",
                batches,
                (keep,),
                ("vlapruner",),
                repeats,
                None,
                progress=False,
                print_table=False,
            )
            break
        except RuntimeError as e:  # vLLM refuses to start when others hold the memory
            if attempt + 1 == ENGINE_ATTEMPTS:
                raise
            print(f"[size-sweep] {size.name}: engine failed ({e}); retrying in 60 s", flush=True)
            time.sleep(60)
    engine_s = time.time() - t0
    dims = ModelDims.from_config(cfg)
    tower = cfg["vision_towers"][0]
    engine: dict[str, Any] = {}
    for b in batches:
        rs = {r["method"]: r for r in out["results"] if r["batch"] == b}
        base, pr = rs["none"], rs["vlapruner"]
        f = step_flops(
            dims,
            out["prompt_rows"],
            out["visual_tokens"],
            pr["visual_tokens_kept"],
            out["layer_k"],
            tower,
            out["views"],
        )
        b_ms, p_ms = base["chunk_ms_samples"], pr["chunk_ms_samples"]
        engine[str(b)] = {
            "unpruned_ms_per_control_step": ms_per_control_step(min(b_ms), b),
            "pruned_ms_per_control_step": ms_per_control_step(min(p_ms), b),
            "unpruned_chunk_ms_samples": b_ms,
            "pruned_chunk_ms_samples": p_ms,
            "speedup": best_of_ratio(b_ms, p_ms),
            "speedup_median": pr["chunk_speedup"],
            "flops_ideal_decoder": pr["flops_ideal_speedup"],
            "flops_ideal_whole": whole_step_ideal(**f),
            "vision_share_of_flops": f["vision"] / (f["decoder_full"] + f["vision"]),
            "kept": pr["visual_tokens_kept"],
            "used_history": pr["used_history"],
            "select_share": pr["select_share"],
        }
    t1 = time.time()
    reference = build_size(SIZES[0], work / SIZES[0].name)
    train = time_training(
        ckpt, size, reference, steps=train_steps, mem_budget_gb=mem_budget_gb, threads=threads
    )
    return {
        "size": {**asdict(size), "tokens_per_view": size.tokens_per_view},
        "prompt_rows": out["prompt_rows"],
        "visual_tokens": out["visual_tokens"],
        "layer_k": out["layer_k"],
        "window": out["window"],
        "repeats": repeats,
        "engine": engine,
        "train": train,
        "load_before": load_before,
        "load_after_engine": out["load_after"],
        "load_after": _loadavg(),
        "engine_seconds": round(engine_s, 1),
        "train_seconds": round(time.time() - t1, 1),
    }


def _mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _wait_for_memory(gb: float, patience_s: float = 600.0) -> bool:
    """Wait until ``gb`` GB are available (the machine is shared: an out-of-memory kill
    could hit someone else's job); False after ``patience_s``."""
    t0 = time.time()
    while _mem_available_gb() < gb:
        if time.time() - t0 > patience_s:
            return False
        time.sleep(15)
    return True


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- report -------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    rows, batches = result["rows"], result["batches"]
    loads = [r["load_before"][0] for r in rows]
    minutes = sum(r.get("engine_seconds", 0) + r.get("train_seconds", 0) for r in rows) / 60
    lines = [
        "# Where pruning pays: OFT policy size sweep on this machine",
        "",
        f"Layout of the shipped Meta-World OFT policy (2 cameras, proprio, chunk 8 x 4, "
        f"{EXECUTE_STEPS} actions executed per chunk), one axis scaled at a time; random "
        "weights in the trainer's layout (`train_oft`'s initial checkpoint of that size); the "
        f"shipped pruning settings (K={rows[0]['layer_k']}, semantic rows last, warm-up "
        f"{rows[0]['window']} frames). VLA-Pruner keep {result['keep']} vs unpruned on one "
        f"engine per size, interleaved, {result['repeats']} repeats, fresh images per "
        "configuration and repeat.",
        "",
        "- *speedup*: unpruned / pruned time of each configuration's fastest repeat (on a shared "
        "machine interference only adds time); *median*: the same from the medians (what "
        "`bench engine` prints); *spread*: slowest / fastest repeat, unpruned / pruned (how "
        "much the load disturbed that size: 1.0 would be a quiet machine).",
        "",
        f"- *ms / step*: engine wall time of one call (fastest repeat) / (batch x "
        f"{EXECUTE_STEPS} executed actions), i.e. engine time per control step per robot.",
        "- *FLOPs-ideal dec / whole*: unpruned / pruned FLOPs of the decoder alone (what "
        "`bench engine` prints) and of the whole step (the vision tower, which pruning cannot "
        "skip, included); *vision*: the tower's share of the unpruned FLOPs.",
        f"- *train s/step*: the OFT trainer's optimiser step at batch {TRAIN_BATCH} (ChunkNet "
        "forward + backward under bf16 autocast, clip, AdamW; random data), "
        f"{result['train_threads']} torch thread(s), measured interleaved with the shipped "
        "size's step in one process; *micro*: samples per micro-batch (gradient accumulation "
        f"where batch {TRAIN_BATCH} does not fit {result['mem_budget_gb']} GB of activations); "
        "where fewer than 32 samples were timed their time is scaled to 32. *x shipped*: that "
        f"ratio; *{SCHEDULE_STEPS} steps*: the ratio times the shipped run's recorded "
        f"{result['shipped_recorded_s_per_step']:.2f} s/step (training.json) times the shipped "
        "schedule, optimiser only (DAgger and validation roll-outs come on top: 25 min for "
        "the shipped run, growing with inference cost).",
        "",
        f"Machine: {os.cpu_count()} CPU cores shared with other jobs (a Meta-World benchmark, "
        "engine tests, a training run); run under `nice -n 5`; 1-minute load average at each "
        f"size's start {min(loads):.0f}-{max(loads):.0f} (last column); "
        f"{minutes:.0f} min of measurement in all. Absolute times move with the load; the "
        "ratios (speedup, x shipped) are each measured side by side in one run.",
        "",
        "| size | axis | tokens/cam | width | depth | params | batch | unpruned ms/step "
        "| pruned ms/step | speedup | median | spread | FLOPs-ideal dec / whole | vision "
        "| train s/step (micro) "
        f"| x shipped | {SCHEDULE_STEPS} steps | load 1 min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, t = r["size"], r["train"]
        for i, b in enumerate(batches):
            e = r["engine"][str(b)]
            head = (
                f"| {s['name']} | {s['axis']} | {s['tokens_per_view']} | {s['hidden']} "
                f"| {s['layers']} | {t['parameters'] / 1e6:.1f}M"
                if i == 0
                else "| | | | | |"
            )
            if i:
                tail = "| | | | |"
            elif "skipped" in t:
                tail = f"| not timed | - | - | {r['load_before'][0]:.0f} |"
            else:
                tail = (
                    f"| {t['s_per_step']:.1f} ({t['micro_batch']}) "
                    f"| {t['ratio_to_shipped']:.1f}x | {t['anchored_schedule_hours']:.1f} h "
                    f"| {r['load_before'][0]:.0f} |"
                )
            lines.append(
                f"{head} | {b} | {e['unpruned_ms_per_control_step']:.2f} "
                f"| {e['pruned_ms_per_control_step']:.2f} | **{e['speedup']:.2f}x** "
                f"| {e['speedup_median']:.2f}x "
                f"| {spread(e['unpruned_chunk_ms_samples']):.1f} / "
                f"{spread(e['pruned_chunk_ms_samples']):.1f} "
                f"| {e['flops_ideal_decoder']:.2f}x / {e['flops_ideal_whole']:.2f}x "
                f"| {100 * e['vision_share_of_flops']:.0f}% {tail}"
            )
    cmd = (
        "nice -n 5 vla-pruner bench size-sweep --batch "
        + " ".join(map(str, batches))
        + f" --keep {result['keep']} --repeats {result['repeats']}"
        + f" --train-steps {result.get('train_steps', 2)} --mem-gb {result['mem_budget_gb']}"
    )
    lines += ["", f"Reproduce: `{cmd}` (add `--resume` to continue a stopped run).", ""]
    lines += ["## Conclusion", "", *result["conclusion"], ""]
    return "\n".join(lines)


def conclusion(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> list[str]:
    """Plain statements from the numbers: where pruning pays, what training it costs."""
    out = []
    by_name = {r["size"]["name"]: r for r in rows}
    for b in batches:
        name = smallest_paying(rows, b)
        if name is None:
            best = ", ".join(
                f"{r['size']['name']} {r['engine'][str(b)]['speedup']:.2f}x" for r in rows
            )
            out.append(f"- Batch {b}: no size reached {PAYS}x per control step ({best}).")
            continue
        r = by_name[name]
        e, t = r["engine"][str(b)], r["train"]
        if "skipped" in t:
            out.append(
                f"- Batch {b}: the cheapest paying size is **{name}** ({e['speedup']:.2f}x); "
                f"its training was {t['skipped']}."
            )
            continue
        out.append(
            f"- Batch {b}: the cheapest size to train that reaches {PAYS}x per control step is "
            f"**{name}** ({e['speedup']:.2f}x, median {e['speedup_median']:.2f}x, FLOPs-ideal "
            f"{e['flops_ideal_whole']:.2f}x whole "
            f"step); training it here: {t['ratio_to_shipped']:.1f}x the shipped policy's "
            f"optimiser time, about {t['anchored_schedule_hours']:.1f} h for "
            f"{SCHEDULE_STEPS} steps on 2 cores."
        )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, batches = result["rows"], result["batches"]
    names = [r["size"]["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        sp = [r["engine"][str(b)]["speedup"] for r in rows]
        ax.bar(
            x + (i - (len(batches) - 1) / 2) * width, sp, width, label=f"fastest repeats, batch {b}"
        )
        med = [r["engine"][str(b)]["speedup_median"] for r in rows]
        ax.plot(x + (i - (len(batches) - 1) / 2) * width, med, "k.", ms=5)
    ax.plot([], [], "k.", label="median-based ratio")
    ideal_w = [r["engine"][str(batches[0])]["flops_ideal_whole"] for r in rows]
    ideal_d = [r["engine"][str(batches[0])]["flops_ideal_decoder"] for r in rows]
    ax.plot(x, ideal_d, "k_", ms=22, mew=2, label="FLOPs-ideal (decoder)")
    ax.plot(x, ideal_w, "r_", ms=22, mew=2, label="FLOPs-ideal (whole step)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(PAYS, color="gray", lw=0.8, ls=":")
    labels = [
        f"{n}\n{r['size']['tokens_per_view']}t w{r['size']['hidden']} d{r['size']['layers']}"
        for n, r in zip(names, rows)
    ]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel(f"unpruned / VLA-Pruner {result['keep']} time per control step")
    ax.set_title("Where pruning pays on 2 CPU cores (OFT Meta-World layout)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    sizes: list[Size],
    out_dir: Path,
    batches: tuple[int, ...] = (1, CLOSED_LOOP_BATCH),
    keep: float = 0.25,
    repeats: int = 5,
    train_steps: int = 2,
    mem_budget_gb: float = 2.0,
    threads: int = 1,
    work: Path | None = None,
    resume: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Measure every size (``resume``: keep those already in WORK/rows.json; ``report_only``:
    measure nothing, report those) and write the report."""
    resume = resume or report_only
    work = work or Path(tempfile.gettempdir()) / "vla-pruner-size-sweep"
    t0 = time.time()
    load_before = _loadavg()
    done = (
        json.loads((work / "rows.json").read_text())
        if resume and (work / "rows.json").exists()
        else []
    )
    done = {
        r["size"]["name"]: r
        for r in done
        if r["repeats"] == repeats and sorted(r["engine"]) == sorted(map(str, batches))
    }
    rows = []
    for size in sizes:
        if size.name in done:
            print(f"[size-sweep] {size.name}: measured earlier in {work} (--resume)", flush=True)
            rows.append(done[size.name])
            continue
        if report_only:
            print(f"[size-sweep] {size.name}: not measured (--report-only)", flush=True)
            continue
        print(f"[size-sweep] {size.name}: load {_loadavg()}", flush=True)
        rows.append(
            measure_size(size, work, batches, keep, repeats, train_steps, mem_budget_gb, threads)
        )
        r = rows[-1]
        print(
            f"[size-sweep] {size.name}: "
            + ", ".join(
                f"batch {b} {r['engine'][str(b)]['speedup']:.2f}x "
                f"(ideal {r['engine'][str(b)]['flops_ideal_whole']:.2f}x)"
                for b in batches
            )
            + f"; train {r['train'].get('s_per_step', 'not timed')} s/step "
            f"({r['engine_seconds']} s engine, {r['train_seconds']} s train)",
            flush=True,
        )
        (work / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")  # survives a crash
    result = {
        "batches": list(batches),
        "keep": keep,
        "repeats": repeats,
        "mem_budget_gb": mem_budget_gb,
        "train_threads": threads,
        "train_steps": train_steps,
        "shipped_recorded_s_per_step": shipped_seconds_per_step(),
        "load_before": load_before,
        "load_after": _loadavg(),
        "minutes": (time.time() - t0) / 60,
        "rows": rows,
    }
    report(result, out_dir)
    return result


def report(result: dict[str, Any], out_dir: Path) -> None:
    """size-sweep.json, size-sweep.md (table + conclusion) and speedup_vs_size.png."""
    result["conclusion"] = conclusion(result["rows"], tuple(result["batches"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "size-sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "size-sweep.md").write_text(markdown(result))
    plot(result, out_dir / "speedup_vs_size.png")
    print(markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vla-pruner bench size-sweep", description=__doc__)
    p.add_argument("--out", default="benchmarks/results/oft-size-sweep")
    p.add_argument("--sizes", nargs="+", help=f"subset of {[s.name for s in SIZES]} (default: all)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, CLOSED_LOOP_BATCH])
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=2, help="timed optimiser steps per size")
    p.add_argument("--mem-gb", type=float, default=2.0, help="activation budget of a step")
    p.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads of the trainer timing (1: 2 OpenMP threads spin badly on busy cores)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the sizes already measured in WORK/rows.json (same repeats and batches)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="measure nothing: report WORK/rows.json"
    )
    p.add_argument("--work", help="where the checkpoints are built (default: temp dir)")
    args = p.parse_args(argv)
    if not 0 < args.keep < 1:
        p.error("--keep must be in (0, 1)")
    sizes = sizes_by_name(args.sizes)
    run(
        sizes,
        Path(args.out),
        tuple(args.batch),
        args.keep,
        args.repeats,
        args.train_steps,
        args.mem_gb,
        args.train_threads,
        Path(args.work) if args.work else None,
        args.resume,
        args.report_only,
    )
    return 0
