"""OpenVLA for vLLM without timm, with in-LLM visual token pruning.

Same checkpoint files as the published ``openvla/openvla-7b`` (config.json ``model_type:
openvla``, timm-named DINOv2/SigLIP tower weights, a Llama-2 language model, ``norm_stats``),
and small configurations of the same format (any tower width/depth, image and patch size,
fused pair or single tower, any Llama size).

vLLM's own OpenVLA class builds its towers with timm, which cannot be imported on the CPU
stack; the towers here are a compact ViT whose parameter names *are* timm's, so published
weights load by name. Processor and projector are vLLM's. The language model is vLLM's Llama;
this class runs its decoder layers itself so that layer K can drop visual tokens
(``vllm_vla_pruner.engine``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMultiModal,
)
from vllm.model_executor.models.openvla import (
    OpenVLADummyInputsBuilder,
    OpenVLAMultiModalProcessor,
    OpenVLAProcessingInfo,
    PrismaticProjector,
)
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vllm_vla_pruner.config import VisionTowerSpec, image_size, num_visual_tokens, tower_specs

# ----------------------------------------------------------------------------- processing


class VLAProcessingInfo(OpenVLAProcessingInfo):
    """vLLM's OpenVLA processing, with the token count taken from the checkpoint's towers."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return num_visual_tokens(self.get_hf_config())

    def get_image_size_with_most_features(self) -> ImageSize:
        side = image_size(self.get_hf_config())
        return ImageSize(width=side, height=side)

    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int] | None:
        return {"image": num_visual_tokens(self.get_hf_config())}


# ----------------------------------------------------------------------------- vision towers


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))  # HF-exported name of timm's gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def replicated_linear(in_features: int, out_features: int, bias: bool = True) -> ReplicatedLinear:
    """A projection of a part vLLM does not shard (vision towers, pi0's action expert): vLLM's
    linear layer, so its platform GEMM runs it (on CPU: oneDNN with the weight packed once at
    load, 10-15% faster than ATen's ``F.linear`` on the towers' 256-row GEMMs, ~1.5x on pi0's
    50-row expert GEMMs); parameter names stay ``weight`` / ``bias``."""
    return ReplicatedLinear(in_features, out_features, bias=bias, return_bias=False)


class ViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = replicated_linear(dim, 3 * dim)
        self.proj = replicated_linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = replicated_linear(dim, hidden)
        self.fc2 = replicated_linear(hidden, dim)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class ViTBlock(nn.Module):
    def __init__(self, spec: VisionTowerSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.attn = ViTAttention(spec.width, spec.num_heads)
        self.ls1 = LayerScale(spec.width) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        self.mlp = ViTMlp(spec.width, spec.mlp_hidden, spec.act)
        self.ls2 = LayerScale(spec.width) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class ViTTower(nn.Module):
    """A DINOv2- or SigLIP-style ViT in timm's parameter layout, returning OpenVLA's features.

    OpenVLA reads the second-to-last block's output (timm ``get_intermediate_layers(n={depth-2})``):
    prefix tokens dropped, no final norm. So only ``depth - 1`` blocks are built; the checkpoint's
    last block, final norm and pooling head are not loaded.
    """

    def __init__(self, spec: VisionTowerSpec, image_side: int) -> None:
        super().__init__()
        self.spec = spec
        num_patches = (image_side // spec.patch_size) ** 2
        self.patch_embed = PatchEmbed(spec.patch_size, spec.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.width)) if spec.class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, spec.num_registers, spec.width))
            if spec.num_registers
            else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, spec.width))
        self.blocks = nn.ModuleList(ViTBlock(spec) for _ in range(spec.num_blocks_used))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None
        ]
        x = torch.cat([*prefix, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, self.spec.num_prefix_tokens :]


class VisionBackbone(nn.Module):
    """One tower or OpenVLA's fused pair; features concatenated along the channel axis."""

    def __init__(self, specs: list[VisionTowerSpec], image_side: int) -> None:
        super().__init__()
        self.featurizer = ViTTower(specs[0], image_side)
        self.fused_featurizer = ViTTower(specs[1], image_side) if len(specs) > 1 else None
        self.embed_dim = sum(s.width for s in specs)

    @staticmethod
    def _channels(pixels: torch.Tensor, spec: VisionTowerSpec) -> torch.Tensor:
        # vLLM's processor stacks DINOv2 (ImageNet) then SigLIP (0.5/0.5) normalisations.
        return pixels[:, :3] if spec.family == "dinov2" else pixels[:, 3:6]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        towers = [t for t in (self.featurizer, self.fused_featurizer) if t is not None]
        feats = [t(self._channels(pixels, t.spec)) for t in towers]
        return torch.cat(feats, dim=-1)


# ----------------------------------------------------------------------------- the model


@MULTIMODAL_REGISTRY.register_processor(
    OpenVLAMultiModalProcessor,
    info=VLAProcessingInfo,
    dummy_inputs=OpenVLADummyInputsBuilder,
)
class OpenVLAForActionPrediction(nn.Module, SupportsMultiModal):
    """OpenVLA whose decoder loop can prune visual tokens after layer K.

    Unpruned steps run exactly vLLM's Llama layers; pruned steps are planned by
    ``vllm_vla_pruner.engine.runtime`` from per-request settings and run the same layers on
    fewer rows.
    """

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
        self.image_token_id = config.image_token_index
        self.specs = tower_specs(config)
        self.image_side = image_size(config)
        self.num_visual = num_visual_tokens(config)
        fused = len(self.specs) > 1

        with self._mark_tower_model(vllm_config, "image"):
            self.vision_backbone = VisionBackbone(self.specs, self.image_side)
            self.projector = PrismaticProjector(
                vision_dim=self.vision_backbone.embed_dim,
                text_dim=config.text_config.hidden_size,
                use_fused_vision_backbone=fused,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "projector"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

        from vllm_vla_pruner.engine.runtime import PrunedDecoder

        self.pruned_decoder = PrunedDecoder(self, vllm_config)

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        dtype = self.vision_backbone.featurizer.patch_embed.proj.weight.dtype
        features = self.vision_backbone(pixel_values.to(dtype))
        return self.projector(features)

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
        return self.pruned_decoder.run(hidden, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load published names as they are; skip the tower parts OpenVLA never runs."""
        unused_block = {
            "vision_backbone.featurizer.": self.specs[0].depth - 1,
            "vision_backbone.fused_featurizer.": self.specs[-1].depth - 1,
        }

        def used(weights: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in weights:
                if name.startswith("vision_backbone."):
                    tower = next(p for p in unused_block if name.startswith(p))
                    rest = name[len(tower) :]
                    if rest.startswith(("norm.", "attn_pool.", "head.", "fc_norm.")):
                        continue
                    if rest.startswith(f"blocks.{unused_block[tower]}."):
                        continue
                    if rest.endswith((".gamma",)):
                        name = name[: -len("gamma")] + "scale_factor"  # timm-native exports
                yield name, tensor

        loader = AutoWeightsLoader(self)
        return loader.load_weights(used(weights))
