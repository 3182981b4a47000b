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
* Data, augmentation, DAgger, validation, resumption: the OFT trainer's, shared in
  :mod:`.chunk_training` (``--resume`` from ``DIR/_work``); validation chunks are 10 Euler
  steps from seeded noise, as the engine samples them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .chunk_training import (
    Batch,
    ChunkRun,
    Hooks,
    add_init_from_arg,
    add_run_args,
    command_line,
    grow_from,
)
from .metaworld_env import TASK_INSTRUCTIONS
from .oft_data import proprio_norm_stats

ASSET_ID = "metaworld"
CHUNK = 8
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb")  # fixed camera, wrist camera
#: The checkpoint's recommended pruning settings (config.json ``vla_pruner``): prune after
#: layer 2 of 4, the action signal at layer 2 (the OFT policy's), and the paper's semantic
#: score over all prompt rows - chosen for this policy on validation goals (keep 0.25: 97% of
#: unpruned against 91% for the OFT policy's last-row score;
#: ``benchmarks/results/metaworld-pi0-semantic-rows/``).
PRUNING = {"layer": 2, "action_layer": 2, "semantic_rows": "all"}


def norm_stats(data: dict[str, Any]) -> dict[str, Any]:
    """openpi's ``norm_stats.json`` content (mean, std, q01, q99 of state and actions)."""

    def entry(x: np.ndarray) -> dict[str, list[float]]:
        s = proprio_norm_stats(x)
        return {k: s[k] for k in ("mean", "std", "q01", "q99")}

    return {"norm_stats": {"state": entry(data["state"]), "actions": entry(data["actions"])}}


def warm_start(model: Any, source_dir: Path) -> int:
    """Load a trained pi0 checkpoint into ``model``, which may be deeper: pi0's prefix LM
    and action expert share their depth, so each grows by the same identity layers
    (:func:`.chunk_training.grow_from`). Returns the number of new layers per stack."""
    from ..reference_pi0 import ReferencePi0

    source = ReferencePi0.from_pretrained(source_dir)
    have = len(source.lm.layers)
    new = [*model.lm.layers[have:], *model.expert.layers[have:]]
    return grow_from(model, source, new, source_dir) // 2


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


def sampling_policy(net: FlowNet, chunk: int, num_steps: int, seed: int) -> tuple[Any, Any]:
    """The closed-loop chunk policy of validation and DAgger: ``(policy, reset)``.

    ``policy(fixed, wrist, state, task_ids)`` -> un-normalised chunks [B, chunk, A], sampled
    in eval mode (the model's mode restored after) from noise seeded per call; ``reset()``
    restarts the call count, so every validation round draws the same noise."""
    import torch

    model, norm = net.model, net.model.norm
    calls = [0]  # policy calls since the last reset: seeds each call's noise

    @torch.no_grad()
    def policy(fixed: np.ndarray, wrist: np.ndarray, state: np.ndarray, tids: np.ndarray):
        training = model.training
        model.eval()
        g = torch.Generator().manual_seed(seed + 7919 * calls[0])
        calls[0] += 1
        res = []
        for s in range(0, len(tids), 64):
            sl = slice(s, s + 64)
            noise = torch.randn(len(tids[sl]), chunk, model.spec.action_dim, generator=g)
            x = net.sample(
                [siglip_pixels(fixed[sl]), siglip_pixels(wrist[sl])],
                tids[sl],
                norm.state(state[sl]),
                noise,
                num_steps,
            )
            res.append(norm.actions(x).float().numpy())
        model.train(training)
        return np.concatenate(res)

    def reset() -> None:
        calls[0] = 0

    return policy, reset


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
    add_run_args(p, val_episodes=3, rollout_steps=160, batch=32, lr=1e-3, chunk=CHUNK)
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps when sampling")
    p.add_argument("--noise-samples", type=int, default=4, help="(t, noise) draws per frame")
    p.add_argument("--expert-width", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    add_init_from_arg(p, "pi0")
    args = p.parse_args(argv)
    train(args, command_line("vllm_vla_pruner.research.sim.train_pi0", argv))


def train(args: argparse.Namespace, command: str) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_vla_pruner.pi0_spec import load_norm_stats, pi0_spec

    from ..reference_pi0 import ReferencePi0

    run = ChunkRun(args, command)
    init_dir = run.init_dir
    if not (init_dir / "config.json").exists():  # statistics of the first data, kept after
        if args.init_from is None:
            stats = norm_stats(run.data)
        else:  # its heads were trained on its own normalisation
            source = args.init_from
            stats = {"norm_stats": load_norm_stats(source, pi0_spec(source))}
        build_init_checkpoint(init_dir, args, stats)
    model = ReferencePi0.from_pretrained(init_dir)
    if args.init_from is not None and not run.resumed:
        grown = warm_start(model, args.init_from)
        print(f"started from {args.init_from} ({grown} new identity layers)", flush=True)
    net = FlowNet(model, AutoTokenizer.from_pretrained(str(init_dir)), run.tasks)
    gen = torch.Generator().manual_seed(args.seed)
    norm = model.norm
    policy, reset_policy = sampling_policy(net, args.chunk, args.num_steps, args.seed)

    def loss(b: Batch) -> Any:
        """pi0's flow-matching loss, ``--noise-samples`` draws per frame from ``gen``."""
        cams = [siglip_pixels(b.fixed), siglip_pixels(b.wrist)]
        with run.autocast():
            return net.loss(
                cams,
                b.task_ids,
                norm.state(b.state),
                run.targets[torch.from_numpy(b.rows)],
                args.noise_samples,
                gen,
            )

    def on_step(r: ChunkRun, value: float, lr: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}", frames=len(r.targets))
        if args.no_progress and r.step % 25 == 0:
            print(f"step {r.step}/{args.steps} loss {value:.4f} lr {lr:.2e}", flush=True)

    def load_gen(saved: dict[str, Any]) -> None:
        gen.set_state(saved["gen"])

    hooks = Hooks(
        policy=policy,
        loss=loss,
        normalize_actions=norm.normalize_actions,
        save_checkpoint=lambda step: save_pi0_checkpoint(model, init_dir, run.out, step),
        meta_head={"asset_id": ASSET_ID},
        meta_tail={
            "cameras": {
                CAMERAS[0]: "metaworld_env.DEFAULT_CAMERA",
                CAMERAS[1]: "metaworld_env.WRIST_CAMERA",
            },
            "state": "hand xyz + gripper opening (metaworld_env.MetaWorldTask.proprio)",
            "loss": "pi0 flow matching: MSE(v(x_t, t), noise - actions), t ~ Beta(1.5,1)",
        },
        plot_kwargs={
            "ylabel": "flow-matching MSE (normalised chunk)",
            "title": "pi0-style Meta-World policy (2 cameras, proprio, chunk 8; dotted: DAgger)",
        },
        on_step=on_step,
        log=tqdm.write,
        reset_policy=reset_policy,
        extra_state=lambda: {"gen": gen.get_state()},
        load_extra_state=load_gen,
    )
    run.start(model, hooks)
    bar = tqdm(
        total=args.steps, initial=run.step, desc="pi0 flow matching", disable=args.no_progress
    )
    run.loop(args.stop_at, args.stop_after_minutes)
    bar.close()
    print(f"done: best validation {run.best:.2f}", flush=True)


if __name__ == "__main__":
    main()
