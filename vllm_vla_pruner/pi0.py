"""pi0-style flow-matching VLAs in vLLM: the prefix in the paged KV cache, the action expert's
denoising loop batched over the step's requests, inside one engine forward.

Checkpoint layout: :mod:`vllm_vla_pruner.pi0_spec` (openpi's PyTorch weight names).

A request's prompt is ``BOS + text + "\\n"`` with one image per present camera (vLLM's image
processing puts the visual tokens right after BOS; a masked camera is simply not sent: in pi0
a false image mask removes its tokens from every key set and from the position count, so
leaving it out computes the same chunk without paying for its 256 rows; likewise the language
padding to ``max_token_len``). In the request's prefill forward:

* the prefix runs through the Gemma LM's vLLM layers as a prefill through paged attention:
  the kernel writes every prefix row's K/V into the paged cache and, the step's attention
  metadata being rebuilt with ``causal=False`` (``PrunedDecoder.prefix_lm``), attends over
  the whole prefix in both directions (pi0's prefix is one block); RoPE positions follow
  pi0's order (images first, then BOS and the text);
* with pruning (``engine.runtime.PrunedDecoder``), layers >= K run only the kept visual rows
  and keep KV only for them;
* each layer's K/V of the request's (kept) prefix rows is handed to the model
  (``kv_sink``), and then the action expert runs ``num_steps`` Euler steps (t = 1 -> 0,
  dt = -1/N, noise from the request's seed) over each request's suffix (state token + H
  action tokens), attending to that prefix K/V and its own rows, batched over the requests
  (padded prefixes, one masked attention per layer and step);
* the expert's action queries' attention to the visual keys at the action layer, averaged
  over the steps, is the request's VLA-Pruner action signal (into the robot's history);
* the un-normalised chunk goes out as an :class:`ActionChunk` on the step channel (the
  request asks for ``max_tokens=1``; the client reads ``kv_transfer_params["vla_actions"]``).

pi0.5 (``Pi0Spec.pi05``) differs only in the expert's input and norms: its state is binned
into the prompt (``pi0_spec.pi0_prompt_token_ids``; the model takes no state), the suffix is
the H action rows (``action_in_proj`` of the noisy action), and the flow time conditions
every expert RMSNorm (``GemmaNorm`` with ``cond``: scale, shift, and a gate on its residual
branch), as openpi's PyTorch port.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.openvla import (
    OpenVLADummyInputsBuilder,
    OpenVLAMultiModalProcessor,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.transformers_utils.processors.openvla import OpenVLAImageProcessor, to_rgb_image

from vllm_vla_pruner.config import VisionTowerSpec, image_size, num_visual_tokens, tower_specs
from vllm_vla_pruner.engine.action_block import ActionBlock
from vllm_vla_pruner.engine.plan import ActionChunk
from vllm_vla_pruner.engine.step import StepContext, StepRequest
from vllm_vla_pruner.openvla import VLAProcessingInfo, replicated_linear
from vllm_vla_pruner.pi0_spec import (
    PI0_ARCH,
    Pi0Normalizer,
    Pi0Spec,
    engine_positions,
    load_norm_stats,
    pi0_noise,
    pi0_spec,
    resize_with_pad,
)
from vllm_vla_pruner.pruning import action_scores

_VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_PROJECTOR = "paligemma_with_expert.paligemma.model.multi_modal_projector.linear."
_LM = "paligemma_with_expert.paligemma.model.language_model."
_EXPERT = "paligemma_with_expert.gemma_expert.model."
_HEADS = (
    "state_proj",
    "action_in_proj",
    "action_time_mlp_in",
    "action_time_mlp_out",
    "time_mlp_in",  # pi0.5
    "time_mlp_out",  # pi0.5
    "action_out_proj",
)


# ----------------------------------------------------------------------------- linear layers
#
# Every projection is one of vLLM's linear layers (not ``nn.Linear``) so it runs the platform's
# GEMM: on CPU, vLLM packs the weight once for oneDNN, which on one core runs the expert's
# 50-row GEMMs ~1.5x faster than ATen's ``F.linear`` does with 18 layers' weights out of cache.
# TP stays off (``disable_tp``): the expert and the towers are replicated.


def _qkv(width: int, heads: int, kv_heads: int, head_dim: int, bias: bool) -> QKVParallelLinear:
    return QKVParallelLinear(
        width, head_dim, heads, kv_heads, bias=bias, disable_tp=True, return_bias=False
    )


#: (fused parameter, checkpoint name, shard): the checkpoint keeps q/k/v and gate/up apart.
_STACKED = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


def load_stacked(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load checkpoint tensors into ``module``, q/k/v and gate/up into their fused layers."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        dotted = "." + name
        for fused, part, shard in _STACKED:
            if part in dotted:
                target = dotted.replace(part, fused)[1:]
                args: tuple = (shard,)
                break
        else:
            target, args = name, ()
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(module).__name__}")
        param = params[target]
        getattr(param, "weight_loader", default_weight_loader)(param, tensor, *args)
        loaded.add(target)
    return loaded


class Pi0ImageProcessor(OpenVLAImageProcessor):
    """openpi's camera preprocessing: each image resized to the tower's square with its
    aspect ratio kept and black padding (:func:`pi0_spec.resize_with_pad`), then vLLM's
    OpenVLA pixel normalisation (whose own resize is then a no-op); the model reads the
    SigLIP channels, pi0's [-1, 1] pixels."""

    def __call__(self, images: Any | None = None, **kwargs: object) -> dict[str, object]:
        if images is None:
            return super().__call__(images, **kwargs)
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            images = [images]
        side = self.image_size
        padded = [resize_with_pad(to_rgb_image(im), side, side) for im in images]
        return super().__call__(padded, **kwargs)


class Pi0ProcessingInfo(VLAProcessingInfo):
    """OpenVLA-style processing with pi0's cameras (up to ``num_cameras`` images a prompt)
    and openpi's aspect-preserving resize (:class:`Pi0ImageProcessor`)."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        side = self.hf_processor.image_processor.image_size
        self.hf_processor.image_processor = Pi0ImageProcessor(image_size=side)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": pi0_spec(self.ctx.model_config.model).num_cameras}


# ----------------------------------------------------------------------------- SigLIP tower


class _SiglipEmbeddings(nn.Module):
    def __init__(self, spec: VisionTowerSpec, side: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, spec.width, spec.patch_size, spec.patch_size)
        self.position_embedding = nn.Embedding((side // spec.patch_size) ** 2, spec.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class _SiglipAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_proj = _qkv(dim, heads, heads, dim // heads, bias=True)
        self.out_proj = replicated_linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv_proj(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _SiglipMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = replicated_linear(dim, hidden), replicated_linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _SiglipLayer(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.self_attn = _SiglipAttention(spec.width, spec.num_heads)
        self.layer_norm2 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.mlp = _SiglipMlp(spec.width, spec.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _SiglipEncoder(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_SiglipLayer(spec) for _ in range(spec.depth))


class SiglipTower(nn.Module):
    """PaliGemma's SigLIP in HF names: every layer, then ``post_layernorm`` (the last hidden
    state PaliGemma projects)."""

    def __init__(self, spec: VisionTowerSpec, side: int) -> None:
        super().__init__()
        self.embeddings = _SiglipEmbeddings(spec, side)
        self.encoder = _SiglipEncoder(spec)
        self.post_layernorm = nn.LayerNorm(spec.width, eps=spec.norm_eps)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_stacked(self, weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# ----------------------------------------------------------------------------- action expert


class GemmaNorm(nn.Module):
    """Gemma's RMSNorm in float32: scale ``1 + weight`` (pi0), or pi0.5's adaptive form
    (``adaptive``): ``dense(cond)`` gives scale, shift and gate, the rows become
    ``rms(x) * (1 + scale) + shift`` and the gate scales the residual branch that follows.
    Returns (normed, gate); the gate is None for the plain norm.

    The plain norm on float32 rows runs vLLM's own RMSNorm kernels (``_C.rms_norm``, and
    ``_C.fused_add_rms_norm`` for residual + norm in one pass): the same float32 math as
    ``F.rms_norm`` in one call, where PyTorch's CPU RMSNorm is several element-wise passes.
    The expert runs 370 of them per chunk on 50-row inputs, where that per-call cost adds up.
    """

    def __init__(self, dim: int, eps: float, adaptive: bool = False) -> None:
        super().__init__()
        self.eps = eps
        if adaptive:
            self.dense = nn.Linear(dim, 3 * dim)
        else:
            self.weight = nn.Parameter(torch.zeros(dim))
            self._scale: torch.Tensor | None = None  # 1 + weight, set by weights_loaded()

    def weights_loaded(self) -> None:
        """Fix ``1 + weight`` in float32 once the weight is in (not per call)."""
        if not hasattr(self, "dense"):
            self._scale = (1.0 + self.weight.detach().float()).contiguous()

    def scale(self) -> torch.Tensor:
        if self._scale is None:
            raise RuntimeError("GemmaNorm used before weights_loaded()")
        return self._scale

    def forward(
        self, x: torch.Tensor, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (x.shape[-1],)
        if cond is None:
            if x.dtype == torch.float32 and x.is_contiguous():
                out = torch.empty_like(x)
                torch.ops._C.rms_norm(out, x, self.scale(), self.eps)
                return out, None
            return F.rms_norm(x.float(), shape, self.scale(), self.eps).to(x.dtype), None
        xf = F.rms_norm(x.float(), shape, None, self.eps)
        scale, shift, gate = self.dense(cond).chunk(3, -1)
        return (xf * (1.0 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain norm of ``residual + x`` and that sum: (normed, new residual). In place
        on float32 rows (``x`` becomes the normed rows, ``residual`` the sum)."""
        if x.dtype == torch.float32 and x.is_contiguous() and residual.is_contiguous():
            torch.ops._C.fused_add_rms_norm(x, residual, self.scale(), self.eps)
            return x, residual
        residual = residual + x
        return self(residual)[0], residual


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``x + y``, or pi0.5's ``x + y * gate`` after an adaptive norm."""
    return x + y if gate is None else x + y * gate


class _ExpertAttention(nn.Module):
    """The expert's projections; its attention runs in ``_denoise_group`` against the prefix."""

    def __init__(self, width: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.qkv_proj = _qkv(width, heads, kv_heads, head_dim, bias=False)
        self.o_proj = replicated_linear(heads * head_dim, width, bias=False)


class _ExpertMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            width, [hidden, hidden], bias=False, disable_tp=True, return_bias=False
        )
        self.down_proj = replicated_linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class _ExpertLayer(nn.Module):
    def __init__(
        self, width: int, mlp: int, heads: int, kv: int, hd: int, eps: float, adaptive: bool
    ) -> None:
        super().__init__()
        self.input_layernorm = GemmaNorm(width, eps, adaptive)
        self.self_attn = _ExpertAttention(width, heads, kv, hd)
        self.post_attention_layernorm = GemmaNorm(width, eps, adaptive)
        self.mlp = _ExpertMlp(width, mlp)

    # The layer's attention runs in ``_denoise_group`` (against the cached prefix); these are
    # its two halves around it, on [T, We] rows.

    def attention_inputs(
        self, rope: nn.Module, rows: torch.Tensor, cond: torch.Tensor | None, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Norm, q/k/v, RoPE: q [T, H*D], k and v [T, Hkv*D] (strided views of the fused
        projection) and pi0.5's residual gate."""
        normed, gate = self.input_layernorm(rows, cond)
        attn = self.self_attn
        q, k, v = attn.qkv_proj(normed).split([attn.q_size, attn.kv_size, attn.kv_size], -1)
        q, k = rope(pos, q, k)  # vLLM's kernel reads the views' row stride: no copies
        return q, k, v, gate

    def after_attention(
        self,
        rows: torch.Tensor,
        attn: torch.Tensor,
        gate: torch.Tensor | None,
        cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """From the attention output [T, H*D]: output projection, residual, norm, MLP,
        residual (pi0.5: gated). May overwrite ``rows`` in place."""
        o = self.self_attn.o_proj(attn)
        if cond is None:  # pi0: residual add and norm in one kernel
            normed, rows = self.post_attention_layernorm.add_and_norm(o, rows)
            return rows + self.mlp(normed)
        rows = gated_residual(rows, o, gate)
        normed, gate = self.post_attention_layernorm(rows, cond)
        return gated_residual(rows, self.mlp(normed), gate)


def attention_with_probs(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns its probabilities, for the layer whose action rows feed
    the action signal: q [B, Hq, R, D] over keys / vals [B, Hkv, N, D] (``mask`` [B, 1, R, N],
    True = visible, or None). Returns the output [B, Hq, R, D] and the probabilities'
    head mean [B, R, N] (float32).

    Grouped heads fold into rows ([B*Hkv, G*R, D] against their shared keys: no repeated K/V);
    the scores are scaled, masked and softmaxed in place (one [B*Hkv, G*R, N] buffer)."""
    b, hq, r, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    qf = q.reshape(b * hkv, g * r, d).float()
    scores = torch.bmm(qf, keys.float().reshape(b * hkv, n, d).transpose(1, 2))
    scores.mul_(scale)
    if mask is not None:
        scores.view(b, hkv, g, r, n).masked_fill_(~mask[:, :, None], float("-inf"))
    torch.softmax(scores, -1, out=scores)
    o = torch.bmm(scores, vals.float().reshape(b * hkv, n, d)).view(b, hq, r, d).to(q.dtype)
    return o, scores.view(b, hq, r, n).mean(1)


class ActionExpert(nn.Module):
    """pi0's Gemma action expert: its own weights per layer, no embedding table (pi0.5:
    adaptive norms)."""

    def __init__(self, spec: Pi0Spec, layers: int, heads: int, kv: int, hd: int, eps: float):
        super().__init__()
        w, m, ada = spec.expert_width, spec.expert_mlp, spec.pi05
        self.layers = nn.ModuleList(
            _ExpertLayer(w, m, heads, kv, hd, eps, ada) for _ in range(layers)
        )
        self.norm = GemmaNorm(w, eps, ada)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = load_stacked(self, weights)
        self.weights_loaded()
        return loaded

    def weights_loaded(self) -> None:
        for module in self.modules():
            if isinstance(module, GemmaNorm):
                module.weights_loaded()


@functools.lru_cache(maxsize=1024)
def time_embedding(t: float, width: int, min_period: float = 4e-3, max_period: float = 4.0):
    """pi0's sin-cos embedding of the flow time [width] (float64 math, float32 result).

    Cached: a chunk's steps reuse the same few t, and the float64 math costs more than the
    expert's step inputs. Callers must not modify the returned tensor."""
    frac = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    x = torch.tensor(float(t), dtype=torch.float64) * (2 * math.pi / period)
    return torch.cat([torch.sin(x), torch.cos(x)]).float()


# ----------------------------------------------------------------------------- the model


@dataclass
class _Prefill:
    """A pi0 request whose whole prefix is in this forward."""

    req: StepRequest
    start: int
    end: int
    num_images: int = 0
    num_steps: int = 0
    seed: int = 0
    error: str | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@MULTIMODAL_REGISTRY.register_processor(
    OpenVLAMultiModalProcessor,
    info=Pi0ProcessingInfo,
    dummy_inputs=OpenVLADummyInputsBuilder,
)
class Pi0ForActionPrediction(nn.Module, SupportsMultiModal):
    """pi0: a SigLIP + Gemma prefix in vLLM's paged attention, a flow-matching action expert."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return None  # image tokens are inserted right after BOS by the processor
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.model_dir = vllm_config.model_config.model
        self.spec = pi0_spec(self.model_dir)
        self.normalizer = Pi0Normalizer(self.spec, load_norm_stats(self.model_dir, self.spec))
        self.image_token_id = config.image_token_index
        self.tower_spec = tower_specs(config)[0]
        self.tokens_per_camera = num_visual_tokens(config)
        text = config.text_config
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = text.head_dim
        self.eps = text.rms_norm_eps
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = SiglipTower(self.tower_spec, image_size(config))
            self.projector = replicated_linear(self.tower_spec.width, text.hidden_size)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=_gemma_config(text),
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["GemmaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        self.expert = ActionExpert(
            self.spec,
            text.num_hidden_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.eps,
        )
        we, a = self.spec.expert_width, self.spec.action_dim
        self.action_in_proj = replicated_linear(a, we)
        if self.spec.pi05:  # the flow time conditions the expert's norms
            self.time_mlp_in = replicated_linear(we, we)
            self.time_mlp_out = replicated_linear(we, we)
        else:  # a state token; the flow time mixed into each action token
            self.state_proj = replicated_linear(a, we)
            self.action_time_mlp_in = replicated_linear(2 * we, we)
            self.action_time_mlp_out = replicated_linear(we, we)
        self.action_out_proj = replicated_linear(we, a)
        self.dtype = vllm_config.model_config.dtype
        self._step_ids: torch.Tensor | None = None

        from vllm_vla_pruner.engine.runtime import PrunedDecoder

        self.pruned_decoder = PrunedDecoder(self, vllm_config)
        self.pruned_decoder.prefix_lm = True

    def get_language_model(self) -> nn.Module:
        return self.language_model

    # ---- inputs

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        # The processor stacks ImageNet- then SigLIP-normalised channels; SigLIP's are pi0's
        # [-1, 1] pixels.
        pixels = pixel_values[:, 3:6].to(self.dtype)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self.projector(self.vision_tower(pixels))
        self._add_times("vision", t0, c0)
        return out

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        # The forward needs each request's image rows (it gets embeddings only): keep the
        # step's ids, read before the forward that follows.
        self._step_ids = input_ids.detach().clone()
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    # ---- weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """openpi's names -> this module tree (the LM through vLLM's Gemma loader)."""
        renames = (
            (_VISION, "vision_tower."),
            (_PROJECTOR, "projector."),
            (_LM, "language_model.model."),
            (_EXPERT, "expert."),
        )

        def mapped():
            for name, tensor in weights:
                for old, new in renames:
                    if name.startswith(old):
                        yield new + name[len(old) :], tensor
                        break
                else:
                    if name.split(".")[0] in _HEADS:
                        yield name, tensor
                    # else: lm_head copies of the tied embedding, unused expert tables

        return AutoWeightsLoader(self).load_weights(mapped())

    # ---- forward

    def _prefills(self, ctx: StepContext | None, num_rows: int) -> list[_Prefill]:
        """pi0 requests whose whole prompt is in this forward (chunked prefill is off)."""
        if ctx is None or 0 not in ctx.common_metadata:
            return []
        cm = ctx.common_metadata[0]
        qsl = cm.query_start_loc_cpu.tolist()
        seq = cm.seq_lens_cpu_upper_bound
        seq = (seq if seq is not None else cm.seq_lens.cpu()).tolist()
        ids = self._step_ids
        spec, tpc = self.spec, self.tokens_per_camera
        out = []
        for i, sr in enumerate(ctx.requests):
            start, end = qsl[i], qsl[i + 1]
            if seq[i] != end - start:
                continue  # a decode step (max_tokens > 1): no chunk
            p = _Prefill(sr, start, end)
            out.append(p)
            if end - start != sr.num_prompt_tokens or end > num_rows or ids is None:
                p.error = "the pi0 prompt must be prefilled whole (recomputed or chunked)"
                continue
            image_rows = (ids[start:end] == self.image_token_id).nonzero().flatten().cpu()
            n = image_rows.numel()
            p.num_images = n // tpc
            if n % tpc or not 1 <= p.num_images <= spec.num_cameras:
                p.error = f"a pi0 request takes 1 to {spec.num_cameras} camera images"
            elif not torch.equal(image_rows, torch.arange(1, 1 + n)):
                p.error = "the images' tokens must follow BOS"
            elif sr.invalid is not None:
                p.error = sr.invalid
            elif spec.pi05:
                pass  # pi0.5's state is in the prompt's text
            elif sr.state is None or len(sr.state) != spec.state_dim:
                p.error = f"state must be {spec.state_dim} numbers"
            elif not all(math.isfinite(x) for x in sr.state):
                p.error = "state must be finite"
            p.num_steps = sr.num_steps or spec.num_steps
            p.seed = sr.noise_seed if sr.noise_seed is not None else random.getrandbits(63)
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
        if inputs_embeds is None:
            self._step_ids = input_ids
            inputs_embeds = lm.embed_input_ids(input_ids)
        decoder = self.pruned_decoder
        prefills = self._prefills(decoder.channel.current, inputs_embeds.shape[0])
        self._step_ids = None
        good = [p for p in prefills if p.error is None]
        blocks, sink = [], None
        if good:
            positions = positions.clone()  # the runner's buffer is persistent
            for p in good:
                pos = engine_positions(p.num_images, self.tokens_per_camera, p.end - p.start)
                positions[p.start : p.end] = pos.to(positions.device)
                p.kv = []
            blocks = [ActionBlock(p.start, p.start, p.end) for p in good]

            def sink(layer: int, now: list[ActionBlock], k: torch.Tensor, v: torch.Tensor):
                for p, b in zip(good, now):
                    p.kv.append((k[b.start : b.end], v[b.start : b.end]))

        t0, c0 = time.perf_counter(), time.thread_time()
        out = decoder.run(inputs_embeds, positions, blocks, kv_sink=sink)
        if good:
            self._add_times("prefix", t0, c0)
            t1, c1 = time.perf_counter(), time.thread_time()
            self._denoise(good)
            self._add_times("denoise", t1, c1)
            extra = decoder.stats.extra
            extra["pi0_chunks"] = extra.get("pi0_chunks", 0.0) + len(good)
        for p in prefills:
            if p.error is not None:
                decoder.channel.report_chunk(
                    p.req.req_id,
                    ActionChunk(self.spec.horizon, self.spec.robot_action_dim, (), error=p.error),
                )
        return out

    def _add_times(self, part: str, t0: float, c0: float) -> None:
        """Wall and this thread's CPU seconds of a part of the chunk into the decoder's
        counters (``pi0_<part>_s``, ``pi0_<part>_cpu_s``): the bench's split, and on a
        shared machine the CPU time is what other processes' load does not inflate."""
        extra = self.pruned_decoder.stats.extra
        for key, dt in (
            (f"pi0_{part}_s", time.perf_counter() - t0),
            (f"pi0_{part}_cpu_s", time.thread_time() - c0),
        ):
            extra[key] = extra.get(key, 0.0) + dt

    # ---- the denoising loop

    def _denoise(self, good: list[_Prefill]) -> None:
        """Euler steps of the expert for every request, batched per step count."""
        by_steps: dict[int, list[_Prefill]] = {}
        for p in good:
            by_steps.setdefault(p.num_steps, []).append(p)
        for steps, group in by_steps.items():
            self._denoise_group(group, steps)

    def _prefix_kv(self, group: list[_Prefill], layer: int, s: int):
        """The group's prefix K/V at ``layer`` in [B, Hkv, N + S, D] buffers (padded to the
        longest prefix N, the last S slots left for the suffix's own K/V at each step) and the
        [B, 1, S, N + S] attention mask (padding never a key; pi0's state row does not see
        the action rows)."""
        kv = [p.kv[layer] for p in group]
        n = max(k.shape[0] for k, _ in kv)
        b, hkv, d = len(group), self.num_kv_heads, self.head_dim
        ref = kv[0][0]
        keys = ref.new_zeros(b, hkv, n + s, d)
        vals = ref.new_zeros(b, hkv, n + s, d)
        mask = torch.ones(b, 1, s, n + s, dtype=torch.bool, device=ref.device)
        for j, (k, v) in enumerate(kv):
            rows = k.shape[0]
            keys[j, :, :rows] = k.view(rows, hkv, d).transpose(0, 1)
            vals[j, :, :rows] = v.view(rows, hkv, d).transpose(0, 1)
            mask[j, :, :, rows:n] = False
        if not self.spec.pi05:
            mask[:, :, 0, n + 1 :] = False
        return keys, vals, mask, n

    def _suffix_rows(
        self, x: torch.Tensor, t: float, state_emb: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expert's input rows at flow time ``t`` [B, R, We] and pi0.5's norm condition.

        pi0: each action row mixes ``action_in_proj(x)`` with the sin-cos time embedding
        (``action_time_mlp_*``), after the state row when ``state_emb`` is given. pi0.5: the
        rows are ``action_in_proj(x)``; the time goes to the norms as
        ``cond = silu(time_mlp_out(silu(time_mlp_in(emb))))``, one [We] vector for the group
        (its requests share the step's t)."""
        te = time_embedding(t, self.spec.expert_width).to(x.device, x.dtype)
        a = self.action_in_proj(x)
        if self.spec.pi05:
            return a, F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(te))))
        mixed = torch.cat([a, te.expand_as(a)], -1)
        mixed = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
        return (mixed if state_emb is None else torch.cat([state_emb, mixed], 1)), None

    def _denoise_group(self, group: list[_Prefill], steps: int) -> None:
        """Euler steps of the expert over the group's cached prefixes.

        pi0's state row sees only the prefix and itself, and its input never changes, so its
        K/V are the same at every step: the first step runs the whole suffix (state + action
        rows) and leaves the state's K/V beside the prefix's; the later steps run the action
        rows alone, which see every key, so they need no attention mask when the group's
        prefixes are equally long (the CPU attention kernel is much faster unmasked). pi0.5
        has no state row: every step runs the action rows alone, its norms conditioned on
        the step's flow time.
        """
        spec, decoder = self.spec, self.pruned_decoder
        b, h, s = len(group), spec.horizon, spec.suffix_len
        prefix = [self._prefix_kv(group, i, s) for i in range(len(self.expert.layers))]
        device, dtype = prefix[0][0].device, prefix[0][0].dtype
        # Action rows' masks: None where no request's prefix is padded at that layer.
        action_masks = [
            None if m[:, :, s - h :].all() else m[:, :, s - h :] for _, _, m, _ in prefix
        ]
        act_layer = decoder.action_layer
        track = [p.req.plan is not None and p.req.plan.track_actions for p in group]
        attn_sum = None
        # Positions continue after the (original, unpruned) prefix length.
        prefix_len = torch.tensor([p.end - p.start for p in group], device=device)
        suffix_pos = prefix_len[:, None] + torch.arange(s, device=device)[None]
        rope = self.language_model.model.layers[0].self_attn.rotary_emb
        x = torch.stack([pi0_noise(p.seed, h, spec.action_dim) for p in group]).to(device, dtype)
        state_emb = None
        if not spec.pi05:
            states = [self.normalizer.state(p.req.state) for p in group]
            state_emb = self.state_proj(torch.stack(states).to(device, dtype))[:, None]
        dt = -1.0 / steps
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qs = hq * d
        for k_step in range(steps):
            hid, cond = self._suffix_rows(x, 1.0 - k_step / steps, state_emb)  # [B, R, We]
            state_emb = None  # pi0: the state row's K/V stay in the buffers from now on
            r = hid.shape[1]
            pos = suffix_pos[:, s - r :].flatten()
            hid = hid.reshape(b * r, -1)
            for i, layer in enumerate(self.expert.layers):
                q, k, v, res_gate = layer.attention_inputs(rope, hid, cond, pos)
                q = q.reshape(b, r, hq, d).transpose(1, 2)
                keys, vals, full_mask, n = prefix[i]
                mask = full_mask if r > h else action_masks[i]
                keys[:, :, n + s - r :] = k.reshape(b, r, hkv, d).transpose(1, 2)
                vals[:, :, n + s - r :] = v.reshape(b, r, hkv, d).transpose(1, 2)
                if i == act_layer and any(track):
                    o, probs = attention_with_probs(q, keys, vals, mask, d**-0.5)
                    rows = probs[:, r - h :]  # the action rows' head mean [B, H, N + S]
                    attn_sum = rows if attn_sum is None else attn_sum + rows
                else:
                    o = F.scaled_dot_product_attention(
                        q, keys, vals, attn_mask=mask, scale=d**-0.5, enable_gqa=hq != hkv
                    )
                o = o.transpose(1, 2).reshape(b * r, qs)
                hid = layer.after_attention(hid, o, res_gate, cond)
            hid = hid.view(b, r, -1)
            v_t = self.action_out_proj(self.expert.norm(hid, cond)[0][:, r - h :])
            x = x + dt * v_t
        actions = self.normalizer.actions(x.float())
        for j, p in enumerate(group):
            values = tuple(float(t) for t in actions[j].flatten().tolist())
            decoder.channel.report_chunk(
                p.req.req_id, ActionChunk(h, spec.robot_action_dim, values)
            )
            if track[j] and attn_sum is not None and p.req.plan.session:
                self._record_actions(p, attn_sum[j] / steps, act_layer)

    def _record_actions(self, p: _Prefill, rows: torch.Tensor, layer: int) -> None:
        """The frame's action signal: the action rows' attention to the visual keys (rows
        1.. of the prefix at ``layer``, compacted to the kept ones from layer K on)."""
        decoder, plan = self.pruned_decoder, p.req.plan
        m = plan.num_visual
        kept = decoder.kept_now.get(p.req.req_id)
        ids = kept if (kept is not None and layer >= decoder.K) else torch.arange(m)
        ids = ids.to(rows.device)
        cols = torch.arange(1, 1 + ids.numel(), device=rows.device)
        decoder.record_action_scores(plan.session, action_scores(rows, cols, ids, m))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)


def _gemma_config(text) -> object:
    """vLLM's Gemma needs a GemmaConfig; the OpenVLA-style config holds the LM's shapes."""
    from transformers import GemmaConfig

    theta = float(getattr(text, "rope_theta", None) or 10000.0)
    cfg = GemmaConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    cfg.architectures = ["GemmaForCausalLM"]
    cfg.dtype = getattr(text, "dtype", None) or torch.float32
    return cfg


__all__ = ["PI0_ARCH", "GemmaNorm", "Pi0ForActionPrediction", "gated_residual", "time_embedding"]
