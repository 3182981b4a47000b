"""What the OFT and pi0 Meta-World trainers share: one run's data, schedule and bookkeeping.

Both trainers (:mod:`.train_oft`, L1 on the chunk; :mod:`.train_pi0`, flow matching) learn
a two-camera, proprio, chunked policy from the same demos with the same recipe, so the recipe
lives here once: the CLI flags they share, the data and its DAgger aggregation, AdamW with
warm-up + cosine, random-shift batches, closed-loop validation that keeps the best weights,
``training.json``, ``loss.png`` and the resumable ``_work/state.pt``. A trainer supplies only
what depends on its model, as :class:`Hooks` (loss on a batch, batched policy, checkpoint
writer, action normalisation, extra metadata and state).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metaworld_env import DEFAULT_TASKS, TASK_INSTRUCTIONS, val_seeds
from .oft_data import chunk_index, dagger_rollouts, load_dataset, save_dataset
from .train import add_model_args, augment, dagger_seeds, lr_at, plot_val_success, smoothed

#: A batched policy for roll-outs: (fixed uint8, wrist uint8, raw state, task ids) -> chunks.
Policy = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def grow_from(model: Any, source: Any, new_layers: list[Any], source_dir: Path) -> int:
    """Load ``source``'s weights into ``model``, a deeper copy of its architecture.

    Every tensor of ``model`` takes the same-named, same-shaped one of ``source``, except in
    ``new_layers`` (the transformer layers ``source`` lacks), which start as identities:
    their attention ``o_proj`` and MLP ``down_proj`` are zero, so each residual branch adds
    nothing and the grown policy starts as exactly the source's function (depth is where
    pruning pays on this hardware; growing keeps what the shallow policy learnt). Returns
    the number of new layers; any other mismatch is an error naming the weight.
    """
    import torch

    theirs = source.state_dict()
    fresh_ids = {id(layer) for layer in new_layers}
    fresh = tuple(n + "." for n, m in model.named_modules() if id(m) in fresh_ids)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in theirs and theirs[name].shape == tensor.shape:
                tensor.copy_(theirs[name])
            elif not name.startswith(fresh):
                raise ValueError(f"--init-from {source_dir}: {name} has no same-shaped source")
        for layer in new_layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return len(new_layers)


def add_init_from_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--init-from``: a trained checkpoint of this trainer to start from (both trainers)."""
    p.add_argument(
        "--init-from",
        type=Path,
        help=f"a trained {what} checkpoint to start from (its statistics too); with more "
        "--layers than it has, the new layers start as identities",
    )


def add_run_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The flags both trainers take; ``defaults`` overrides per trainer (e.g. ``batch=32``)."""
    d = {"val_episodes": 4, "rollout_steps": 200, "batch": 64, "lr": 5e-4, "chunk": 8}
    d.update(defaults)
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--demos", required=True, help=".npz from research.sim.oft_data")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--resume", action="store_true", help="continue from OUT/_work/state.pt")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    p.add_argument("--stop-at", type=int, default=None, help="stop (validated, saved) at this step")
    p.add_argument(
        "--stop-after-minutes",
        type=float,
        default=None,
        help="stop (validated, saved) once this invocation has run this long",
    )
    p.add_argument("--dagger-at", default="", help="steps of DAgger rounds, e.g. 1200,2000")
    p.add_argument("--dagger-betas", default="0.3,0.0")
    p.add_argument("--dagger-seeds", type=int, default=8, help="roll-outs per task per round")
    p.add_argument(
        "--dagger-task-seeds",
        default="",
        help="roll-outs per round for named tasks, overriding --dagger-seeds "
        "(aim DAgger at the weak tasks), e.g. window-open-v3=24,window-close-v3=24",
    )
    p.add_argument(
        "--dagger-stage",
        type=int,
        default=0,
        help="goal-seed stage of the DAgger rounds: a run started from another run's data "
        "takes a new stage so its rounds visit new goals",
    )
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument(
        "--val-episodes",
        type=int,
        default=d["val_episodes"],
        help="validation episodes per task (0: none)",
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--execute", type=int, default=4, help="chunk actions executed per request")
    p.add_argument("--chunk", type=int, default=d["chunk"])
    p.add_argument("--rollout-steps", type=int, default=d["rollout_steps"])
    p.add_argument("--batch", type=int, default=d["batch"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--shift", type=int, default=3, help="random-shift augmentation (px)")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (float32 weights; CPU AVX512-BF16)"
    )
    p.add_argument("--seed", type=int, default=0)


def command_line(module: str, argv: list[str] | None) -> str:
    """The invocation as a shell line (kept in training.json and state.pt)."""
    return f"python -m {module} " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )


@dataclass
class Batch:
    """One training batch before the model's own input conversion."""

    fixed: np.ndarray  # uint8 [B, S, S, 3], random-shifted
    wrist: np.ndarray  # uint8 [B, S, S, 3], random-shifted
    state: np.ndarray  # raw proprio [B, 4] + N(0, 0.005) noise (float64)
    task_ids: np.ndarray
    rows: np.ndarray  # [B, C]: each frame's chunk rows into the run's targets


def _nothing() -> None:
    return None


def _ignore(saved: dict[str, Any]) -> None:
    return None


@dataclass
class Hooks:
    """The model-specific parts of a run."""

    policy: Policy
    loss: Callable[[Batch], Any]  # differentiable scalar on a batch
    normalize_actions: Callable[[np.ndarray], Any]  # all frames' actions -> targets
    save_checkpoint: Callable[[int], None]  # the served layout at this step, into OUT
    meta_head: dict[str, Any]  # training.json keys after "tasks"
    meta_tail: dict[str, Any]  # training.json keys at the end
    plot_kwargs: dict[str, str] = field(default_factory=dict)
    on_step: Callable[[ChunkRun, float, float], None] | None = None  # (run, loss, lr)
    log: Callable[[str], None] = print
    reset_policy: Callable[[], None] = _nothing  # before every roll-out round
    extra_state: Callable[[], dict[str, Any]] = dict  # more state.pt keys (after "rng")
    load_extra_state: Callable[[dict[str, Any]], None] = _ignore


class ChunkRun:
    """One run: its directory, data (DAgger-aggregated), optimiser, history and RNG.

    Construction seeds torch, reads the data (``_work/data.npz`` after a DAgger round of a
    resumed run) and checks its tasks; :meth:`start` builds the optimiser for the trainer's
    model and restores ``_work/state.pt``; :meth:`loop` trains.
    """

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        self.args = args
        self.out = Path(args.out)
        self.work = self.out / "_work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.init_dir = self.work / "init"
        self.tasks = args.tasks.split(",")
        self.state_path = self.work / "state.pt"
        self.commands = [command]  # every invocation of this run, resumptions included
        self.resumed = args.resume and self.state_path.exists()
        # DAgger rounds save the aggregated data; before the first one the demos are the data.
        self.aggregated = self.work / "data.npz"
        use_aggregated = self.resumed and self.aggregated.exists()
        self.data = load_dataset(self.aggregated if use_aggregated else args.demos)
        if list(self.data["tasks"]) != self.tasks:
            raise ValueError(f"dataset tasks {self.data['tasks']} != --tasks {self.tasks}")
        self.n_eps = len(np.unique(self.data["episode_ids"]))
        self.history: dict[str, Any] = {
            "step": [],
            "loss": [],
            "evals": [],
            "dagger": [],
            "dagger_steps": [],
        }
        self.step, self.best, self.train_time, self.rollout_time = 0, -1.0, 0.0, 0.0
        self.rng = np.random.default_rng(args.seed)

    def start(self, model: Any, hooks: Hooks) -> None:
        """AdamW (decay on matrices only) over ``model``; resume from state.pt if asked."""
        import torch

        args = self.args
        self.model, self.hooks = model, hooks
        self.n_params = sum(p.numel() for p in model.parameters())
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=args.lr,
            betas=(0.9, 0.95),
        )
        if self.resumed:
            saved = torch.load(self.state_path, map_location="cpu", weights_only=False)
            model.load_state_dict(saved["model"])
            self.opt.load_state_dict(saved["opt"])
            self.step, self.best = saved["step"], saved["best"]
            self.history = saved["history"]
            self.train_time, self.rollout_time = saved["train_s"], saved["rollout_s"]
            self.rng.bit_generator.state = saved["rng"]
            hooks.load_extra_state(saved)
            torch.set_rng_state(saved["torch_rng"])
            self.commands = saved.get("commands", []) + self.commands
            print(f"resumed at step {self.step} ({len(self.data['actions'])} frames)", flush=True)
        print(
            f"model {self.n_params / 1e6:.2f}M parameters; {len(self.data['actions'])} frames, "
            f"{self.n_eps} episodes; steps {args.steps}",
            flush=True,
        )
        model.train()
        self._retarget()

    def _retarget(self) -> None:
        self.chunks = chunk_index(self.data["episode_ids"], self.args.chunk)
        self.targets = self.hooks.normalize_actions(self.data["actions"])

    def autocast(self) -> Any:
        """bfloat16 autocast when ``--bf16`` (the loss hooks' forward runs under it)."""
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.bf16)

    def write_meta(self, tag: str, result: Any) -> None:
        """training.json: the run, its schedule so far and the kept checkpoint's validation."""
        h = self.hooks
        meta = {
            "commands": self.commands,
            "tasks": {t: TASK_INSTRUCTIONS[t] for t in self.tasks},
            **h.meta_head,
            "args": vars(self.args),
            "parameters": self.n_params,
            "optimizer_steps": self.step,
            "train_seconds": round(self.train_time, 1),
            "rollout_seconds": round(self.rollout_time, 1),
            "frames": int(len(self.data["actions"])),
            "demo_episodes": self.n_eps,
            "checkpoint": tag,
            "validation": result,
            "history": {k: self.history[k] for k in ("evals", "dagger", "dagger_steps")},
            **h.meta_tail,
        }
        (self.out / "training.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    def validate(self, tag: str) -> None:
        """Closed-loop success on the validation goals; the checkpoint is the best so far."""
        args, h = self.args, self.hooks
        if args.val_episodes == 0:  # no closed loop (tests): keep the latest weights
            h.save_checkpoint(self.step)
            self.write_meta(f"{tag} (not validated)", None)
            return
        t0 = time.time()
        h.reset_policy()
        _, per_task = dagger_rollouts(
            h.policy,
            self.tasks,
            val_seeds(args.val_episodes),
            0.0,
            args.execute,
            args.image_size,
            max_steps=args.rollout_steps,
            progress=False,
        )
        self.rollout_time += time.time() - t0
        mean = float(np.mean(list(per_task.values())))
        entry = {"step": self.step, "tag": tag, "mean": mean, "per_task": per_task}
        entry["seconds"] = round(time.time() - t0, 1)
        self.history["evals"].append(entry)
        h.log(f"[val {tag}] step {self.step}: mean {mean:.2f} {per_task} ({entry['seconds']}s)")
        if mean >= self.best:
            self.best = mean
            h.save_checkpoint(self.step)
            self.write_meta(tag, entry)
        else:
            self.write_meta(f"kept earlier best ({self.best:.2f})", entry)
        plot(self.history, self.out, **h.plot_kwargs)

    def save_state(self) -> None:
        """Everything a resumed run needs, written atomically to ``_work/state.pt``."""
        import torch

        tmp = self.work / "state.pt.tmp"
        torch.save(
            {
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "step": self.step,
                "best": self.best,
                "history": self.history,
                "train_s": self.train_time,
                "rollout_s": self.rollout_time,
                "rng": self.rng.bit_generator.state,
                **self.hooks.extra_state(),
                "torch_rng": torch.get_rng_state(),
                "commands": self.commands,
            },
            tmp,
        )
        tmp.replace(self.state_path)

    def dagger_counts(self) -> dict[str, int]:
        """Roll-outs per task in one DAgger round: ``--dagger-seeds``, or the task's own
        count from ``--dagger-task-seeds``."""
        counts = dict.fromkeys(self.tasks, self.args.dagger_seeds)
        for item in filter(None, self.args.dagger_task_seeds.split(",")):
            task, _, n = item.partition("=")
            if task not in counts or not n.isdigit():
                raise ValueError(f"--dagger-task-seeds: {item!r} is not TASK=N for a run task")
            counts[task] = int(n)
        return counts

    def stage_round(self) -> int:
        """The next round's index within ``--dagger-stage`` (its goal seeds, see
        :func:`dagger_seeds`): a resumed run given a new stage starts that stage's goals at
        round 0 rather than running out of the old stage's ten rounds. Rounds recorded before
        the stage was stored count as the current stage (what every earlier run used)."""
        stage = self.args.dagger_stage
        return sum(d.get("stage", stage) == stage for d in self.history["dagger"])

    def dagger_round(self, round_i: int) -> None:
        """Roll out the policy (expert mixed in by the round's beta), label and aggregate."""
        args, h = self.args, self.hooks
        betas = [float(b) for b in args.dagger_betas.split(",")]
        t0 = time.time()
        h.reset_policy()
        new, per_task = dagger_rollouts(
            h.policy,
            self.tasks,
            {
                t: dagger_seeds(args.dagger_stage, self.stage_round(), n)
                for t, n in self.dagger_counts().items()
            },
            betas[min(round_i, len(betas) - 1)],
            args.execute,
            args.image_size,
            rng_seed=args.seed + round_i,
            max_steps=args.rollout_steps,
        )
        self.rollout_time += time.time() - t0
        data = self.data
        new["episode_ids"] = new["episode_ids"] + int(data["episode_ids"].max()) + 1
        # Lockstep roll-outs interleave episodes; chunk labels need each one contiguous.
        order = np.lexsort((new["steps"], new["episode_ids"]))
        new = {k: (v[order] if k != "tasks" else v) for k, v in new.items()}
        self.data = {
            k: (np.concatenate([data[k], new[k]]) if k != "tasks" else data[k]) for k in data
        }
        save_dataset(self.data, self.aggregated)
        self._retarget()
        self.history["dagger"].append(
            {
                "step": self.step,
                "stage": args.dagger_stage,
                "frames_added": int(len(new["actions"])),
                "success": per_task,
            }
        )
        self.history["dagger_steps"].append(self.step)
        h.log(f"[DAgger {round_i + 1}] +{len(new['actions'])} frames, success {per_task}")
        self.save_state()

    def loop(self, stop_at: int | None = None, stop_after_minutes: float | None = None) -> None:
        """Train to ``--steps`` (or ``stop_at``, or until this call has run the given minutes),
        with DAgger rounds at ``--dagger-at``, validation every ``--val-every`` steps and the
        state saved every ``--save-every`` steps and at the stop."""
        import torch

        args, h = self.args, self.hooks
        dagger_at = [int(s) for s in args.dagger_at.split(",") if s]
        stop = min(args.steps, stop_at or args.steps)
        t_start = time.time()
        while self.step < stop:
            round_i = len(self.history["dagger"])
            if round_i < len(dagger_at) and self.step >= dagger_at[round_i]:
                self.dagger_round(round_i)
            t0 = time.time()
            data, rng = self.data, self.rng
            idx = rng.integers(0, len(self.targets), args.batch)
            fixed = augment(data["images"][idx], args.shift, rng)
            wrist = augment(data["wrist"][idx], args.shift, rng)
            state = data["state"][idx] + rng.normal(0, 0.005, data["state"][idx].shape)
            batch = Batch(fixed, wrist, state, data["task_ids"][idx], self.chunks[idx])
            lr = lr_at(self.step, args.steps, args.lr, args.warmup)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss = h.loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.train_time += time.time() - t0
            self.step += 1
            self.history["step"].append(self.step)
            self.history["loss"].append(loss.item())
            if h.on_step is not None:
                h.on_step(self, loss.item(), lr)
            timed_out = (
                stop_after_minutes is not None and time.time() - t_start > 60 * stop_after_minutes
            )
            last = self.step == stop or timed_out
            if self.step % args.val_every == 0 or last:
                self.validate("final" if self.step == args.steps else f"step {self.step}")
            if self.step % args.save_every == 0 or last:
                self.save_state()
            if timed_out:
                break


def plot(
    history: dict[str, Any],
    out: Path,
    ylabel: str = "L1 loss (normalised chunk)",
    title: str = "OFT-style Meta-World policy (2 cameras, proprio, chunk 8; dotted: DAgger)",
) -> None:
    """loss.png: training loss and validation success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(history["step"]):
        ax[0].plot(*smoothed(history, "loss"))
    for s in history["dagger_steps"]:
        ax[0].axvline(s, color="gray", ls=":", lw=1)
    ax[0].set(xlabel="optimizer step", ylabel=ylabel, yscale="log")
    plot_val_success(ax[1], history["evals"])
    if history["evals"]:
        ax[1].legend(fontsize=6, loc="lower right")
    ax[1].set(xlabel="optimizer step", ylabel="success (validation goals)", ylim=(-0.02, 1.02))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
