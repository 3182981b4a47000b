"""Train the embedded Meta-World VLA: the exact checkpoint format the plugin serves.

``python -m vllm_vla_pruner.research.sim.train --out DIR [--minutes 60] ...``

1. Expert demos (or ``--demos FILE.npz`` from ``python -m vllm_vla_pruner.research.sim.data``).
2. norm_stats (key ``metaworld``, 4 action dims) from the demo actions; a small random
   checkpoint from the checkpoint factory (one DINOv2-family tower, 64 px / patch 8 = 64
   visual tokens, a 4-layer Llama) loaded into :class:`ReferenceOpenVLA`.
3. Teacher-forced training, cross-entropy on the 4 action tokens only, AdamW with warm-up and
   cosine decay over a wall-clock budget, random-shift image augmentation.
4. DAgger rounds: roll out the current policy (expert action executed with probability
   beta), relabel every visited frame with the expert's action, aggregate, keep training.
5. Closed-loop success on validation goals (disjoint from training and from the held-out
   evaluation seeds) after each round; the best checkpoint is written with
   ``save_pretrained`` plus training.json, loss.png and success.png.

A later stage continues an earlier checkpoint (``--init``): that checkpoint is validated
first, so a stage that does not beat it leaves it unchanged; ``--dagger-tasks`` aims the
roll-outs at chosen tasks while training still samples every task.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import (
    NORM_STATS_KEY,
    action_norm_stats,
    collect_expert,
    concat,
    dagger_rollouts,
    load_dataset,
    save_dataset,
)
from .evaluate import ReferencePolicy, evaluate_batched, pixel_values_from_uint8
from .metaworld_env import DEFAULT_TASKS, TASK_INSTRUCTIONS, VAL_SEED_OFFSET, val_seeds

DAGGER_SEED_OFFSET = 10_000


def dagger_seeds(stage: int, round_index: int, n: int) -> list[int]:
    """Goal seeds of one DAgger round: distinct for every (stage, round) of a chained training,
    so a fine-tuning stage visits new goals; all below the validation and held-out seeds."""
    if not 0 <= round_index < 10 or not 0 < n <= 100:
        raise ValueError(f"round {round_index} / {n} seeds: at most 10 rounds of 100 seeds")
    start = DAGGER_SEED_OFFSET + 100 * (10 * stage + round_index)
    if start + n > VAL_SEED_OFFSET:
        raise ValueError(f"stage {stage}: DAgger seeds would reach the validation seeds")
    return list(range(start, start + n))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-shape options :func:`model_overrides` reads (both Meta-World trainers)."""
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--vision-width", type=int, default=128)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--init-gain", type=float, default=0.6)


def max_positions(visual_per_view: int, views: int = 2, text_rows: int = 128) -> int:
    """The Llama's position limit: 256 (the shipped policies) unless two views' visual
    tokens plus prompt, proprio and action rows need more, then the next power of two; a
    fixed 256 made ``--image-size 128`` (256 tokens per view) unservable."""
    need, limit = views * visual_per_view + text_rows, 256
    while limit < need:
        limit *= 2
    return limit


def model_overrides(args: argparse.Namespace, norm_stats: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint-factory overrides of the ``tiny`` preset for the embedded model."""
    from vllm_vla_pruner.config import VisionTowerSpec

    tower = VisionTowerSpec(
        "dinov2",
        args.vision_width,
        args.vision_depth,
        args.vision_width // 32,
        args.patch_size,
        args.vision_width * 4,
        num_registers=4,
        class_token=True,
        layer_scale=True,
    )
    return {
        "image_size": args.image_size,
        "towers": [tower],
        "use_fused_vision_backbone": False,
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 2,  # 4 layers of 192: ~1.5M LLM weights
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 64),
        "tokenizer_vocab_size": 1024,
        "max_position_embeddings": max_positions((args.image_size // args.patch_size) ** 2),
        "dtype": "float32",
        "norm_stats": norm_stats,
        "action_dims": {NORM_STATS_KEY: 4},
        "init_gain": args.init_gain,
    }


def augment(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random shifts of up to ``shift`` px (edge padding), one per image."""
    if shift <= 0:
        return images
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    dx, dy = rng.integers(0, 2 * shift + 1, n), rng.integers(0, 2 * shift + 1, n)
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


class Batcher:
    """Turns dataset rows into (pixel_values, input_ids, labels) for teacher forcing."""

    def __init__(self, model: Any, tasks: list[str], shift: int, seed: int) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.decoder = model.action_decoder
        # Right padding (never attended by real tokens): EOS, since the config's pad id is
        # also the image placeholder id.
        self.pad_id = int(model.config["text_config"].get("eos_token_id", 2))
        self.prompts = [model.prompt_token_ids(TASK_INSTRUCTIONS[t]) for t in tasks]
        self.shift = shift
        self.rng = np.random.default_rng(seed)

    def tokens(self, actions: np.ndarray) -> np.ndarray:
        return np.asarray([self.decoder.encode(a, NORM_STATS_KEY) for a in actions], np.int64)

    def augment(self, images: np.ndarray) -> np.ndarray:
        return augment(images, self.shift, self.rng)

    def __call__(self, images: np.ndarray, task_ids: np.ndarray, act_tokens: np.ndarray) -> tuple:
        torch = self.torch
        seqs = [self.prompts[t] + list(a) for t, a in zip(task_ids, act_tokens, strict=True)]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        for i, (t, s) in enumerate(zip(task_ids, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            p = len(self.prompts[t])
            labels[i, p : len(s)] = torch.tensor(s[p:])
        pix = pixel_values_from_uint8(self.augment(images), self.model.dtype)
        return pix, ids, labels


def _tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    """The files a stage carries over unchanged: tokenizer, chat template, generation config
    (not the weights, config, training record or any stage's plots)."""
    skip = ("config.json", "training.json")
    return {
        f.name: f.read_bytes()
        for f in model_dir.iterdir()
        if f.is_file()
        and f.name not in skip
        and f.suffix != ".png"
        and not f.name.startswith("model")
    }


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def smoothed(history: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``history[key]`` as a running mean over ~1/200 of the steps so far (loss.png curves;
    the chunk trainers' plot too)."""
    steps = np.asarray(history["step"])
    k = max(1, len(steps) // 200)
    return steps[k - 1 :], np.convolve(history[key], np.ones(k) / k, mode="valid")


def plot_val_success(ax: Any, evals: list[dict[str, Any]]) -> None:
    """Validation success per task and their mean against the optimizer step (none: blank)."""
    if not evals:
        return
    xs = [e["step"] for e in evals]
    for task in evals[0]["per_task"]:
        ax.plot(xs, [e["per_task"][task] for e in evals], marker="o", lw=1, label=task)
    ax.plot(xs, [e["mean"] for e in evals], marker="s", color="k", lw=2.5, label="mean")


def plot(history: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(history["step"]):
        ax[0].plot(*smoothed(history, "loss"))
        ax[1].plot(*smoothed(history, "acc"))
    for step in history.get("dagger_steps", []):
        for a in ax:
            a.axvline(step, color="gray", ls=":", lw=1)
    ax[0].set(xlabel="optimizer step", ylabel="action-token cross-entropy", yscale="log")
    ax[1].set(xlabel="optimizer step", ylabel="action-token accuracy", ylim=(0, 1))
    fig.suptitle("Meta-World VLA training (dotted: DAgger aggregation)")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    plot_val_success(ax, history["evals"])
    ax.set(
        xlabel="optimizer step", ylabel="closed-loop success (validation goals)", ylim=(-0.02, 1.02)
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=110)
    plt.close(fig)


def replot_from_logs(logs: list[str], metas: list[str], out: Path) -> None:
    """Loss/success plots over several chained stages (``--init``), from their console logs
    (``step N/.. loss L acc A`` lines) and training.json files; steps continue across stages."""
    import re

    history: dict[str, Any] = {"step": [], "loss": [], "acc": [], "evals": [], "dagger_steps": []}
    offset = 0
    pat = re.compile(r"^step (\d+)/\S+ loss ([\d.]+) acc ([\d.]+)")
    for log, meta_path in zip(logs, metas, strict=True):
        last = 0
        for line in Path(log).read_text().replace("\r", "\n").splitlines():
            m = pat.match(line)
            if m:
                last = int(m.group(1))
                history["step"].append(offset + last)
                history["loss"].append(float(m.group(2)))
                history["acc"].append(float(m.group(3)))
        meta = json.loads(Path(meta_path).read_text())
        for e in meta["history"]["evals"]:
            history["evals"].append({**e, "step": offset + e["step"]})
        history["dagger_steps"] += [offset + s for s in meta["history"]["dagger_steps"]]
        offset += max(last, int(meta.get("optimizer_steps", last)))
    plot(history, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the embedded Meta-World VLA.")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--demos", help="cached demos (.npz from vllm_vla_pruner.research.sim.data)")
    p.add_argument("--init", help="continue from this checkpoint (weights + norm_stats)")
    p.add_argument("--first-round", type=float, default=0.35, help="first DAgger round, fraction")
    p.add_argument("--episodes", type=int, default=40, help="expert episodes per task")
    p.add_argument("--noise", type=float, default=0.3, help="expert execution noise std")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget, all phases")
    p.add_argument("--dagger-rounds", type=int, default=3)
    p.add_argument("--dagger-seeds", type=int, default=8, help="roll-outs per task per round")
    p.add_argument("--dagger-betas", default="0.5,0.2,0.0")
    p.add_argument(
        "--dagger-tasks",
        help="tasks to roll out in DAgger rounds (default: all); training still samples "
        "every task's frames, so a fine-tuning stage can add states where the policy is weak",
    )
    p.add_argument("--val-episodes", type=int, default=4, help="validation episodes per task")
    p.add_argument("--rollout-steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--shift", type=int, default=3, help="random-shift augmentation (px)")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", help="only redraw plots: LOG1,LOG2:META1,META2 of chained stages")
    args = p.parse_args(argv)
    if args.replot:
        logs, metas = args.replot.split(":")
        replot_from_logs(logs.split(","), metas.split(","), Path(args.out))
        return
    command = "python -m vllm_vla_pruner.research.sim.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    train(args, command)


def train(args: argparse.Namespace, command: str) -> None:
    import torch

    from ..checkpoint import build_checkpoint
    from ..reference import ReferenceOpenVLA

    t_start = time.time()
    budget = args.minutes * 60
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    tasks = args.tasks.split(",")
    dagger_tasks = args.dagger_tasks.split(",") if args.dagger_tasks else tasks
    unknown = sorted(set(dagger_tasks) - set(tasks))
    if unknown:
        raise ValueError(f"--dagger-tasks {unknown} are not in --tasks {tasks}")

    if args.demos:
        data = load_dataset(args.demos)
        if list(data["tasks"]) != tasks:
            keep = np.isin(np.asarray(data["tasks"])[data["task_ids"]], tasks)
            remap = np.asarray([tasks.index(t) if t in tasks else -1 for t in data["tasks"]])
            data = {k: v[keep] for k, v in data.items() if k != "tasks"}
            data["task_ids"] = remap[data["task_ids"]].astype(np.int16)
            data["tasks"] = tasks
    else:
        data = collect_expert(
            tasks, args.episodes, args.image_size, seed=args.seed, noise_std=args.noise
        )
        save_dataset(data, work / "demos.npz")
    n_demo_eps = len(np.unique(data["episode_ids"]))
    stats = action_norm_stats(data["actions"], n_demo_eps)
    print(
        f"demos: {len(data['actions'])} frames, {n_demo_eps} episodes; q01 "
        f"{stats['action']['q01']} q99 {stats['action']['q99']}",
        flush=True,
    )

    if args.init:
        # Continue from an earlier stage: its weights, norm_stats and tokenizer.
        init_dir = Path(args.init)
        model = ReferenceOpenVLA.from_pretrained(init_dir)
        if NORM_STATS_KEY not in model.config["norm_stats"]:
            raise ValueError(f"{init_dir} has no norm_stats[{NORM_STATS_KEY!r}]")
        # Action tokens keep their meaning only if the bin range (q01/q99) is unchanged; the
        # rest of the statistics describe the data this stage trains on.
        init_stats = model.config["norm_stats"][NORM_STATS_KEY]
        same_range = all(
            np.allclose(init_stats["action"][q], stats["action"][q]) for q in ("q01", "q99")
        )
        if same_range:
            model.config["norm_stats"][NORM_STATS_KEY] = stats
        else:
            print("note: the data's q01/q99 differ from --init's; keeping --init's", flush=True)
            stats = init_stats
        previous = json.loads((init_dir / "training.json").read_text())
        stages = previous.get("stages", []) + [
            {k: previous.get(k) for k in ("command", "optimizer_steps", "wall_seconds", "frames")}
        ]
        model.source_dir = None
        tok_files = _tokenizer_files(init_dir)
    else:
        stages = []
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = build_checkpoint(
                "tiny",
                Path(tmp) / "init",
                seed=args.seed,
                **model_overrides(args, {NORM_STATS_KEY: stats}),
            )
            model = ReferenceOpenVLA.from_pretrained(init_dir)
            model.source_dir = None  # tokenizer files are written from the tokenizer itself
            tok_files = _tokenizer_files(init_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    model.train()
    batcher = Batcher(model, tasks, args.shift, args.seed)
    tokens = batcher.tokens(data["actions"])
    policy = ReferencePolicy(model, NORM_STATS_KEY)

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(args.seed)
    betas = [float(b) for b in args.dagger_betas.split(",")][: args.dagger_rounds]
    # Phase boundaries as fractions of the *training-time* budget; roll-outs cost extra.
    next_round: int | None = None  # optimizer step of the next DAgger round
    history: dict[str, Any] = {
        "step": [],
        "loss": [],
        "acc": [],
        "evals": [],
        "dagger": [],
        "dagger_steps": [],
    }
    best = -1.0
    step = 0
    train_time = 0.0
    rollout_time = 0.0
    est_total_steps = None

    def save(tag: str, result: Any) -> None:
        model.eval()
        model.save_pretrained(out)
        model.train()
        for name, content in tok_files.items():
            (out / name).write_bytes(content)
        write_meta(tag, result)

    def write_meta(tag: str, result: Any) -> None:
        meta = {
            "command": command,
            "stages": stages,
            "tasks": {t: TASK_INSTRUCTIONS[t] for t in tasks},
            "unnorm_key": NORM_STATS_KEY,
            "args": vars(args),
            "parameters": n_params,
            "optimizer_steps": step,
            "train_seconds": round(train_time, 1),
            "rollout_seconds": round(rollout_time, 1),
            "wall_seconds": round(time.time() - t_start, 1),
            "frames": int(len(data["actions"])),
            "demo_episodes": n_demo_eps,
            "checkpoint": tag,
            "validation": result,
            "history": {k: history[k] for k in ("evals", "dagger", "dagger_steps")},
            "camera": "vllm_vla_pruner.research.sim.metaworld_env.DEFAULT_CAMERA",
        }
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")

    def validate(tag: str) -> float:
        nonlocal rollout_time, best
        t0 = time.time()
        res = evaluate_batched(
            policy.batch,
            tasks,
            args.val_episodes,
            args.image_size,
            seeds=val_seeds(args.val_episodes),
        )
        rollout_time += time.time() - t0
        entry = {
            "step": step,
            "tag": tag,
            "mean": res.mean_success,
            "per_task": {t: r.success_rate for t, r in res.tasks.items()},
            "seconds": round(time.time() - t0, 1),
        }
        history["evals"].append(entry)
        print(
            f"[val {tag}] step {step}: mean {res.mean_success:.2f} {entry['per_task']} "
            f"({entry['seconds']}s)",
            flush=True,
        )
        if res.mean_success >= best:
            best = res.mean_success
            save(tag, entry)
        else:
            write_meta(f"kept earlier best ({best:.2f})", entry)
        plot(history, out)
        return res.mean_success

    phase = 0

    def replan() -> None:
        """Fit the remaining steps into the budget (measured speeds); space the rounds."""
        nonlocal est_total_steps, next_round
        rounds_left = len(betas) - phase
        done = max(1, len(history["evals"]) + len(history["dagger"]))
        per_rollout = rollout_time / done if rollout_time else 0.2 * budget / (len(betas) * 2 + 1)
        left = budget - (time.time() - t_start) - per_rollout * (2 * rounds_left + 1)
        est_total_steps = step + max(50, int(left / (train_time / step)))
        if rounds_left:
            frac = args.first_round if phase == 0 else 1 / (rounds_left + 1)
            next_round = step + int((est_total_steps - step) * frac)
        print(f"planned: {est_total_steps} steps, next DAgger round at {next_round}", flush=True)

    if args.init:
        # The baseline a fine-tuning stage must beat: if no later validation matches it, the
        # checkpoint written is the one we started from.
        validate("init")
    if args.first_round == 0 and betas:
        next_round = 0
    while True:
        if step == 30 and est_total_steps is None:
            print(f"{30 * args.batch / train_time:.0f} samples/s", flush=True)
            replan()
        total = est_total_steps or 10**9
        if phase < len(betas) and next_round is not None and step >= next_round:
            val = validate(f"before DAgger round {phase + 1}") if step >= 100 else None
            t0 = time.time()
            seeds = dagger_seeds(len(stages), phase, args.dagger_seeds)
            new, per_task = dagger_rollouts(
                lambda im, tid: policy.batch(im, [TASK_INSTRUCTIONS[dagger_tasks[i]] for i in tid]),
                dagger_tasks,
                seeds,
                betas[phase],
                args.image_size,
                rng_seed=args.seed + phase,
                max_steps=args.rollout_steps,
            )
            rollout_time += time.time() - t0
            data = concat(data, new)
            save_dataset(data, work / "data.npz")
            tokens = np.concatenate([tokens, batcher.tokens(new["actions"])])
            history["dagger"].append(
                {
                    "round": phase + 1,
                    "beta": betas[phase],
                    "step": step,
                    "frames_added": int(len(new["actions"])),
                    "rollout_success": per_task,
                    "val_before": val,
                    "seconds": round(time.time() - t0, 1),
                }
            )
            history["dagger_steps"].append(step)
            print(
                f"[DAgger {phase + 1}] beta {betas[phase]}: +{len(new['actions'])} frames, "
                f"roll-out success {per_task}",
                flush=True,
            )
            phase += 1
            next_round = None
            if step >= 30:
                replan()
        if est_total_steps and (step >= total or time.time() - t_start > budget * 0.97):
            break
        t0 = time.time()
        idx = rng.integers(0, len(tokens), args.batch)
        pix, ids, labels = batcher(data["images"][idx], data["task_ids"][idx], tokens[idx])
        lr = lr_at(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        res = model(pix, ids, labels)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            lab = res.labels[:, 1:]
            pred = res.logits[:, :-1].argmax(-1)
            m = lab != -100
            acc = float((pred[m] == lab[m]).float().mean())
        train_time += time.time() - t0
        step += 1
        history["step"].append(step)
        loss = res.loss.item()
        history["loss"].append(loss)
        history["acc"].append(acc)
        if step % 50 == 0:
            print(
                f"step {step}/{total if est_total_steps else '?'} loss {loss:.3f} "
                f"acc {acc:.2f} lr {lr:.2e} frames {len(tokens)} "
                f"[{(time.time() - t_start) / 60:.1f} min]",
                flush=True,
            )
        if step % 500 == 0:
            plot(history, out)
    validate("final")
    plot(history, out)
    print(f"done in {(time.time() - t_start) / 60:.1f} min; best validation {best:.2f}", flush=True)


if __name__ == "__main__":
    main()
