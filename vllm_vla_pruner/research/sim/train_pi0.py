"""Train a small pi0-style Meta-World policy with flow matching (the OFT policy's inputs).

``python -m vllm_vla_pruner.research.sim.train_pi0 --out DIR --demos FILE.npz --steps N``

The checkpoint is the pi0 layout the plugin serves (:mod:`vllm_vla_pruner.pi0_spec`: openpi's
PyTorch weight names, ``config.json`` with openpi's keys under ``pi0``,
``assets/metaworld/norm_stats.json``); the model is :class:`~vllm_vla_pruner.research.
reference_pi0.ReferencePi0`'s modules, run here by a batched, differentiable forward
(:class:`FlowNet`) with pi0's attention (one bidirectional prefix block; the state token sees
the prefix and itself, the action tokens the prefix, the state and each other).

* Inputs as the OFT policy's: two cameras, a 2-camera pi0 config (slots ``base_0_rgb`` = the
  fixed camera, ``left_wrist_0_rgb`` = the wrist camera; no masked third slot, so no padding
  rows), the proprio (hand xyz + gripper opening) as pi0's state, a chunk of 8 x 4 actions
  (pi0's action width is the robot's 4: nothing to pad).
* pi0's loss: t ~ Beta(1.5, 1) mapped to (0.001, 1], x_t = t * noise + (1 - t) * actions,
  target u = noise - actions, MSE on the expert's velocity; state and actions z-scored with
  the statistics written to the checkpoint's ``norm_stats.json``. ``--noise-samples k``
  draws k (t, noise) pairs per frame on the same prefix (the prefix K/V is computed once and
  repeated; k = 1 is openpi's).
* Data, augmentation, DAgger, validation, resumption: the OFT trainer's (``oft_data``,
  ``train.augment``, ``dagger_rollouts``, ``--resume`` from ``DIR/_work``); validation
  chunks are 10 Euler steps from seeded noise, as the engine samples them.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .metaworld_env import DEFAULT_TASKS, TASK_INSTRUCTIONS, val_seeds
from .oft_data import (
    chunk_index,
    dagger_rollouts,
    load_dataset,
    proprio_norm_stats,
    save_dataset,
)
from .train import add_model_args, augment, dagger_seeds, lr_at

ASSET_ID = "metaworld"
CHUNK = 8
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")  # fixed camera, wrist camera
#: The checkpoint's recommended pruning settings (config.json ``vla_pruner``), as the
#: OFT policy's: prune after layer 2 of 4, the action signal at layer 2.
PRUNING = {"layer": 2, "action_layer": 2, "semantic_rows": "last"}


def norm_stats(data: dict[str, Any]) -> dict[str, Any]:
    """openpi's ``norm_stats.json`` content (mean, std, q01, q99 of state and actions)."""

    def entry(x: np.ndarray) -> dict[str, list[float]]:
        s = proprio_norm_stats(x)
        return {k: s[k] for k in ("mean", "std", "q01", "q99")}

    return {"norm_stats": {"state": entry(data["state"]), "actions": entry(data["actions"])}}


def build_init_checkpoint(out: Path, args: argparse.Namespace, stats: dict[str, Any]) -> Path:
    """A random-initialised pi0 checkpoint with this policy's shapes and statistics."""
    from vllm_vla_pruner.config import VisionTowerSpec

    from ..checkpoint_pi0 import build_pi0_checkpoint

    heads = max(1, args.hidden // 32)
    tower = VisionTowerSpec(
        "siglip",
        args.vision_width,
        args.vision_depth,
        max(1, args.vision_width // 32),
        args.patch_size,
        args.vision_width * 4,
        act="gelu_tanh",
    )
    build_pi0_checkpoint(
        "tiny-pi0",
        out,
        seed=args.seed,
        image_size=args.image_size,
        tower=tower,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=1,  # pi0: one KV head
        head_dim=32,
        expert_width=args.expert_width,
        expert_mlp=args.expert_width * 4,
        horizon=args.chunk,
        action_dim=4,
        robot_action_dim=4,
        state_dim=4,
        cameras=list(CAMERAS),
        asset_id=ASSET_ID,
        init_gain=args.init_gain,
        max_position_embeddings=256,
        vla_pruner=PRUNING,
    )
    (out / "assets" / ASSET_ID / "norm_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return out


class FlowNet:
    """A batched, differentiable pi0 over :class:`ReferencePi0`'s modules.

    :meth:`prefix`: both cameras' SigLIP tokens then the prompt (``BOS + text + "\\n"``,
    right-padded to the batch's longest; padding is never a key), one bidirectional pass
    with the LM's weights, keeping each layer's post-RoPE K/V. :meth:`velocity`: the expert
    over the suffix (state token, H action tokens) at flow time t, attending to that K/V and
    its own rows. :meth:`sample`: Euler steps t = 1 -> 0 reusing one prefix, as the engine.
    """

    def __init__(self, model: Any, tokenizer: Any, tasks: list[str]) -> None:
        import torch

        from vllm_vla_pruner.pi0_spec import pi0_prompt_token_ids

        self.torch = torch
        self.model = model
        self.spec = model.spec
        prompts = [
            pi0_prompt_token_ids(tokenizer, TASK_INSTRUCTIONS[t], self.spec.max_token_len)
            for t in tasks
        ]
        self.ids = torch.zeros(len(tasks), max(map(len, prompts)), dtype=torch.long)
        for i, p in enumerate(prompts):
            self.ids[i, : len(p)] = torch.tensor(p)
        self.lang_len = torch.tensor([len(p) for p in prompts])

    def _qkv(self, layer: Any, x: Any, pos: Any) -> tuple[Any, Any, Any]:
        from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

        m, attn = self.model, layer.self_attn
        b, r, _ = x.shape
        q = attn.q_proj(x).view(b, r, m.num_heads, m.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, r, m.num_kv_heads, m.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, r, m.num_kv_heads, m.head_dim).transpose(1, 2)
        cos, sin = m.lm.rotary_emb(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _attend(self, layer: Any, h: Any, q: Any, k: Any, v: Any, mask: Any) -> Any:
        """Residual attention + MLP of one Gemma layer (its own weights) over given keys."""
        m = self.model
        g = m.num_heads // m.num_kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        out = self.torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, r, _ = q.shape
        h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(b, r, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def prefix(self, cams: list[Any], task_ids: np.ndarray) -> tuple[list, Any, Any]:
        """SigLIP pixels [B, 3, S, S] per camera (model order) -> (per-layer (K, V), key
        validity [B, P], valid prefix length [B])."""
        torch, m = self.torch, self.model
        b = len(task_ids)
        pix = torch.cat(cams).to(m.projector.weight.dtype)
        vis = m.projector(m.vision(pixel_values=pix).last_hidden_state)  # [C*B, n, W]
        vis = vis.view(len(cams), b, vis.shape[1], -1).transpose(0, 1).reshape(b, -1, m.width)
        tid = torch.as_tensor(np.asarray(task_ids, np.int64))
        lens = self.lang_len[tid]
        ids = self.ids[tid][:, : int(lens.max())]
        lang = torch.nn.functional.embedding(ids, m.lm.embed_tokens.weight) * math.sqrt(m.width)
        h = torch.cat([vis, lang.to(vis.dtype)], 1)
        p = h.shape[1]
        valid = torch.cat(
            [
                torch.ones(b, vis.shape[1], dtype=torch.bool),
                torch.arange(ids.shape[1])[None] < lens[:, None],
            ],
            1,
        )
        pos = torch.arange(p)[None].expand(b, p)  # padding is last: valid rows count up
        mask = valid[:, None, None, :]
        kv = []
        layers = m.lm.layers
        for i, layer in enumerate(layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), pos)
            kv.append((k, v))
            if i + 1 < len(layers):  # the last layer's prefix output is never read
                h = self._attend(layer, h, q, k, v, mask)
        return kv, valid, valid.sum(1)

    def velocity(self, kv: list, valid: Any, n_valid: Any, state: Any, x: Any, t: Any) -> Any:
        """The expert's velocity [B, H, A] at flow time t [B] for the noisy chunk x."""
        torch, m = self.torch, self.model
        h = m.suffix_embeds(state, x, t)  # [B, 1 + H, We]
        b, s, _ = h.shape
        pos = n_valid[:, None] + torch.arange(s)[None]
        own = torch.ones(s, s, dtype=torch.bool)
        own[0, 1:] = False  # the state token does not see the actions
        mask = torch.cat(
            [valid[:, None, :].expand(b, s, -1), own[None].expand(b, s, s)], 2
        ).unsqueeze(1)
        for i, layer in enumerate(m.expert.layers):
            q, k, v = self._qkv(layer, layer.input_layernorm(h), pos)
            pk, pv = kv[i]
            h = self._attend(layer, h, q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), mask)
        return m.action_out_proj(m.expert.norm(h)[:, 1:])

    def sample(self, cams: list[Any], task_ids: np.ndarray, state: Any, noise: Any, steps: int):
        """Normalised chunks [B, H, A]: ``steps`` Euler steps from ``noise`` (t = 1 -> 0)."""
        from ..reference_pi0 import euler_times

        kv, valid, n_valid = self.prefix(cams, task_ids)
        x = noise.float()
        for t in euler_times(steps):
            tt = self.torch.full((x.shape[0],), t)
            x = x - self.velocity(kv, valid, n_valid, state, x, tt).float() / steps
        return x

    def loss(
        self, cams: list[Any], task_ids: np.ndarray, state: Any, actions: Any, k: int, gen: Any
    ) -> Any:
        """pi0's flow-matching loss on a batch, ``k`` (t, noise) draws per frame."""
        torch = self.torch
        kv, valid, n_valid = self.prefix(cams, task_ids)
        if k > 1:
            kv = [(a.repeat_interleave(k, 0), b.repeat_interleave(k, 0)) for a, b in kv]
            valid, n_valid = valid.repeat_interleave(k, 0), n_valid.repeat_interleave(k, 0)
            state, actions = state.repeat_interleave(k, 0), actions.repeat_interleave(k, 0)
        n = actions.shape[0]
        t = sample_time(n, gen)
        noise = torch.randn(actions.shape, generator=gen)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        v = self.velocity(kv, valid, n_valid, state, x_t, t)
        return torch.nn.functional.mse_loss(v.float(), noise - actions)


def sample_time(n: int, gen: Any) -> Any:
    """openpi's flow time: Beta(1.5, 1) mapped to [0.001, 1) (Beta by two Gammas, so a
    seeded generator drives it and resumption replays it)."""
    import torch

    a = torch._standard_gamma(torch.full((n,), 1.5), generator=gen)
    b = torch._standard_gamma(torch.full((n,), 1.0), generator=gen)
    return a / (a + b) * 0.999 + 0.001


def siglip_pixels(images: np.ndarray) -> Any:
    """uint8 [B, S, S, 3] -> SigLIP pixels [B, 3, S, S] in [-1, 1], as the engine's image
    processing gives the pi0 tower (the SigLIP half of OpenVLA's 6 channels)."""
    from .evaluate import pixel_values_from_uint8

    return pixel_values_from_uint8(images)[:, 3:6]


def save_pi0_checkpoint(model: Any, init_dir: Path, out: Path, step: int) -> None:
    """The served pi0 layout: the init checkpoint's files with the trained weights."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in init_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    shutil.copytree(init_dir / "assets", out / "assets", dirs_exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(model.openpi_state_dict(), str(tmp), metadata={"format": "pt", "step": str(step)})
    tmp.replace(out / "model.safetensors")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the pi0-style Meta-World policy.")
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
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument(
        "--val-episodes", type=int, default=3, help="validation episodes per task (0: none)"
    )
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--execute", type=int, default=4, help="chunk actions executed per request")
    p.add_argument("--chunk", type=int, default=CHUNK)
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps when sampling")
    p.add_argument("--noise-samples", type=int, default=4, help="(t, noise) draws per frame")
    p.add_argument("--rollout-steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--shift", type=int, default=3, help="random-shift augmentation (px)")
    add_model_args(p)
    p.add_argument("--expert-width", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (float32 weights; CPU AVX512-BF16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    args = p.parse_args(argv)
    command = "python -m vllm_vla_pruner.research.sim.train_pi0 " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    train(args, command)


def train(args: argparse.Namespace, command: str) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ..reference_pi0 import ReferencePi0
    from .train_oft import plot

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    state_path = work / "state.pt"
    commands = [command]  # every invocation of this run, resumptions included
    resumed = args.resume and state_path.exists()

    aggregated = work / "data.npz"
    data = load_dataset(aggregated if resumed and aggregated.exists() else args.demos)
    if list(data["tasks"]) != tasks:
        raise ValueError(f"dataset tasks {data['tasks']} != --tasks {tasks}")
    n_eps = len(np.unique(data["episode_ids"]))

    init_dir = work / "init"
    if not (init_dir / "config.json").exists():  # statistics of the first data, kept after
        build_init_checkpoint(init_dir, args, norm_stats(data))
    model = ReferencePi0.from_pretrained(init_dir)
    net = FlowNet(model, AutoTokenizer.from_pretrained(str(init_dir)), tasks)
    n_params = sum(p.numel() for p in model.parameters())
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
    history: dict[str, Any] = {"step": [], "loss": [], "evals": [], "dagger": []}
    history["dagger_steps"] = []
    step, best, train_time, rollout_time = 0, -1.0, 0.0, 0.0
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if resumed:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step, best = saved["step"], saved["best"]
        history, train_time, rollout_time = saved["history"], saved["train_s"], saved["rollout_s"]
        rng.bit_generator.state = saved["rng"]
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        commands = saved["commands"] + commands
        print(f"resumed at step {step} ({len(data['actions'])} frames)", flush=True)
    print(
        f"model {n_params / 1e6:.2f}M parameters; {len(data['actions'])} frames, "
        f"{n_eps} episodes; steps {args.steps}",
        flush=True,
    )
    model.train()
    dagger_at = [int(s) for s in args.dagger_at.split(",") if s]
    betas = [float(b) for b in args.dagger_betas.split(",")]
    norm = model.norm

    def targets_for(d: dict[str, Any]) -> tuple[np.ndarray, Any]:
        return chunk_index(d["episode_ids"], args.chunk), norm.normalize_actions(d["actions"])

    chunks, targets = targets_for(data)

    calls = [0]  # policy calls since the last reset: seeds each call's noise

    @torch.no_grad()
    def policy(fixed: np.ndarray, wrist: np.ndarray, state: np.ndarray, tids: np.ndarray):
        """Chunks for a batch of observations; noise from a generator seeded per call."""
        model.eval()
        g = torch.Generator().manual_seed(args.seed + 7919 * calls[0])
        calls[0] += 1
        res = []
        for s in range(0, len(tids), 64):
            sl = slice(s, s + 64)
            noise = torch.randn(len(tids[sl]), args.chunk, model.spec.action_dim, generator=g)
            x = net.sample(
                [siglip_pixels(fixed[sl]), siglip_pixels(wrist[sl])],
                tids[sl],
                norm.state(state[sl]),
                noise,
                args.num_steps,
            )
            res.append(norm.actions(x).float().numpy())
        model.train()
        return np.concatenate(res)

    def write_meta(tag: str, result: Any) -> None:
        meta = {
            "commands": commands,
            "tasks": {t: TASK_INSTRUCTIONS[t] for t in tasks},
            "asset_id": ASSET_ID,
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
            "cameras": {
                CAMERAS[0]: "metaworld_env.DEFAULT_CAMERA",
                CAMERAS[1]: "metaworld_env.WRIST_CAMERA",
            },
            "state": "hand xyz + gripper opening (metaworld_env.MetaWorldTask.proprio)",
            "loss": "pi0 flow matching: MSE(v(x_t, t), noise - actions), t ~ Beta(1.5,1)",
        }
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")

    def validate(tag: str) -> None:
        nonlocal best, rollout_time
        if args.val_episodes == 0:  # no closed loop (tests): keep the latest weights
            save_pi0_checkpoint(model, init_dir, out, step)
            write_meta(f"{tag} (not validated)", None)
            return
        t0 = time.time()
        calls[0] = 0  # the same noise at every validation
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
        tqdm.write(f"[val {tag}] step {step}: mean {mean:.2f} {per_task} ({entry['seconds']}s)")
        if mean >= best:
            best = mean
            save_pi0_checkpoint(model, init_dir, out, step)
            write_meta(tag, entry)
        else:
            write_meta(f"kept earlier best ({best:.2f})", entry)
        plot(
            history,
            out,
            ylabel="flow-matching MSE (normalised chunk)",
            title="pi0-style Meta-World policy (2 cameras, proprio, chunk 8; dotted: DAgger)",
        )

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
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "commands": commands,
            },
            tmp,
        )
        tmp.replace(state_path)

    bar = tqdm(total=args.steps, initial=step, desc="pi0 flow matching", disable=args.no_progress)
    t_start = time.time()
    stop_at = min(args.steps, args.stop_at or args.steps)
    while step < stop_at:
        round_i = len(history["dagger"])
        if round_i < len(dagger_at) and step >= dagger_at[round_i]:
            t0 = time.time()
            calls[0] = 0
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
            save_dataset(data, aggregated)
            chunks, targets = targets_for(data)
            history["dagger"].append(
                {"step": step, "frames_added": int(len(new["actions"])), "success": per_task}
            )
            history["dagger_steps"].append(step)
            tqdm.write(f"[DAgger {round_i + 1}] +{len(new['actions'])} frames, {per_task}")
            save_state()
        t0 = time.time()
        idx = rng.integers(0, len(targets), args.batch)
        cams = [
            siglip_pixels(augment(data["images"][idx], args.shift, rng)),
            siglip_pixels(augment(data["wrist"][idx], args.shift, rng)),
        ]
        state = data["state"][idx] + rng.normal(0, 0.005, data["state"][idx].shape)
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = net.loss(
                cams,
                data["task_ids"][idx],
                norm.state(state),
                targets[torch.from_numpy(chunks[idx])],
                args.noise_samples,
                gen,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.time() - t0
        step += 1
        history["step"].append(step)
        history["loss"].append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", frames=len(targets))
        if args.no_progress and step % 25 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} lr {lr:.2e}", flush=True)
        timed_out = (
            args.stop_after_minutes is not None
            and time.time() - t_start > 60 * args.stop_after_minutes
        )
        last = step == stop_at or timed_out
        if step % args.val_every == 0 or last:
            validate("final" if step == args.steps else f"step {step}")
        if step % args.save_every == 0 or last:
            save_state()
        if timed_out:
            break
    bar.close()
    print(f"done: best validation {best:.2f}", flush=True)


if __name__ == "__main__":
    main()
