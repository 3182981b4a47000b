"""OpenVLA-OFT for vLLM: a whole continuous action chunk from one engine forward.

Loads the published OFT layout unchanged: the OpenVLA HF files (through
:class:`~vllm_vla_pruner.openvla.OpenVLAForActionPrediction`) plus, beside them,
``action_head--<step>_checkpoint.pt``, ``proprio_projector--<step>_checkpoint.pt`` (with or
without DDP's ``module.`` prefix) and ``dataset_statistics.json``. Published OFT configs keep
``architectures: [OpenVLAForActionPrediction]``; the engine selects this class with
``hf_overrides={"architectures": ["OpenVLAOFTForActionPrediction"]}``.

A request's prompt (:func:`oft_prompt_token_ids`) is BOS, a proprio slot, the OpenVLA prompt,
ACTION_DIM x CHUNK placeholder slots and OFT's stop token; vLLM's OpenVLA processor inserts
each camera view's visual tokens after BOS, views in request order. In the request's prefill
forward the model writes the proprio token (the projector of the normalised state, sent in
``extra_args["vla_state"]``), zeroes the placeholders' input embeddings, lets the placeholders
and the stop token attend to each other in both directions (``engine.action_block``), and runs
the L1 head on the final hidden states of the row before each action token (OFT's train-time
shift). The un-normalised chunk is reported on the step channel beside the pruning outcome and
reaches the client in the final output's ``kv_transfer_params["vla_actions"]``; the request
asks for one token (``max_tokens=1``), so no decode step runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.openvla import (
    OpenVLADummyInputsBuilder,
    OpenVLAMultiModalProcessor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_vla_pruner.config import (
    OFT_STOP_TOKEN_ID,
    OftSpec,
    load_oft_statistics,
    oft_bounds,
    oft_spec,
    strip_ddp_prefix,
)
from vllm_vla_pruner.engine.action_block import ActionBlock
from vllm_vla_pruner.engine.plan import ActionChunk
from vllm_vla_pruner.engine.step import StepContext
from vllm_vla_pruner.openvla import OpenVLAForActionPrediction, VLAProcessingInfo

OFT_ARCH = "OpenVLAOFTForActionPrediction"
#: Token id of the proprio slot and of the placeholders in the prompt sent to the engine; the
#: model overwrites those rows' embeddings, so any id works (OFT itself uses 1 for them).
SLOT_TOKEN_ID = 0


@lru_cache(maxsize=8)
def _spec(model_dir: str) -> OftSpec:
    return oft_spec(model_dir)


def oft_prompt_token_ids(prompt_ids: Sequence[int], spec: OftSpec) -> list[int]:
    """Engine prompt of an OFT request from OpenVLA's prompt ids (BOS first, "▁" last)."""
    ids = [int(t) for t in prompt_ids]
    proprio = [SLOT_TOKEN_ID] if spec.proprio_dim else []
    return (
        ids[:1] + proprio + ids[1:] + [SLOT_TOKEN_ID] * spec.num_placeholders + [OFT_STOP_TOKEN_ID]
    )


class OftProcessingInfo(VLAProcessingInfo):
    """OpenVLA's processing with OFT's camera views: up to ``num_images`` images per prompt."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": _spec(self.ctx.model_config.model).num_images}


# ----------------------------------------------------------------------------- OFT modules


class ProprioProjector(nn.Module):
    """OFT's proprio projector: normalised state -> one LLM input embedding."""

    def __init__(self, proprio_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MLPResNetBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """ACTION_DIM hidden states per chunk step -> that step's normalised action."""

    def __init__(self, hidden: int, action_dim: int) -> None:
        super().__init__()
        self.model = MLPResNet(hidden * action_dim, hidden, action_dim)

    def forward(self, rows: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.model(rows.reshape(rows.shape[0], chunk, -1))


# ----------------------------------------------------------------------------- the model


class _Prefill:
    """An OFT request whose whole prompt is in this forward: its rows and action block."""

    def __init__(self, req_id: str, start: int, end: int, spec: OftSpec, num_visual: int):
        self.req_id = req_id
        self.start, self.end = start, end
        self.block_start = end - spec.num_action_rows  # placeholders + stop token
        self.proprio_row = start + 1 + spec.num_images * num_visual
        self.head_start = self.block_start - 1  # the row before each action token
        self.error: str | None = None
        self.state: tuple[float, ...] | None = None


@MULTIMODAL_REGISTRY.register_processor(
    OpenVLAMultiModalProcessor,
    info=OftProcessingInfo,
    dummy_inputs=OpenVLADummyInputsBuilder,
)
class OpenVLAOFTForActionPrediction(OpenVLAForActionPrediction):
    """OpenVLA-OFT: parallel decoding of a continuous action chunk in the prefill forward."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.model_dir = vllm_config.model_config.model
        self.oft = _spec(self.model_dir)
        # One budget over all views: the spatial pruners see the views stacked vertically.
        rows, cols = self.pruned_decoder.grid
        self.pruned_decoder.grid = (rows * self.oft.num_images, cols)
        stats = load_oft_statistics(self.model_dir)
        hidden = self.config.text_config.hidden_size
        self.proprio_projector = (
            ProprioProjector(self.oft.proprio_dim, hidden) if self.oft.proprio_dim else None
        )
        self.action_head = L1RegressionActionHead(hidden, self.oft.action_dim)
        self._action_bounds = [
            torch.tensor(x, dtype=torch.float64) for x in oft_bounds(self.oft, stats, "action")
        ]
        self._proprio_bounds = (
            [torch.tensor(x, dtype=torch.float64) for x in oft_bounds(self.oft, stats, "proprio")]
            if self.oft.proprio_dim
            else None
        )

    # ---- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The OpenVLA files through the parent, then OFT's component files beside them."""
        loaded = super().load_weights(weights)
        parts = [("action_head", self.action_head, self.oft.action_head_file)]
        if self.proprio_projector is not None:
            parts.append(
                ("proprio_projector", self.proprio_projector, self.oft.proprio_projector_file)
            )
        for name, module, filename in parts:
            state = torch.load(
                Path(self.model_dir) / filename, map_location="cpu", weights_only=True
            )
            state = strip_ddp_prefix(state)
            module.load_state_dict(state, strict=True)
            loaded |= {f"{name}.{k}" for k in state}
        return loaded

    # ---- normalisation (OFT's normalize_proprio / _unnormalize_actions)

    def _normalize_state(self, state: Sequence[float]) -> torch.Tensor:
        low, high, mask = self._proprio_bounds
        x = torch.tensor(state, dtype=torch.float64)
        return torch.where(mask.bool(), 2 * (x - low) / (high - low + 1e-8) - 1, x).clamp(-1, 1)

    def _unnormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        low, high, mask = self._action_bounds
        x = normalized.double().cpu()
        return torch.where(mask.bool(), 0.5 * (x + 1) * (high - low + 1e-8) + low, x)

    # ---- forward

    def _prefills(self, ctx: StepContext | None, num_rows: int) -> list[_Prefill]:
        """OFT requests whose whole prompt is in this forward (chunked prefill is off)."""
        if ctx is None or 0 not in ctx.common_metadata:
            return []
        cm = ctx.common_metadata[0]
        qsl = cm.query_start_loc_cpu.tolist()
        seq = cm.seq_lens_cpu_upper_bound
        seq = (seq if seq is not None else cm.seq_lens.cpu()).tolist()
        out = []
        for i, sr in enumerate(ctx.requests):
            q_len = qsl[i + 1] - qsl[i]
            if seq[i] != q_len:
                continue  # a decode step (or the rest of a chunked prefill): no action block
            p = _Prefill(sr.req_id, qsl[i], qsl[i + 1], self.oft, self.num_visual)
            min_len = 1 + self.oft.num_images * self.num_visual + self.oft.num_action_rows + 1
            if q_len != sr.num_prompt_tokens or q_len < min_len or p.end > num_rows:
                p.error = "the OFT prompt must be prefilled whole (recomputed or too short)"
            elif self.proprio_projector is not None:
                if sr.state is None or len(sr.state) != self.oft.proprio_dim:
                    p.error = f"state must be {self.oft.proprio_dim} numbers"
                elif not all(abs(x) < float("inf") for x in sr.state):
                    p.error = "state must be finite"
                else:
                    p.state = sr.state
            out.append(p)
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        lm = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        decoder = self.pruned_decoder
        prefills = self._prefills(decoder.channel.current, hidden.shape[0])
        good = [p for p in prefills if p.error is None]
        if good:
            hidden = hidden.clone()  # the runner's embedding buffer is persistent
            for p in good:
                hidden[p.block_start : p.end - 1] = 0  # the placeholders; the stop token stays
            if self.proprio_projector is not None:
                states = torch.stack([self._normalize_state(p.state) for p in good])
                proprio = self.proprio_projector(states.to(hidden.device, hidden.dtype))
                rows = torch.tensor([p.proprio_row for p in good], device=hidden.device)
                hidden[rows] = proprio
        blocks = [ActionBlock(p.start, p.block_start, p.end) for p in good]
        out = decoder.run(hidden, positions, blocks)
        self._report_chunks(out, prefills)
        return out

    def _report_chunks(self, hidden: torch.Tensor, prefills: list[_Prefill]) -> None:
        spec = self.oft
        good = [p for p in prefills if p.error is None]
        if good:
            idx = torch.cat(
                [torch.arange(p.head_start, p.head_start + spec.num_placeholders) for p in good]
            ).to(hidden.device)
            rows = hidden[idx].view(len(good), spec.num_placeholders, -1)
            actions = self._unnormalize(self.action_head(rows, spec.chunk).float())
            for p, chunk in zip(good, actions):
                values = tuple(float(x) for x in chunk.flatten().tolist())
                self.pruned_decoder.channel.report_chunk(
                    p.req_id, ActionChunk(spec.chunk, spec.action_dim, values)
                )
        for p in prefills:
            if p.error is not None:
                self.pruned_decoder.channel.report_chunk(
                    p.req_id, ActionChunk(spec.chunk, spec.action_dim, (), error=p.error)
                )


def spec_of(model_dir: str) -> OftSpec:
    """The OFT contract the engine serves for ``model_dir`` (cached)."""
    return _spec(str(model_dir))


__all__ = [
    "OFT_ARCH",
    "OpenVLAOFTForActionPrediction",
    "oft_prompt_token_ids",
    "spec_of",
]
