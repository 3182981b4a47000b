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
   is written with training.json and loss.png (loss and validation success).

CPU runs stop wherever a session ends: every ``--save-every`` steps the full training state
(weights, optimiser, data added by DAgger, history, RNG) goes to ``DIR/_work``, and
``--resume`` continues from it with the same schedule. Steps 1-4 and the resumption are the
pi0 trainer's too (:mod:`.chunk_training`); this module adds the model, its L1 loss and layout.
"""

from __future__ import annotations

import argparse
import json
import time
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
from .data import action_norm_stats
from .metaworld_env import TASK_INSTRUCTIONS
from .oft_data import proprio_norm_stats
from .train import model_overrides

NORM_KEY = "metaworld"
CHUNK = 8


def warm_start(model: Any, source_dir: Path) -> int:
    """Load a trained OFT checkpoint into ``model``, which may have more Llama layers
    (:func:`.chunk_training.grow_from`); returns the number of new layers."""
    from ..reference_oft import ReferenceOFT

    source = ReferenceOFT.from_pretrained(source_dir, NORM_KEY)
    have = source.base.text_config.num_hidden_layers
    return grow_from(model, source, list(model.base.language_model.model.layers[have:]), source_dir)


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

    def forward(
        self,
        fixed: Any,
        wrist: Any,
        state: np.ndarray,
        task_ids: np.ndarray,
        dropped: Any | None = None,
        drop_layer: int = 0,
    ) -> Any:
        """Pixel values [B, 6, S, S] x 2, raw state [B, 4] -> normalised chunks [B, C, 4].

        ``dropped`` ([B, 2M] bool, visual tokens in row order) trains the policy the way the
        engine prunes it: from layer ``drop_layer`` on, no row sees those tokens' keys."""
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
        pruned_mask = mask
        if dropped is not None:
            gone = torch.zeros(b, t_max, dtype=torch.bool)
            gone[:, 1 : 1 + 2 * m] = dropped
            pruned_mask = mask & ~gone[:, None, None, :]  # BOS stays: no row sees nothing
        cfg = base.text_config
        nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        cos, sin = lm.rotary_emb(h, pos)
        for i, layer in enumerate(lm.layers):
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
                q, k, v, attn_mask=pruned_mask if i >= drop_layer else mask, scale=attn.scaling
            )
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t_max, nh * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = lm.norm(h)
        # OFT's head reads the row before each placeholder (its train-time shift).
        idx = starts[:, None] - 1 + torch.arange(spec.num_placeholders)[None]
        head_rows = h[torch.arange(b)[:, None], idx]  # [B, A*C, H]
        flat = head_rows.reshape(b * spec.chunk, -1)
        return model.action_head.model(flat).view(b, spec.chunk, spec.action_dim)


#: Keep ratios a pruned training sample draws from (the ones every table reports).
DROP_KEEP_RATIOS = (0.5, 0.25, 0.125)


def random_visual_drop(
    rng: np.random.Generator, batch: int, num_visual: int, share: float
) -> np.ndarray:
    """[batch, num_visual] bool: True for the visual tokens a sample loses. A ``share`` of the
    samples keep the engine's budget (``budget_for``) for a ratio r drawn from
    DROP_KEEP_RATIOS, at random; the others keep every token."""
    from vllm_vla_pruner.pruning import budget_for

    out = np.zeros((batch, num_visual), dtype=bool)
    for i in np.flatnonzero(rng.random(batch) < share):
        keep = budget_for(num_visual, float(rng.choice(DROP_KEEP_RATIOS)))
        out[i, rng.permutation(num_visual)[keep:]] = True
    return out


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the OFT-style Meta-World policy.")
    add_run_args(p, chunk=CHUNK)
    add_init_from_arg(p, "OFT")
    p.add_argument(
        "--visual-drop",
        type=float,
        default=0.0,
        help="share of training samples whose visual tokens are pruned at random from "
        "--drop-layer on (keep 0.5, 0.25 or 0.125, drawn per sample)",
    )
    p.add_argument("--drop-layer", type=int, default=2, help="first layer without them (K)")
    args = p.parse_args(argv)
    train(args, command_line("vllm_vla_pruner.research.sim.train_oft", argv))


def train(args: argparse.Namespace, command: str) -> None:
    import torch

    from ..reference_oft import ReferenceOFT
    from .evaluate import pixel_values_from_uint8

    t_start = time.time()
    run = ChunkRun(args, command)
    data = run.data
    stats = action_norm_stats(data["actions"], run.n_eps)
    stats["action"]["mask"] = [True] * 4  # OFT normalises every action dim
    stats["proprio"] = proprio_norm_stats(data["state"])
    if args.init_from is not None:  # its head was trained on its own normalisation
        stats = json.loads((args.init_from / "dataset_statistics.json").read_text())[NORM_KEY]

    init_dir = run.init_dir
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
    if args.init_from is not None and not run.resumed:
        grown = warm_start(model, args.init_from)
        print(f"started from {args.init_from} ({grown} new identity layers)", flush=True)
    model.base.source_dir = None
    net = ChunkNet(model, run.tasks)
    num_visual = model.base.num_visual  # per camera

    @torch.no_grad()
    def policy(fixed: np.ndarray, wrist: np.ndarray, state: np.ndarray, tids: np.ndarray):
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

    def loss(b: Batch) -> Any:
        """L1 between the predicted and the expert's normalised chunk."""
        fixed, wrist = pixel_values_from_uint8(b.fixed), pixel_values_from_uint8(b.wrist)
        label = torch.from_numpy(run.targets[b.rows])  # [B, C, 4]
        dropped = None
        if args.visual_drop > 0:
            dropped = torch.from_numpy(
                random_visual_drop(run.rng, len(b.task_ids), 2 * num_visual, args.visual_drop)
            )
        with run.autocast():
            pred = net.forward(
                fixed, wrist, b.state.astype(np.float32), b.task_ids, dropped, args.drop_layer
            )
        return torch.nn.functional.l1_loss(pred.float(), label)

    def on_step(r: ChunkRun, value: float, lr: float) -> None:
        if r.step % 25 == 0:
            print(
                f"step {r.step}/{args.steps} loss {value:.4f} lr {lr:.2e} "
                f"frames {len(r.targets)} [{r.train_time / r.step:.2f} s/step, "
                f"{(time.time() - t_start) / 60:.1f} min]",
                flush=True,
            )

    hooks = Hooks(
        policy=policy,
        loss=loss,
        normalize_actions=net.normalize_actions,
        save_checkpoint=lambda step: save_oft_checkpoint(model, run.out, step, tok_files),
        meta_head={"unnorm_key": NORM_KEY},
        meta_tail={
            "cameras": ["metaworld_env.DEFAULT_CAMERA", "metaworld_env.WRIST_CAMERA"],
            "proprio": "hand xyz + gripper opening (metaworld_env.MetaWorldTask.proprio)",
        },
        on_step=on_step,
    )
    run.start(model, hooks)
    run.loop(args.stop_at, args.stop_after_minutes)
    print(f"done: best validation {run.best:.2f}", flush=True)


if __name__ == "__main__":
    main()
