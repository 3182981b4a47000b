"""An independent plain-PyTorch OpenVLA-OFT, to check the engine's parallel decoding against.

Towers, projector and Llama come from :class:`~vllm_vla_pruner.research.reference.
ReferenceOpenVLA` (transformers' modules, never the plugin's model file); OFT's parts are
written here from the paper and the public ``moojink/openvla-oft`` code:

* sequence: BOS, each camera view's M visual tokens (views in order), the proprio token
  (``ProprioProjector`` of the normalised state), the prompt (ending in the lone "▁"), then
  ACTION_DIM x CHUNK placeholder rows whose input embeddings are zero, then the stop token
  ``</s>`` with its real embedding;
* attention: the prompt rows are causal; the action rows (placeholders and stop token) see
  the whole prompt and each other (``attention="prefix_causal"``, the contract in the issue).
  ``attention="bidirectional"`` makes every row see every row, which is what OFT's
  transformers fork does at inference (``causal_mask`` None, openvla-oft issue 89);
* head: OFT reads the final (normed) hidden states shifted by one row, as at train time: the
  last prompt row and the first ACTION_DIM x CHUNK - 1 placeholders; each chunk step's
  ACTION_DIM rows are concatenated into the L1 head (MLPResNet, 2 blocks);
* un-normalisation with the checkpoint's bounds (q01/q99 or min/max) where the mask is set.

Pruning is expressed exactly as in the OpenVLA reference: layers ``>= prune_layer`` see only
the kept visual rows (of all views, one index space ``view * M + patch``), with original
RoPE positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vllm_vla_pruner.config import (
    OFT_STOP_TOKEN_ID,
    OftSpec,
    load_oft_statistics,
    oft_bounds,
    oft_spec,
    strip_ddp_prefix,
)
from vllm_vla_pruner.research.reference import ReferenceOpenVLA

__all__ = ["OftInputs", "OftOutput", "ReferenceOFT", "MLPResNet", "ProprioProjector"]

#: "prefix_causal": the issue's contract; "bidirectional": OFT's fork at inference (every row
#: sees every row); "causal": plain causal attention (an ablation, and a sensitivity check
#: for tests: an engine that dropped the action block would match it).
ATTENTION_MODES = ("prefix_causal", "bidirectional", "causal")


class ProprioProjector(nn.Module):
    """Robot state (normalised) -> one LLM input embedding: Linear, GELU, Linear."""

    def __init__(self, proprio_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """OFT's L1-regression head body; parameter names as in its checkpoints (``model.*``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.mlp_resnet_blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class _L1Head(nn.Module):
    def __init__(self, hidden: int, action_dim: int) -> None:
        super().__init__()
        self.model = MLPResNet(hidden * action_dim, hidden, action_dim)


@dataclass
class OftInputs:
    inputs_embeds: Tensor  # [T, H]
    num_views: int
    num_visual_per_view: int
    visual_start: int  # 1 (after BOS)
    action_start: int  # row of the first placeholder
    num_placeholders: int

    @property
    def num_visual(self) -> int:
        return self.num_views * self.num_visual_per_view

    @property
    def prompt_len(self) -> int:
        return self.action_start

    @property
    def total_len(self) -> int:
        return self.inputs_embeds.shape[0]


@dataclass
class OftOutput:
    normalized: Tensor  # [chunk, action_dim], the head's output
    actions: Tensor  # [chunk, action_dim], un-normalised (float64)
    head_rows: Tensor  # [ACTION_DIM x CHUNK, H] final hidden states the head read
    positions: list[Tensor] = field(default_factory=list)  # rows each layer ran on
    attn: dict[int, Tensor] = field(default_factory=dict)  # layer -> [rows, keys] head-mean


class ReferenceOFT(nn.Module):
    """OpenVLA-OFT: the OpenVLA reference plus proprio projector and L1 action head."""

    def __init__(self, base: ReferenceOpenVLA, spec: OftSpec, stats: Mapping[str, Any]) -> None:
        super().__init__()
        self.base = base
        self.spec = spec
        self.stats = stats
        hidden = base.text_config.hidden_size
        self.proprio_projector = (
            ProprioProjector(spec.proprio_dim, hidden) if spec.proprio_dim else None
        )
        self.action_head = _L1Head(hidden, spec.action_dim)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, unnorm_key: str | None = None, dtype=torch.float32
    ) -> ReferenceOFT:
        model_dir = Path(model_dir)
        spec = oft_spec(model_dir, unnorm_key)
        model = cls(
            ReferenceOpenVLA.from_pretrained(model_dir), spec, load_oft_statistics(model_dir)
        )
        head = torch.load(model_dir / spec.action_head_file, map_location="cpu", weights_only=True)
        model.action_head.load_state_dict(strip_ddp_prefix(head), strict=True)
        if model.proprio_projector is not None:
            state = torch.load(
                model_dir / spec.proprio_projector_file, map_location="cpu", weights_only=True
            )
            model.proprio_projector.load_state_dict(strip_ddp_prefix(state), strict=True)
        return model.to(dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    # ---- normalisation (OFT's normalize_proprio / _unnormalize_actions) ------------------

    def normalize_state(self, state: Sequence[float]) -> Tensor:
        low, high, mask = (
            torch.tensor(x, dtype=torch.float64)
            for x in oft_bounds(self.spec, self.stats, "proprio")
        )
        x = torch.as_tensor(state, dtype=torch.float64)
        y = torch.where(mask.bool(), 2 * (x - low) / (high - low + 1e-8) - 1, x)
        return y.clamp(-1.0, 1.0)

    def unnormalize_actions(self, normalized: Tensor) -> Tensor:
        low, high, mask = (
            torch.tensor(x, dtype=torch.float64)
            for x in oft_bounds(self.spec, self.stats, "action")
        )
        x = normalized.double()
        return torch.where(mask.bool(), 0.5 * (x + 1) * (high - low + 1e-8) + low, x)

    # ---- inputs ------------------------------------------------------------------------

    @torch.no_grad()
    def build_inputs(
        self,
        images: Sequence[Any],
        instruction: str | Sequence[int],
        state: Sequence[float] | None,
    ) -> OftInputs:
        """``images``: one per camera view (PIL/array or [1|, 6, S, S] pixel values)."""
        spec = self.spec
        if len(images) != spec.num_images:
            raise ValueError(f"expected {spec.num_images} camera views, got {len(images)}")
        if (state is None) != (self.proprio_projector is None):
            raise ValueError(
                "state is required exactly when the checkpoint has a proprio projector"
            )
        base = self.base
        ids = (
            base.prompt_token_ids(instruction)
            if isinstance(instruction, str)
            else [int(t) for t in instruction]
        )
        embed = base.language_model.get_input_embeddings()
        text = embed(torch.tensor(ids, dtype=torch.long))
        parts = [text[:1]]
        for image in images:
            parts.append(base.visual_embeddings(base._as_pixel_values(image)).to(text.dtype))
        if self.proprio_projector is not None:
            proprio = self.normalize_state(state).to(self.dtype)
            parts.append(self.proprio_projector(proprio)[None].to(text.dtype))
        parts.append(text[1:])
        action_start = sum(p.shape[0] for p in parts)
        parts.append(text.new_zeros(spec.num_placeholders, text.shape[1]))
        parts.append(embed(torch.tensor([OFT_STOP_TOKEN_ID])))
        return OftInputs(
            torch.cat(parts),
            spec.num_images,
            base.num_visual,
            1,
            action_start,
            spec.num_placeholders,
        )

    # ---- forward -------------------------------------------------------------------------

    def _layer(
        self, layer: nn.Module, h: Tensor, pos: Tensor, visible: Tensor, keep_attn: bool
    ) -> tuple[Tensor, Tensor | None]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        cfg = self.base.text_config
        nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
        r = h.shape[0]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(r, nh, hd).transpose(0, 1)
        k = attn.k_proj(x).view(r, kvh, hd).transpose(0, 1)
        v = attn.v_proj(x).view(r, kvh, hd).transpose(0, 1)
        cos, sin = self.base.language_model.model.rotary_emb(x, pos[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        keys = k[0].repeat_interleave(nh // kvh, dim=0).float()
        vals = v.repeat_interleave(nh // kvh, dim=0).float()
        scores = (q[0].float() @ keys.transpose(1, 2)) * attn.scaling
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out = (probs @ vals).to(h.dtype).transpose(0, 1).reshape(r, nh * hd)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, (probs.mean(dim=0) if keep_attn else None)

    @torch.no_grad()
    def forward_inputs(
        self,
        inputs: OftInputs,
        keep_visual: Tensor | Sequence[int] | None = None,
        prune_layer: int = 3,
        attention: str = "prefix_causal",
        return_attn_layers: Sequence[int] = (),
    ) -> OftOutput:
        """One forward over prompt + action rows; the chunk from the L1 head."""
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}")
        layers = self.base.language_model.model.layers
        t, vs, m, a0 = inputs.total_len, inputs.visual_start, inputs.num_visual, inputs.action_start
        keep = ReferenceOpenVLA._check_keep(keep_visual, m, prune_layer, len(layers))
        pos = torch.arange(t)
        h = inputs.inputs_embeds.to(self.dtype)
        out = OftOutput(torch.empty(0), torch.empty(0), torch.empty(0))
        for i, layer in enumerate(layers):
            if keep is not None and i == prune_layer:
                sel = torch.cat([torch.arange(vs), vs + keep, torch.arange(vs + m, t)])
                h, pos = h[sel], pos[sel]
            if attention == "bidirectional":
                visible = torch.ones(len(pos), len(pos), dtype=torch.bool)
            elif attention == "causal":
                visible = pos[None, :] <= pos[:, None]
            else:  # causal, except that action rows see every action row
                visible = (pos[None, :] <= pos[:, None]) | (
                    (pos[:, None] >= a0) & (pos[None, :] >= a0)
                )
            h, probs = self._layer(layer, h, pos, visible, i in return_attn_layers)
            out.positions.append(pos.clone())
            if probs is not None:
                out.attn[i] = probs
        h = self.base.language_model.model.norm(h)
        # OFT's head reads the row before each action token (train-time shift).
        first = int((pos == a0 - 1).nonzero())
        rows = h[first : first + inputs.num_placeholders]
        spec = self.spec
        normalized = self.action_head.model(rows.reshape(spec.chunk, -1)).float()
        out.head_rows, out.normalized = rows, normalized
        out.actions = self.unnormalize_actions(normalized)
        return out

    def predict_chunk(
        self,
        images: Sequence[Any],
        instruction: str | Sequence[int],
        state: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> OftOutput:
        return self.forward_inputs(self.build_inputs(images, instruction, state), **kwargs)
