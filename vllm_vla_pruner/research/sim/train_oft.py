"""Train the OFT-style Meta-World policy: two cameras, proprio, an 8-step chunk, the L1 head.

``python -m vllm_vla_pruner.research.sim.train_oft --out DIR --demos FILE.npz --steps N``

The checkpoint is the published OpenVLA-OFT layout the plugin serves (OpenVLA HF files plus
``action_head--<step>_checkpoint.pt``, ``proprio_projector--<step>_checkpoint.pt`` and
``dataset_statistics.json``); the model is :class:`~vllm_vla_pruner.research.reference_oft.
ReferenceOFT`'s modules, run here by a batched, differentiable forward with the same
attention contract as the engine (causal prompt, bidirectional action block).

1. Demos with both views and proprio (``python -m vllm_vla_pruner.research.sim.oft_data``);
   action and proprio statistics (OFT's ``bounds_q99``) from them.
2. L1 regression of the normalised chunk (the expert's next 8 actions along the visited
   path), AdamW, warm-up + cosine over ``--steps``, random-shift augmentation of both views.
3. DAgger rounds at chosen steps: roll out the policy (re-planning every ``--execute``
   actions), label every visited frame with the expert, aggregate.
4. Closed-loop success on validation goals every ``--val-every`` steps; the best checkpoint
   is written with training.json, loss.png and success.png.

CPU runs stop wherever a session ends: every ``--save-every`` steps the full training state
(weights, optimiser, data added by DAgger, history, RNG) goes to ``DIR/_work``, and
``--resume`` continues from it with the same schedule.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .data import action_norm_stats
from .metaworld_env import DEFAULT_TASKS, TASK_INSTRUCTIONS, val_seeds
from .oft_data import (
    chunk_index,
    dagger_rollouts,
    load_dataset,
    proprio_norm_stats,
    save_dataset,
)
from .train import add_model_args, augment, dagger_seeds, lr_at, model_overrides

NORM_KEY = "metaworld"
CHUNK = 8


def build_init_checkpoint(out: Path, args: argparse.Namespace, stats: dict[str, Any]) -> Path:
    """A random-initialised checkpoint in the OFT layout with this policy's shapes."""
    from ..checkpoint import build_checkpoint

    overrides = model_overrides(args, {NORM_KEY: stats})
    overrides.pop("action_dims")
    overrides["oft"] = {
        "num_images_in_input": 2,
        "num_actions_chunk": args.chunk,
        "action_dim": 4,
        "proprio_dim": 4,
        "normalization": "bounds_q99",
        "unnorm_key": NORM_KEY,
        "step": 0,
        "ddp_prefix": False,
    }
    return build_checkpoint("tiny-oft", out, seed=args.seed, **overrides)


class ChunkNet:
    """A batched, differentiable forward over :class:`ReferenceOFT`'s modules.

    Row layout per sample, as the engine and the reference build it: BOS, fixed view's M
    visual tokens, wrist view's M, the proprio token, the prompt (ending in "▁"), the
    ACTION_DIM x CHUNK zeroed placeholders, the stop token; right-padded to the batch's
    longest prompt. Prompt rows are causal, action rows see the prompt and each other.
    """

    def __init__(self, model: Any, tasks: list[str]) -> None:
        import torch

        from vllm_vla_pruner.config import OFT_STOP_TOKEN_ID

        self.torch = torch
        self.model = model
        base = model.base
        self.prompts = [base.prompt_token_ids(TASK_INSTRUCTIONS[t]) for t in tasks]
        self.spec = model.spec
        m = base.num_visual
        # Per task: the token ids of every row (0 on visual/proprio/placeholder rows, whose
        # embeddings are replaced), the sequence length and the first placeholder row.
        lens = [1 + 2 * m + len(p) + self.spec.num_action_rows for p in self.prompts]
        self.rows = torch.zeros(len(tasks), max(lens), dtype=torch.long)
        starts = []
        for i, p in enumerate(self.prompts):
            self.rows[i, 0] = p[0]
            self.rows[i, 1 + 2 * m + 1 : 1 + 2 * m + len(p)] = torch.tensor(p[1:])
            self.rows[i, lens[i] - 1] = OFT_STOP_TOKEN_ID
            starts.append(1 + 2 * m + len(p))
        self.lens, self.starts = torch.tensor(lens), torch.tensor(starts)
        low, high, _ = _bounds(model, "proprio")
        self.state_low, self.state_high = low, high
        alow, ahigh, _ = _bounds(model, "action")
        self.act_low, self.act_high = alow, ahigh

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        y = 2 * (state - self.state_low) / (self.state_high - self.state_low + 1e-8) - 1
        return np.clip(y, -1, 1).astype(np.float32)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        y = 2 * (actions - self.act_low) / (self.act_high - self.act_low + 1e-8) - 1
        return np.clip(y, -1, 1).astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return 0.5 * (normalized + 1) * (self.act_high - self.act_low + 1e-8) + self.act_low

    def forward(self, fixed: Any, wrist: Any, state: np.ndarray, task_ids: np.ndarray) -> Any:
        """Pixel values [B, 6, S, S] x 2, raw state [B, 4] -> normalised chunks [B, C, 4]."""
        torch = self.torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        model, base, spec = self.model, self.model.base, self.spec
        lm = base.language_model.model
        embed = base.language_model.get_input_embeddings()
        b = len(task_ids)
        vis = base.embed_images(torch.cat([fixed, wrist]).to(model.dtype))  # [2B, M, H]
        m = vis.shape[1]
        proprio = model.proprio_projector(torch.from_numpy(self.normalize_state(state)))
        # One token-id matrix for every row: prompt ids where text goes, the stop id after
        # the placeholders; visual, proprio and placeholder rows are overwritten below.
        tid = torch.as_tensor(np.asarray(task_ids, np.int64))
        ids, lens, starts = self.rows[tid], self.lens[tid], self.starts[tid]
        t_max = int(lens.max())
        ids = ids[:, :t_max]
        h = embed(ids)  # [B, T, H]
        pos = torch.arange(t_max)[None].expand(b, t_max)
        a0, ln = starts[:, None], lens[:, None]
        is_placeholder = (pos >= a0) & (pos < a0 + spec.num_placeholders)
        vis_rows = torch.cat([vis[:b], vis[b:]], dim=1)  # [B, 2M, H]: fixed then wrist
        h = torch.cat([h[:, :1], vis_rows, proprio[:, None], h[:, 1 + 2 * m + 1 :]], dim=1)
        h = h.masked_fill(is_placeholder[..., None], 0.0)
        qi, kj = pos[:, :, None], pos[:, None, :]
        a0, ln = a0[:, :, None], ln[:, :, None]
        visible = ((kj <= qi) | ((qi >= a0) & (kj >= a0))) & (kj < ln)
        mask = visible[:, None]  # [B, 1, T, T]
        cfg = base.text_config
        nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        cos, sin = lm.rotary_emb(h, pos)
        for layer in lm.layers:
            attn = layer.self_attn
            hd = attn.head_dim
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t_max, nh, hd).transpose(1, 2)
            k = attn.k_proj(x).view(b, t_max, kvh, hd).transpose(1, 2)
            v = attn.v_proj(x).view(b, t_max, kvh, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if kvh != nh:
                k = k.repeat_interleave(nh // kvh, dim=1)
                v = v.repeat_interleave(nh // kvh, dim=1)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=attn.scaling
            )
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t_max, nh * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = lm.norm(h)
        # OFT's head reads the row before each placeholder (its train-time shift).
        idx = starts[:, None] - 1 + torch.arange(spec.num_placeholders)[None]
        head_rows = h[torch.arange(b)[:, None], idx]  # [B, A*C, H]
        flat = head_rows.reshape(b * spec.chunk, -1)
        return model.action_head.model(flat).view(b, spec.chunk, spec.action_dim)


def _bounds(model: Any, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from vllm_vla_pruner.config import oft_bounds

    low, high, mask = oft_bounds(model.spec, model.stats, kind)
    return np.asarray(low, np.float32), np.asarray(high, np.float32), np.asarray(mask, bool)


def save_oft_checkpoint(model: Any, out: Path, step: int, tok_files: dict[str, bytes]) -> None:
    """The published OFT layout: OpenVLA files + head / projector state dicts + statistics."""
    import torch

    model.eval()
    model.base.save_pretrained(out)
    for name, content in tok_files.items():
        (out / name).write_bytes(content)
    for old in list(out.glob("action_head--*_checkpoint.pt")) + list(
        out.glob("proprio_projector--*_checkpoint.pt")
    ):
        old.unlink()
    torch.save(model.action_head.state_dict(), out / f"action_head--{step}_checkpoint.pt")
    torch.save(
        model.proprio_projector.state_dict(), out / f"proprio_projector--{step}_checkpoint.pt"
    )
    (out / "dataset_statistics.json").write_text(json.dumps(model.stats, indent=2) + "\n")
    model.train()


def plot(
    history: dict[str, Any],
    out: Path,
    ylabel: str = "L1 loss (normalised chunk)",
    title: str = "OFT-style Meta-World policy (2 cameras, proprio, chunk 8; dotted: DAgger)",
) -> None:
    """loss.png: training loss and validation success (the pi0 trainer's too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(history["step"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    if len(steps):
        k = max(1, len(steps) // 200)
        smooth = np.convolve(history["loss"], np.ones(k) / k, mode="valid")
        ax[0].plot(steps[k - 1 :], smooth)
    for s in history["dagger_steps"]:
        ax[0].axvline(s, color="gray", ls=":", lw=1)
    ax[0].set(xlabel="optimizer step", ylabel=ylabel, yscale="log")
    evals = history["evals"]
    if evals:
        xs = [e["step"] for e in evals]
        for task in evals[0]["per_task"]:
            ax[1].plot(xs, [e["per_task"][task] for e in evals], marker="o", lw=1, label=task)
        ax[1].plot(xs, [e["mean"] for e in evals], marker="s", color="k", lw=2.5, label="mean")
        ax[1].legend(fontsize=6, loc="lower right")
    ax[1].set(xlabel="optimizer step", ylabel="success (validation goals)", ylim=(-0.02, 1.02))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the OFT-style Meta-World policy.")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--demos", required=True, help=".npz from research.sim.oft_data")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--resume", action="store_true", help="continue from OUT/_work/state.pt")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps in all")
    p.add_argument("--dagger-at", default="", help="steps of DAgger rounds, e.g. 1200,2000")
    p.add_argument("--dagger-betas", default="0.3,0.0")
    p.add_argument("--dagger-seeds", type=int, default=8, help="roll-outs per task per round")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument(
        "--val-episodes", type=int, default=4, help="validation episodes per task (0: none)"
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--execute", type=int, default=4, help="chunk actions executed per request")
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--rollout-steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--shift", type=int, default=3, help="random-shift augmentation (px)")
    add_model_args(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (float32 weights; CPU AVX512-BF16)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    command = "python -m vllm_vla_pruner.research.sim.train_oft " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    train(args, command)


def train(args: argparse.Namespace, command: str) -> None:
    import torch

    from ..reference_oft import ReferenceOFT

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    state_path = work / "state.pt"
    commands = [command]  # every invocation of this run, resumptions included
    resumed = args.resume and state_path.exists()

    # DAgger rounds save the aggregated data; before the first one the demos are the data.
    aggregated = work / "data.npz"
    data = load_dataset(aggregated if resumed and aggregated.exists() else args.demos)
    if list(data["tasks"]) != tasks:
        raise ValueError(f"dataset tasks {data['tasks']} != --tasks {tasks}")
    n_eps = len(np.unique(data["episode_ids"]))
    stats = action_norm_stats(data["actions"], n_eps)
    stats["action"]["mask"] = [True] * 4  # OFT normalises every action dim
    stats["proprio"] = proprio_norm_stats(data["state"])

    init_dir = work / "init"
    if not (init_dir / "config.json").exists():
        build_init_checkpoint(init_dir, args, stats)
    model = ReferenceOFT.from_pretrained(init_dir, NORM_KEY)
    tok_files = {
        f.name: f.read_bytes()
        for f in init_dir.iterdir()
        if f.is_file() and (f.name.startswith("tokenizer") or f.name.startswith("special"))
    }
    tok_files.update(
        {
            n: (init_dir / n).read_bytes()
            for n in ("generation_config.json", "chat_template.jinja")
            if (init_dir / n).exists()
        }
    )
    model.base.source_dir = None
    n_params = sum(p.numel() for p in model.parameters())
    net = ChunkNet(model, tasks)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    history: dict[str, Any] = {
        "step": [],
        "loss": [],
        "evals": [],
        "dagger": [],
        "dagger_steps": [],
    }
    step, best, train_time, rollout_time = 0, -1.0, 0.0, 0.0
    rng = np.random.default_rng(args.seed)
    if resumed:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, best = saved["step"], saved["best"]
        history, train_time, rollout_time = saved["history"], saved["train_s"], saved["rollout_s"]
        rng.bit_generator.state = saved["rng"]
        commands = saved.get("commands", []) + commands
        torch.set_rng_state(saved["torch_rng"])
        print(f"resumed at step {step} ({len(data['actions'])} frames)", flush=True)
    print(
        f"model {n_params / 1e6:.2f}M parameters; {len(data['actions'])} frames, "
        f"{n_eps} episodes; steps {args.steps}",
        flush=True,
    )
    model.train()
    dagger_at = [int(s) for s in args.dagger_at.split(",") if s]
    betas = [float(b) for b in args.dagger_betas.split(",")]
    chunks = chunk_index(data["episode_ids"], args.chunk)
    targets = net.normalize_actions(data["actions"])

    @torch.no_grad()
    def policy(fixed: np.ndarray, wrist: np.ndarray, state: np.ndarray, tids: np.ndarray):
        from .evaluate import pixel_values_from_uint8

        model.eval()
        res = []
        for s in range(0, len(tids), 64):
            sl = slice(s, s + 64)
            norm = net.forward(
                pixel_values_from_uint8(fixed[sl]),
                pixel_values_from_uint8(wrist[sl]),
                state[sl],
                tids[sl],
            )
            res.append(net.unnormalize(norm.float().numpy()))
        model.train()
        return np.concatenate(res)

    def write_meta(tag: str, result: Any) -> None:
        meta = {
            "commands": commands,
            "tasks": {t: TASK_INSTRUCTIONS[t] for t in tasks},
            "unnorm_key": NORM_KEY,
            "args": vars(args),
            "parameters": n_params,
            "optimizer_steps": step,
            "train_seconds": round(train_time, 1),
            "rollout_seconds": round(rollout_time, 1),
            "frames": int(len(data["actions"])),
            "demo_episodes": n_eps,
            "checkpoint": tag,
            "validation": result,
            "history": {k: history[k] for k in ("evals", "dagger", "dagger_steps")},
            "cameras": ["metaworld_env.DEFAULT_CAMERA", "metaworld_env.WRIST_CAMERA"],
            "proprio": "hand xyz + gripper opening (metaworld_env.MetaWorldTask.proprio)",
        }
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")

    def validate(tag: str) -> None:
        nonlocal best, rollout_time
        if args.val_episodes == 0:  # no closed loop (tests): keep the latest weights
            save_oft_checkpoint(model, out, step, tok_files)
            write_meta(f"{tag} (not validated)", None)
            return
        t0 = time.time()
        _, per_task = dagger_rollouts(
            policy,
            tasks,
            val_seeds(args.val_episodes),
            0.0,
            args.execute,
            args.image_size,
            max_steps=args.rollout_steps,
            progress=False,
        )
        rollout_time += time.time() - t0
        mean = float(np.mean(list(per_task.values())))
        entry = {"step": step, "tag": tag, "mean": mean, "per_task": per_task}
        entry["seconds"] = round(time.time() - t0, 1)
        history["evals"].append(entry)
        print(f"[val {tag}] step {step}: mean {mean:.2f} {per_task} ({entry['seconds']}s)")
        if mean >= best:
            best = mean
            save_oft_checkpoint(model, out, step, tok_files)
            write_meta(tag, entry)
        else:
            write_meta(f"kept earlier best ({best:.2f})", entry)
        plot(history, out)

    def save_state() -> None:
        tmp = work / "state.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "best": best,
                "history": history,
                "train_s": train_time,
                "rollout_s": rollout_time,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "commands": commands,
            },
            tmp,
        )
        tmp.replace(state_path)

    from .evaluate import pixel_values_from_uint8

    while step < args.steps:
        round_i = len(history["dagger"])
        if round_i < len(dagger_at) and step >= dagger_at[round_i]:
            t0 = time.time()
            new, per_task = dagger_rollouts(
                policy,
                tasks,
                dagger_seeds(0, round_i, args.dagger_seeds),
                betas[min(round_i, len(betas) - 1)],
                args.execute,
                args.image_size,
                rng_seed=args.seed + round_i,
                max_steps=args.rollout_steps,
            )
            rollout_time += time.time() - t0
            new["episode_ids"] = new["episode_ids"] + int(data["episode_ids"].max()) + 1
            # Lockstep roll-outs interleave episodes; chunk labels need each one contiguous.
            order = np.lexsort((new["steps"], new["episode_ids"]))
            new = {k: (v[order] if k != "tasks" else v) for k, v in new.items()}
            data = {
                k: (np.concatenate([data[k], new[k]]) if k != "tasks" else data[k]) for k in data
            }
            save_dataset(data, work / "data.npz")
            chunks = chunk_index(data["episode_ids"], args.chunk)
            targets = net.normalize_actions(data["actions"])
            history["dagger"].append(
                {"step": step, "frames_added": int(len(new["actions"])), "success": per_task}
            )
            history["dagger_steps"].append(step)
            print(f"[DAgger {round_i + 1}] +{len(new['actions'])} frames, success {per_task}")
            save_state()
        t0 = time.time()
        idx = rng.integers(0, len(targets), args.batch)
        fixed = pixel_values_from_uint8(augment(data["images"][idx], args.shift, rng))
        wrist = pixel_values_from_uint8(augment(data["wrist"][idx], args.shift, rng))
        state = data["state"][idx] + rng.normal(0, 0.005, data["state"][idx].shape)
        label = torch.from_numpy(targets[chunks[idx]])  # [B, C, 4]
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = net.forward(fixed, wrist, state.astype(np.float32), data["task_ids"][idx])
        loss = torch.nn.functional.l1_loss(pred.float(), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.time() - t0
        step += 1
        history["step"].append(step)
        history["loss"].append(loss.item())
        if step % 25 == 0:
            print(
                f"step {step}/{args.steps} loss {float(loss):.4f} lr {lr:.2e} "
                f"frames {len(targets)} [{train_time / step:.2f} s/step, "
                f"{(time.time() - t_start) / 60:.1f} min]",
                flush=True,
            )
        if step % args.val_every == 0 or step == args.steps:
            validate("final" if step == args.steps else f"step {step}")
        if step % args.save_every == 0 or step == args.steps:
            save_state()
    print(f"done: best validation {best:.2f}", flush=True)


if __name__ == "__main__":
    main()
