"""An independent plain-PyTorch pi0, to check the engine's flow-matching chunks against.

Built from transformers' ``SiglipVisionModel`` and ``GemmaModel`` modules (never the plugin's
model file or vLLM) and the checkpoint's openpi-named weights, written from the pi0 paper and
openpi's ``pi0_pytorch.py`` (read, not copied):

* prefix: each camera slot's SigLIP tokens (projected, unscaled), then the language tokens
  (``BOS + text + "\\n"`` padded to ``max_token_len``, embeddings scaled by sqrt(width)); a
  false image mask or a padding token is never a key; positions count valid tokens;
* one prefix pass with the LM's weights, fully bidirectional over the valid prefix, keeps
  every layer's post-RoPE K/V;
* ``num_steps`` Euler steps from t = 1 (the given noise) to 0, dt = -1/N: the expert runs
  over the suffix (state token, H action tokens mixing the noisy action with a sin-cos
  embedding of t through ``action_time_mlp_*``) attending to the cached prefix K/V and
  itself (state: prefix + itself; actions: prefix + state + actions), v =
  ``action_out_proj`` of the action rows;
* pruning as in the OpenVLA reference: ``keep_visual`` (indices over the visual tokens of the
  valid cameras, in slot order) leaves only those visual rows in the prefix layers
  ``>= prune_layer`` (and so in their cached K/V), with original positions;
* ``return_attn_layers``: the expert's action rows' head-averaged attention over the keys of
  those layers, per step (the VLA-Pruner action signal).

pi0.5 (``spec.pi05``, openpi's ``Pi0Config.pi05``; its prompt holds the binned state, which
the caller tokenizes, e.g. with :meth:`ReferencePi0.pi05_prompt`): the suffix is the H action
rows ``action_in_proj(x)`` (no state token, no ``action_time_mlp_*``), and every expert norm
is an :class:`AdaptiveRMSNorm` conditioned on ``silu(time_mlp_out(silu(time_mlp_in(emb(t)))))``
whose gate scales the residual branch after it (the final norm's gate is unused).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from vllm_vla_pruner.pi0_spec import Pi0Normalizer, Pi0Spec, load_norm_stats, spec_from_config

__all__ = [
    "AdaptiveRMSNorm",
    "Pi0Inputs",
    "Pi0Output",
    "ReferencePi0",
    "euler_times",
    "time_embedding",
]

_V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_P = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
_L = "paligemma_with_expert.paligemma.model.language_model."
_E = "paligemma_with_expert.gemma_expert.model."
_HEADS = ("state_proj", "action_in_proj", "action_time_mlp_in", "action_time_mlp_out")
_HEADS_PI05 = ("action_in_proj", "time_mlp_in", "time_mlp_out")


def time_embedding(
    t: float | Tensor, width: int, min_period: float = 4e-3, max_period: float = 4.0
) -> Tensor:
    """pi0's sin-cos embedding of the flow time (float64 math, float32 result): [width] for
    a number, [..., width] for a tensor of times (the trainer's one t per sample)."""
    frac = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    tt = torch.as_tensor(t, dtype=torch.float64).detach().cpu()
    x = tt[..., None] * (2 * math.pi / period)
    return torch.cat([torch.sin(x), torch.cos(x)], -1).float()


def euler_times(num_steps: int) -> list[float]:
    """t of each Euler step: 1, 1 - 1/N, ..., 1/N."""
    return [1.0 - k / num_steps for k in range(num_steps)]


class AdaptiveRMSNorm(nn.Module):
    """pi0.5's time-conditioned RMSNorm: ``dense(cond)`` -> (scale, shift, gate);
    ``rms(x) * (1 + scale) + shift``, and the gate for the residual branch after it."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width, 3 * width)
        self.eps = eps

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        rms = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond).chunk(3, -1)
        return (rms * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


@dataclass
class Pi0Inputs:
    embeds: Tensor  # [T, W] prefix input embeddings (every slot, masked ones included)
    valid: Tensor  # [T] bool: image mask / language padding mask
    num_visual_slots: int  # cameras x tokens per camera (the first rows)
    state: Tensor | None  # [action_dim] normalised, padded (pi0.5: None, it is in the prompt)
    tokens_per_camera: int


@dataclass
class Pi0Output:
    normalized: Tensor  # [H, action_dim] the flow's result
    actions: Tensor  # [H, robot_action_dim] un-normalised (float64)
    visual_ids: Tensor  # original visual id of each visual key the expert saw, per layer >= K
    attn: dict[int, list[Tensor]] = field(default_factory=dict)  # layer -> per step [H, keys]
    visual_cols: dict[int, Tensor] = field(default_factory=dict)  # layer -> visual key columns
    visual_key_ids: dict[int, Tensor] = field(default_factory=dict)  # layer -> their ids


class ReferencePi0(nn.Module):
    def __init__(self, config: dict[str, Any], stats: dict[str, Any]) -> None:
        super().__init__()
        from transformers import GemmaConfig, GemmaModel, SiglipVisionConfig, SiglipVisionModel

        self.spec: Pi0Spec = spec_from_config(config)
        self.norm = Pi0Normalizer(self.spec, stats)
        self.norm_stats = stats
        tower = config["vision_towers"][0]
        self.image_size = int(config["image_sizes"][0])
        self.tokens_per_camera = (self.image_size // tower["patch_size"]) ** 2
        self.vision = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=tower["width"],
                intermediate_size=tower["mlp_hidden"],
                num_hidden_layers=tower["depth"],
                num_attention_heads=tower["num_heads"],
                image_size=self.image_size,
                patch_size=tower["patch_size"],
                hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=tower.get("norm_eps", 1e-6),
                vision_use_head=False,
            )
        )
        text = config["text_config"]
        self.width = int(text["hidden_size"])
        self.projector = nn.Linear(tower["width"], self.width)

        def gemma(width: int, mlp: int, vocab: int) -> nn.Module:
            return GemmaModel(
                GemmaConfig(
                    bos_token_id=None,
                    eos_token_id=None,
                    pad_token_id=None,
                    hidden_size=width,
                    intermediate_size=mlp,
                    num_hidden_layers=text["num_hidden_layers"],
                    num_attention_heads=text["num_attention_heads"],
                    num_key_value_heads=text["num_key_value_heads"],
                    head_dim=text["head_dim"],
                    vocab_size=vocab,
                    hidden_activation="gelu_pytorch_tanh",
                    rms_norm_eps=text["rms_norm_eps"],
                    rope_theta=text["rope_theta"],
                    max_position_embeddings=text["max_position_embeddings"],
                )
            )

        self.lm = gemma(self.width, text["intermediate_size"], text["vocab_size"])
        we = self.spec.expert_width
        self.expert = gemma(we, self.spec.expert_mlp, 1)
        a = self.spec.action_dim
        self.action_in_proj = nn.Linear(a, we)
        if self.spec.pi05:
            eps = text["rms_norm_eps"]
            for layer in self.expert.layers:
                layer.input_layernorm = AdaptiveRMSNorm(we, eps)
                layer.post_attention_layernorm = AdaptiveRMSNorm(we, eps)
            self.expert.norm = AdaptiveRMSNorm(we, eps)
            self.time_mlp_in = nn.Linear(we, we)
            self.time_mlp_out = nn.Linear(we, we)
        else:
            self.state_proj = nn.Linear(a, we)
            self.action_time_mlp_in = nn.Linear(2 * we, we)
            self.action_time_mlp_out = nn.Linear(we, we)
        self.action_out_proj = nn.Linear(we, a)
        self.num_heads = int(text["num_attention_heads"])
        self.num_kv_heads = int(text["num_key_value_heads"])
        self.head_dim = int(text["head_dim"])

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ReferencePi0:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        model = cls(config, load_norm_stats(model_dir, spec_from_config(config)))
        w = load_file(str(model_dir / "model.safetensors"))
        for module, prefix, strict in model._parts():
            state = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
            missing, unexpected = module.load_state_dict(state, strict=False)
            missing = [m for m in missing if strict or not m.startswith("embed_tokens")]
            if missing or unexpected:
                raise ValueError(f"{prefix}: missing {missing}, unexpected {unexpected}")
        for name in (*model.heads, "action_out_proj"):
            getattr(model, name).load_state_dict(
                {"weight": w[f"{name}.weight"], "bias": w[f"{name}.bias"]}
            )
        return model.float().eval()

    @property
    def heads(self) -> tuple[str, ...]:
        """The suffix's input heads (openpi's names): pi0's or pi0.5's."""
        return _HEADS_PI05 if self.spec.pi05 else _HEADS

    def _parts(self) -> list[tuple[nn.Module, str, bool]]:
        """Each transformer part and its openpi name prefix (strict: it has every tensor)."""
        return [
            (self.vision, _V, True),
            (self.projector, _P, True),
            (self.lm, _L, True),
            (self.expert, _E, False),  # no embedding table
        ]

    def openpi_state_dict(self) -> dict[str, Tensor]:
        """Every weight under its openpi name: what :meth:`from_pretrained` reads (the
        Meta-World pi0 trainer writes its checkpoints with it)."""
        w: dict[str, Tensor] = {}
        for module, prefix, strict in self._parts():
            for k, v in module.state_dict().items():
                if strict or not k.startswith("embed_tokens"):
                    w[prefix + k] = v.detach().float().contiguous()
        for name in (*self.heads, "action_out_proj"):
            for k, v in getattr(self, name).state_dict().items():
                w[f"{name}.{k}"] = v.detach().float().contiguous()
        return w

    # ---- inputs ----------------------------------------------------------------------------

    @torch.no_grad()
    def build_inputs(
        self,
        images: Sequence[Tensor | None],
        image_masks: Sequence[bool],
        token_ids: Sequence[int],
        state: Sequence[float] | None,
    ) -> Pi0Inputs:
        """``images``: one per camera slot, SigLIP-normalised pixels [3, S, S] (None: a masked
        slot, a zero dummy); ``token_ids``: ``BOS + text + "\\n"`` (padded to max_token_len;
        pi0.5: :meth:`pi05_prompt`'s, the state in it, ``state`` unused)."""
        spec = self.spec
        if state is None and not spec.pi05:
            raise ValueError("pi0 needs the robot state")
        if len(images) != spec.num_cameras or len(image_masks) != spec.num_cameras:
            raise ValueError(f"expected {spec.num_cameras} camera slots")
        if len(token_ids) > spec.max_token_len:
            raise ValueError(f"prompt longer than {spec.max_token_len} tokens")
        s = self.image_size
        pixels = torch.stack(
            [torch.zeros(3, s, s) if im is None else torch.as_tensor(im).float() for im in images]
        )
        vis = self.projector(self.vision(pixel_values=pixels).last_hidden_state)  # [C, n, W]
        n = vis.shape[1]
        pad = spec.max_token_len - len(token_ids)
        ids = torch.tensor(list(token_ids) + [0] * pad)
        # The raw table (transformers' Gemma embedding module would scale it itself).
        lang = F.embedding(ids, self.lm.embed_tokens.weight) * math.sqrt(self.width)
        valid = torch.cat(
            [
                torch.tensor(image_masks, dtype=torch.bool).repeat_interleave(n),
                torch.tensor([True] * len(token_ids) + [False] * pad),
            ]
        )
        return Pi0Inputs(
            torch.cat([vis.reshape(-1, self.width), lang]),
            valid,
            spec.num_cameras * n,
            None if spec.pi05 else self.norm.state(state),
            n,
        )

    def pi05_prompt(self, tokenizer: Any, instruction: str, state: Sequence[float]) -> list[int]:
        """pi0.5's prompt ids, written out from openpi's tokenizer and ``Normalize`` (not the
        plugin's): state -> (s - q01) / (q99 - q01 + 1e-6) * 2 - 1 -> 256 bins over [-1, 1]
        (``np.digitize`` minus 1) -> ``"Task: {text}, State: {bins};\\nAction: "`` with BOS,
        at most max_token_len tokens."""
        import numpy as np

        st = self.norm_stats["state"]
        q01, q99 = np.asarray(st["q01"], np.float64), np.asarray(st["q99"], np.float64)
        normed = (np.asarray(state, np.float64) - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
        bins = np.digitize(normed, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
        text = instruction.strip().replace("_", " ").replace("\n", " ")
        prompt = f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: "
        return list(tokenizer.encode(prompt, add_special_tokens=True))[: self.spec.max_token_len]

    # ---- one attention over given keys --------------------------------------------------

    def _qkv(self, layer: nn.Module, x: Tensor, pos: Tensor, rope: nn.Module):
        from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

        attn = layer.self_attn
        r = x.shape[0]
        q = attn.q_proj(x).view(r, self.num_heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(r, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(r, self.num_kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = rope(x, pos[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0], v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> tuple[Tensor, Tensor]:
        g = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(g, 0).float(), v.repeat_interleave(g, 0).float()
        scores = (q.float() @ k.transpose(1, 2)) * self.head_dim**-0.5
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out = (probs @ v).transpose(0, 1).reshape(q.shape[1], -1)
        return out, probs

    # ---- forward ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefix_pass(
        self,
        inputs: Pi0Inputs,
        keep_visual: Tensor | None,
        prune_layer: int,
        attn_out: dict[int, Tensor] | None = None,
    ) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor], int]:
        """Per-layer (K, V) of the valid (and, at layers >= K, kept) prefix rows, the visual
        ids of those rows' visual keys per layer, and the number of valid prefix tokens.
        ``attn_out``: layer -> its head-averaged [rows, rows] attention is filled in for the
        layers it names (valid rows in pi0 order: visual, then language)."""
        valid = inputs.valid
        pos_all = torch.cumsum(valid.long(), 0) - 1
        rows = valid.nonzero().flatten()  # masked slots are never keys: drop them at once
        m = int(valid[: inputs.num_visual_slots].sum())  # valid visual tokens
        h, pos = inputs.embeds[rows], pos_all[rows]
        kv, ids = [], []
        for i, layer in enumerate(self.lm.layers):
            if keep_visual is not None and i == prune_layer:
                keep = torch.as_tensor(keep_visual).long()
                sel = torch.cat([keep, torch.arange(m, h.shape[0])])
                h, pos = h[sel], pos[sel]
            vis_ids = keep if (keep_visual is not None and i >= prune_layer) else torch.arange(m)
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, pos, self.lm.rotary_emb)
            visible = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool)
            out, probs = self._attend(q, k, v, visible)
            if attn_out is not None and i in attn_out:
                attn_out[i] = probs.mean(0)
            h = h + layer.self_attn.o_proj(out.to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            kv.append((k, v))
            ids.append(vis_ids)
        return kv, ids, int(valid.sum())

    def suffix_embeds(self, state: Tensor | None, x: Tensor, t: float | Tensor) -> Tensor:
        """The expert's input rows: state token, then H action tokens. One request (state
        [A], x [H, A], t a number) or a batch (state [B, A], x [B, H, A], t [B]). pi0.5: the
        H rows ``action_in_proj(x)`` (t reaches the norms: :meth:`time_cond`)."""
        a = self.action_in_proj(x)
        if self.spec.pi05:
            return a
        te = time_embedding(t, a.shape[-1]).to(a.device)
        te = (te.unsqueeze(-2) if te.dim() > 1 else te).expand_as(a)
        mixed = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([a, te], -1))))
        return torch.cat([self.state_proj(state).unsqueeze(-2), mixed], -2)

    def time_cond(self, t: float | Tensor) -> Tensor | None:
        """pi0.5's norm condition at flow time t ([We], or [B, 1, We] for a [B] batch of
        times); None for pi0."""
        if not self.spec.pi05:
            return None
        te = time_embedding(t, self.spec.expert_width).to(self.time_mlp_in.weight.device)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(te))))
        return cond.unsqueeze(-2) if cond.dim() > 1 else cond

    @staticmethod
    def expert_norm(
        module: nn.Module, x: Tensor, cond: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """An expert norm's output and residual gate (None: pi0's plain RMSNorm)."""
        return (module(x), None) if cond is None else module(x, cond)

    @torch.no_grad()
    def sample(
        self,
        inputs: Pi0Inputs,
        noise: Tensor,
        num_steps: int | None = None,
        keep_visual: Tensor | Sequence[int] | None = None,
        prune_layer: int = 3,
        return_attn_layers: Sequence[int] = (),
    ) -> Pi0Output:
        n_steps = num_steps or self.spec.num_steps
        if keep_visual is not None:
            keep_visual = torch.as_tensor(keep_visual).long()
            if not 1 <= prune_layer < len(self.lm.layers):
                raise ValueError("prune_layer out of range")
        kv, ids, prefix_len = self.prefix_pass(inputs, keep_visual, prune_layer)
        hgt = self.spec.horizon
        s = self.spec.suffix_len  # pi0: state + actions; pi0.5: actions
        pos = prefix_len + torch.arange(s)
        dt = -1.0 / n_steps
        x = noise.float().clone()
        out = Pi0Output(torch.empty(0), torch.empty(0), ids[-1])
        for t in euler_times(n_steps):
            h = self.suffix_embeds(inputs.state, x, t)
            cond = self.time_cond(t)
            for i, layer in enumerate(self.expert.layers):
                pk, pv = kv[i]
                xn, gate = self.expert_norm(layer.input_layernorm, h, cond)
                q, k, v = self._qkv(layer, xn, pos, self.lm.rotary_emb)
                keys, vals = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
                np_ = pk.shape[1]
                visible = torch.ones(s, np_ + s, dtype=torch.bool)
                if s > hgt:
                    visible[0, np_ + 1 :] = False  # the state token does not see the actions
                o, probs = self._attend(q, keys, vals, visible)
                o = layer.self_attn.o_proj(o.to(h.dtype))
                h = h + (o if gate is None else o * gate)
                xn, gate = self.expert_norm(layer.post_attention_layernorm, h, cond)
                m = layer.mlp(xn)
                h = h + (m if gate is None else m * gate)
                if i in return_attn_layers:
                    out.attn.setdefault(i, []).append(probs.mean(0)[s - hgt :])
                    nv = ids[i].numel()
                    out.visual_cols[i] = torch.arange(nv)
                    out.visual_key_ids[i] = ids[i]
            v_t = self.action_out_proj(self.expert_norm(self.expert.norm, h, cond)[0][s - hgt :])
            x = x + dt * v_t
        out.normalized = x
        out.actions = self.norm.actions(x)
        return out

    def action_scores(self, out: Pi0Output, layer: int, num_visual: int) -> Tensor:
        """S_act of this frame at ``layer``: the action rows' attention to the visual keys,
        averaged over steps and rows, in original visual ids (0 for pruned tokens)."""
        mean = torch.stack(out.attn[layer]).mean(0).mean(0)
        scores = torch.zeros(num_visual)
        scores[out.visual_key_ids[layer]] = mean[out.visual_cols[layer]].float()
        return scores
