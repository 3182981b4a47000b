"""An independent plain-PyTorch OpenVLA, to check the vLLM plugin against and to train.

Built from transformers' own modules (``Dinov2WithRegistersModel``, ``SiglipVisionModel``,
``LlamaForCausalLM``), never from the plugin's model file or vLLM, so a shared bug cannot
hide. It loads the published checkpoint format (timm tower names, mapped here at load time)
and writes it back (``save_pretrained``).

``generate`` runs the language model through a hand-written loop over the decoder layers
with its own KV cache, so the pruned forward of VLA-Pruner is expressible exactly: layers
``< prune_layer`` see every token; from ``prune_layer`` on, only BOS, the kept visual tokens
(original order) and the text tokens remain, each with its original RoPE position, and only
they are cached for the decode steps. It can also return head-averaged attention
probabilities (float32) of chosen layers, to check the engine's importance scores.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vllm_vla_pruner.actions import ActionDecoder
from vllm_vla_pruner.config import VisionTowerSpec, image_size, load_config_json, tower_specs

__all__ = [
    "AttnRecord",
    "ReferenceForwardOutput",
    "ReferenceInputs",
    "ReferenceOpenVLA",
    "ReferenceOutput",
    "hf_tower_state_from_timm",
    "load_published_weights",
    "timm_tower_state_from_hf",
]

IGNORE_INDEX = -100
TOWER_PREFIXES = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")
LM_PREFIX = "language_model."
_HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


# --------------------------------------------------------------------------------------
# timm <-> transformers tower weights
# --------------------------------------------------------------------------------------


def _check_hf_expressible(spec: VisionTowerSpec) -> None:
    if spec.family == "dinov2" and not spec.class_token:
        raise NotImplementedError("the reference's DINOv2 tower always has a class token")
    if spec.family == "siglip" and (spec.class_token or spec.num_registers or spec.layer_scale):
        raise NotImplementedError("SigLIP towers have no class/register tokens or LayerScale")


def hf_tower_state_from_timm(
    timm: Mapping[str, Tensor], spec: VisionTowerSpec
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """timm-named tower weights -> (HF state dict of the blocks OpenVLA runs, the rest).

    The HF tower holds only blocks ``0 .. depth-2`` (OpenVLA reads block ``depth-2``'s
    output); the last block, timm's attention-pool head and anything unknown are returned
    untouched as the second dict so ``save_pretrained`` can write them back.
    """
    _check_hf_expressible(spec)
    rest = dict(timm)
    take = rest.pop
    d = spec.width
    hf: dict[str, Tensor] = {}
    used = spec.num_blocks_used
    if spec.family == "dinov2":
        pos = take("pos_embed")
        # HF adds a class position; timm (no_embed_class) adds none: a zero row is the same.
        hf["embeddings.position_embeddings"] = torch.cat([pos.new_zeros(1, 1, d), pos], dim=1)
        hf["embeddings.cls_token"] = take("cls_token")
        hf["embeddings.mask_token"] = pos.new_zeros(1, d)
        hf["embeddings.register_tokens"] = (
            take("reg_token") if spec.num_registers else pos.new_zeros(1, 0, d)
        )
        hf["embeddings.patch_embeddings.projection.weight"] = take("patch_embed.proj.weight")
        hf["embeddings.patch_embeddings.projection.bias"] = take("patch_embed.proj.bias")
        names = {
            "norm1": "norm1",
            "norm2": "norm2",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        qkv_prefix, layer_fmt = "attention.", "encoder.layer.{}."
        hf["layernorm.weight"], hf["layernorm.bias"] = take("norm.weight"), take("norm.bias")
    else:
        hf["embeddings.patch_embedding.weight"] = take("patch_embed.proj.weight")
        hf["embeddings.patch_embedding.bias"] = take("patch_embed.proj.bias")
        hf["embeddings.position_embedding.weight"] = take("pos_embed")[0]
        names = {
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "attn.proj": "self_attn.out_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        qkv_prefix, layer_fmt = "self_attn.", "encoder.layers.{}."
        hf["post_layernorm.weight"] = take("norm.weight")
        hf["post_layernorm.bias"] = take("norm.bias")
    for i in range(used):
        src, dst = f"blocks.{i}.", layer_fmt.format(i)
        for old, new in names.items():
            hf[f"{dst}{new}.weight"] = take(f"{src}{old}.weight")
            hf[f"{dst}{new}.bias"] = take(f"{src}{old}.bias")
        qkv_w, qkv_b = take(f"{src}attn.qkv.weight"), take(f"{src}attn.qkv.bias")
        # timm's qkv rows are [q; k; v], each head-major (reshape(B, N, 3, H, hd)).
        for j, part in enumerate("qkv"):
            hf[f"{dst}{qkv_prefix}{part}_proj.weight"] = qkv_w[j * d : (j + 1) * d]
            hf[f"{dst}{qkv_prefix}{part}_proj.bias"] = qkv_b[j * d : (j + 1) * d]
        if spec.family == "dinov2":
            for n in ("1", "2"):
                scale = rest.pop(f"{src}ls{n}.scale_factor", None)
                gamma = rest.pop(f"{src}ls{n}.gamma", None)  # timm's own name
                scale = scale if scale is not None else gamma
                if scale is None:
                    if spec.layer_scale:
                        raise KeyError(f"{src}ls{n}.scale_factor missing")
                    scale = torch.ones(d, dtype=qkv_w.dtype)
                hf[f"{dst}layer_scale{n}.lambda1"] = scale
    return hf, rest


def timm_tower_state_from_hf(
    hf: Mapping[str, Tensor], rest: Mapping[str, Tensor], spec: VisionTowerSpec
) -> dict[str, Tensor]:
    """Inverse of ``hf_tower_state_from_timm`` (published timm names)."""
    d = spec.width
    out: dict[str, Tensor] = {}
    if spec.family == "dinov2":
        if spec.class_token:
            out["cls_token"] = hf["embeddings.cls_token"]
        if spec.num_registers:
            out["reg_token"] = hf["embeddings.register_tokens"]
        out["pos_embed"] = hf["embeddings.position_embeddings"][:, 1:]
        out["patch_embed.proj.weight"] = hf["embeddings.patch_embeddings.projection.weight"]
        out["patch_embed.proj.bias"] = hf["embeddings.patch_embeddings.projection.bias"]
        names = {
            "norm1": "norm1",
            "norm2": "norm2",
            "attn.proj": "attention.o_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        qkv_prefix, layer_fmt = "attention.", "encoder.layer.{}."
        out["norm.weight"], out["norm.bias"] = hf["layernorm.weight"], hf["layernorm.bias"]
    else:
        out["pos_embed"] = hf["embeddings.position_embedding.weight"][None]
        out["patch_embed.proj.weight"] = hf["embeddings.patch_embedding.weight"]
        out["patch_embed.proj.bias"] = hf["embeddings.patch_embedding.bias"]
        names = {
            "norm1": "layer_norm1",
            "norm2": "layer_norm2",
            "attn.proj": "self_attn.out_proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
        }
        qkv_prefix, layer_fmt = "self_attn.", "encoder.layers.{}."
        out["norm.weight"], out["norm.bias"] = (
            hf["post_layernorm.weight"],
            hf["post_layernorm.bias"],
        )
    for i in range(spec.num_blocks_used):
        dst, src = f"blocks.{i}.", layer_fmt.format(i)
        for new, old in names.items():
            out[f"{dst}{new}.weight"] = hf[f"{src}{old}.weight"]
            out[f"{dst}{new}.bias"] = hf[f"{src}{old}.bias"]
        out[f"{dst}attn.qkv.weight"] = torch.cat(
            [hf[f"{src}{qkv_prefix}{p}_proj.weight"] for p in "qkv"], dim=0
        )
        out[f"{dst}attn.qkv.bias"] = torch.cat(
            [hf[f"{src}{qkv_prefix}{p}_proj.bias"] for p in "qkv"], dim=0
        )
        if spec.family == "dinov2" and spec.layer_scale:
            out[f"{dst}ls1.scale_factor"] = hf[f"{src}layer_scale1.lambda1"]
            out[f"{dst}ls2.scale_factor"] = hf[f"{src}layer_scale2.lambda1"]
    assert d == out["pos_embed"].shape[-1]
    out.update(rest)
    return out


def load_published_weights(model_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {model_dir}")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, Tensor] = {}
    for shard in shards:
        out.update(load_file(str(model_dir / shard)))
    return out


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def _build_tower(spec: VisionTowerSpec, size: int) -> nn.Module:
    """A transformers vision model holding blocks 0..depth-2 of ``spec`` (eager attention)."""
    _check_hf_expressible(spec)
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    common = dict(
        hidden_size=spec.width,
        num_hidden_layers=spec.num_blocks_used,
        num_attention_heads=spec.num_heads,
        hidden_act=_HF_ACT[spec.act],
        layer_norm_eps=spec.norm_eps,
        image_size=size,
        patch_size=spec.patch_size,
        num_channels=3,
        attn_implementation="eager",
    )
    if spec.family == "siglip":
        return SiglipVisionModel(
            SiglipVisionConfig(intermediate_size=spec.mlp_hidden, vision_use_head=False, **common)
        )
    ratio = max(1, spec.mlp_hidden // spec.width)
    model = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            mlp_ratio=ratio,
            num_register_tokens=spec.num_registers,
            qkv_bias=True,
            layerscale_value=1.0,
            drop_path_rate=0.0,
            use_swiglu_ffn=False,
            **common,
        )
    )
    if ratio * spec.width != spec.mlp_hidden:  # HF's config only takes an integer ratio
        for layer in model.encoder.layer:
            layer.mlp.fc1 = nn.Linear(spec.width, spec.mlp_hidden)
            layer.mlp.fc2 = nn.Linear(spec.mlp_hidden, spec.width)
    return model


class PrismaticProjector(nn.Module):
    """OpenVLA's projector: fused fc1 (4x) - GELU - fc2 - GELU - fc3; single fc1 - GELU - fc2."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if self.fused else x


class ReferenceInputs(NamedTuple):
    inputs_embeds: Tensor  # [T, H]
    input_ids: Tensor  # [T], image placeholder ids at visual_start .. visual_start + M
    visual_start: int
    num_visual: int


@dataclass
class AttnRecord:
    """Head-averaged attention (float32) of one layer over a whole generate call.

    Rows: the prefill rows this layer computed (all T, or only the kept ones from the
    pruning layer on), then one row per decode step. Columns: every key the layer cached,
    in cache order. ``probs[i, j]`` is 0 where query i could not see key j (causal).
    """

    query_positions: Tensor  # [Rq] original positions
    key_positions: Tensor  # [Rk] original positions
    probs: Tensor  # [Rq, Rk]
    num_prefill_rows: int

    def dense(self, num_positions: int | None = None) -> Tensor:
        """Probabilities scattered to original key positions: [Rq, num_positions]."""
        n = num_positions if num_positions is not None else int(self.key_positions.max()) + 1
        out = self.probs.new_zeros(self.probs.shape[0], n)
        out[:, self.key_positions] = self.probs
        return out

    @property
    def prefill(self) -> Tensor:
        """[R, R]: prefill rows over prefill keys."""
        r = self.num_prefill_rows
        return self.probs[:r, :r]

    def action_rows(self) -> Tensor:
        """Rows of the queries that emit the generated tokens (last prefill row + decodes)."""
        return self.probs[self.num_prefill_rows - 1 :]


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    logits: Tensor  # [n, text vocab], the distribution each token was chosen from
    attn: dict[int, AttnRecord] = field(default_factory=dict)
    prompt_len: int = 0  # T, image placeholders included
    kept_positions: Tensor | None = None  # positions layers >= prune_layer saw in prefill


class ReferenceForwardOutput(NamedTuple):
    loss: Tensor | None
    logits: Tensor  # [B, T', vocab]
    input_ids: Tensor  # [B, T'] with the image placeholders
    labels: Tensor | None
    attention_mask: Tensor | None


class _LayerCache:
    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.pos: Tensor | None = None

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        self.pos = pos if self.pos is None else torch.cat([self.pos, pos])


class _AttnCollector:
    def __init__(self) -> None:
        self.rows: list[tuple[Tensor, Tensor]] = []  # (query positions, probs [r, n_keys])
        self.num_prefill_rows = 0

    def finish(self, key_positions: Tensor) -> AttnRecord:
        n = key_positions.numel()
        probs = torch.cat([F.pad(p, (0, n - p.shape[1])) for _, p in self.rows])
        qpos = torch.cat([q for q, _ in self.rows])
        return AttnRecord(qpos, key_positions.clone(), probs, self.num_prefill_rows)


def _zero_class_position_grad(grad: Tensor) -> Tensor:
    """timm's DINOv2 has no class position embedding: keep HF's extra row at zero."""
    return torch.cat([torch.zeros_like(grad[:, :1]), grad[:, 1:]], dim=1)


class ReferenceOpenVLA(nn.Module):
    """OpenVLA from transformers parts. ``forward`` = batched teacher forcing (training)."""

    def __init__(self, config: Mapping[str, Any], tokenizer: Any = None) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = json.loads(json.dumps(dict(config)))  # plain, private copy
        self.specs = tower_specs(self.config)
        self.image_size = image_size(self.config)
        self.fused = bool(self.config.get("use_fused_vision_backbone", True))
        self.towers = nn.ModuleList([_build_tower(s, self.image_size) for s in self.specs])
        text = dict(self.config["text_config"])
        text.setdefault("architectures", ["LlamaForCausalLM"])
        text.pop("torch_dtype", None)
        text.pop("dtype", None)
        self.text_config = LlamaConfig(**text)
        self.text_config._attn_implementation = "sdpa"
        self.language_model = LlamaForCausalLM(self.text_config)
        hidden = self.text_config.hidden_size
        self.projector = PrismaticProjector(sum(s.width for s in self.specs), hidden, self.fused)
        self.image_token_id = int(self.config.get("image_token_index", self.config["pad_token_id"]))
        self.num_visual = (self.image_size // self.specs[0].patch_size) ** 2
        self.action_decoder = ActionDecoder.from_config(self.config)
        self.tokenizer = tokenizer
        self.source_dir: Path | None = None
        # timm tensors OpenVLA never uses (last block, final norms' partners, attn-pool):
        # kept only so save_pretrained writes the published file back unchanged.
        self.unused_tower_weights: list[dict[str, Tensor]] = [{} for _ in self.specs]
        for tower, spec in zip(self.towers, self.specs):
            if spec.family == "dinov2":
                self._pin_timm_semantics(tower, spec)

    @staticmethod
    def _pin_timm_semantics(tower: nn.Module, spec: VisionTowerSpec) -> None:
        """Keep the HF-only degrees of freedom at their timm values during training."""
        tower.embeddings.position_embeddings.register_hook(_zero_class_position_grad)
        tower.embeddings.mask_token.requires_grad_(False)
        if not spec.layer_scale:
            for layer in tower.encoder.layer:
                layer.layer_scale1.lambda1.requires_grad_(False)
                layer.layer_scale2.lambda1.requires_grad_(False)

    # ---- loading / saving -------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, load_tokenizer: bool = True
    ) -> ReferenceOpenVLA:
        model_dir = Path(model_dir)
        tokenizer = None
        if load_tokenizer:
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every tensor is overwritten by the strict load below
            model = cls(load_config_json(model_dir), tokenizer=tokenizer)
        model.load_published_state_dict(load_published_weights(model_dir))
        model.source_dir = model_dir
        return model.to(dtype).eval()

    def load_published_state_dict(self, weights: Mapping[str, Tensor]) -> None:
        """Load tensors named as in the published checkpoint (strict: no missing/extra)."""
        weights = dict(weights)
        for i, (tower, spec) in enumerate(zip(self.towers, self.specs)):
            prefix = TOWER_PREFIXES[i]
            timm = {k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}
            hf, rest = hf_tower_state_from_timm(timm, spec)
            tower.load_state_dict(hf, strict=True)
            self.unused_tower_weights[i] = {k: v.clone() for k, v in rest.items()}
        proj = {
            k[len("projector.") :]: weights.pop(k)
            for k in list(weights)
            if k.startswith("projector.")
        }
        self.projector.load_state_dict(proj, strict=True)
        lm = {k[len(LM_PREFIX) :]: weights.pop(k) for k in list(weights) if k.startswith(LM_PREFIX)}
        missing, unexpected = self.language_model.load_state_dict(lm, strict=False)
        if missing or unexpected:
            raise KeyError(f"language model weights: missing {missing}, unexpected {unexpected}")
        if weights:
            raise KeyError(f"unexpected checkpoint tensors: {sorted(weights)[:10]}")

    def published_state_dict(self) -> dict[str, Tensor]:
        """All tensors under their published (timm / Llama) names."""
        out: dict[str, Tensor] = {}
        for i, (tower, spec) in enumerate(zip(self.towers, self.specs)):
            rest = {k: v.to(self.dtype) for k, v in self.unused_tower_weights[i].items()}
            timm = timm_tower_state_from_hf(tower.state_dict(), rest, spec)
            out.update({TOWER_PREFIXES[i] + k: v for k, v in timm.items()})
        out.update({"projector." + k: v for k, v in self.projector.state_dict().items()})
        out.update({LM_PREFIX + k: v for k, v in self.language_model.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the published format: config.json, model.safetensors, tokenizer files."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dtype = str(self.dtype).removeprefix("torch.")
        config = json.loads(json.dumps(self.config))
        config["torch_dtype"] = dtype
        for key in ("torch_dtype", "dtype"):
            config["text_config"][key] = dtype
        save_file(
            self.published_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"}
        )
        (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        src = self.source_dir
        if src is not None and src.resolve() != out.resolve():
            for f in src.iterdir():
                skip = f.name == "config.json" or f.name.startswith("model")
                if f.is_file() and not skip:
                    shutil.copy2(f, out / f.name)
        elif src is None and self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    # ---- vision ------------------------------------------------------------------

    def pixel_values(self, image: Any) -> Tensor:
        """vLLM's OpenVLA preprocessing (shared, not the model): [1, 6, S, S]."""
        from vllm.transformers_utils.processors.openvla import preprocess_openvla_image

        return preprocess_openvla_image(image, self.image_size)[None].to(self.dtype)

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """[B, 6, S, S] -> [B, M, sum of tower widths]: block depth-2 output, prefix dropped."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 6:
            raise ValueError(f"pixel_values must be [B, 6, S, S], got {tuple(pixel_values.shape)}")
        feats = []
        for tower, spec in zip(self.towers, self.specs):
            chans = pixel_values[:, :3] if spec.family == "dinov2" else pixel_values[:, 3:]
            out = tower(pixel_values=chans.to(self.dtype), output_hidden_states=True)
            # hidden_states[-1] is the last HF block's output before the final norm: timm's
            # get_intermediate_layers(n={depth - 2}, norm=False).
            h = out.hidden_states[-1]
            feats.append(h[:, spec.num_prefix_tokens :])
        return torch.cat(feats, dim=-1)

    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """[B, 6, S, S] -> projector output [B, M, H]."""
        return self.projector(self.vision_features(pixel_values))

    def visual_embeddings(self, pixel_values: Tensor) -> Tensor:
        """One image ([6,S,S] or [1,6,S,S]) -> its LLM input embeddings [M, H]."""
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        if pixel_values.shape[0] != 1:
            raise ValueError("visual_embeddings takes one image; use embed_images for batches")
        return self.embed_images(pixel_values)[0]

    # ---- prompt ------------------------------------------------------------------

    def _as_pixel_values(self, image: Any) -> Tensor:
        if isinstance(image, Tensor) and image.shape[-3] == 6:  # already preprocessed
            return (image if image.dim() == 4 else image[None]).to(self.dtype)
        return self.pixel_values(image)

    def prompt_token_ids(self, instruction: str) -> list[int]:
        if self.tokenizer is None:
            raise RuntimeError("this ReferenceOpenVLA was loaded without a tokenizer")
        return self.action_decoder.prompt_token_ids(self.tokenizer, instruction)

    def build_inputs(self, image: Any, instruction: str | Sequence[int]) -> ReferenceInputs:
        """Prompt embeddings with the M visual embeddings right after BOS (as vLLM inserts).

        ``instruction`` is text (OpenVLA's prompt is built around it) or prompt token ids
        (BOS first, no image placeholders).
        """
        if isinstance(instruction, str):
            ids = self.prompt_token_ids(instruction)
        else:
            ids = [int(t) for t in instruction]
        m = self.num_visual
        input_ids = torch.tensor(ids[:1] + [self.image_token_id] * m + ids[1:], dtype=torch.long)
        vis = self.visual_embeddings(self._as_pixel_values(image))
        emb = self.language_model.get_input_embeddings()(input_ids).clone()
        emb[1 : 1 + m] = vis.to(emb.dtype)
        return ReferenceInputs(emb, input_ids, 1, m)

    # ---- hand-written decoder loop -------------------------------------------------

    def _layer_step(
        self,
        layer: nn.Module,
        h: Tensor,
        pos: Tensor,
        cache: _LayerCache,
        collect: _AttnCollector | None,
    ) -> Tensor:
        """One Llama decoder layer over rows ``h`` [R, H] at original positions ``pos``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        cfg = self.text_config
        nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = attn.head_dim
        r = h.shape[0]
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(r, nh, hd).transpose(0, 1)
        k = attn.k_proj(x).view(r, kvh, hd).transpose(0, 1)
        v = attn.v_proj(x).view(r, kvh, hd).transpose(0, 1)
        cos, sin = self.language_model.model.rotary_emb(x, pos[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        cache.append(k[0], v, pos)
        keys = cache.k.repeat_interleave(nh // kvh, dim=0).float()
        vals = cache.v.repeat_interleave(nh // kvh, dim=0).float()
        scores = (q[0].float() @ keys.transpose(1, 2)) * attn.scaling  # [nh, R, N]
        visible = cache.pos[None, :] <= pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        if collect is not None:
            collect.rows.append((pos.clone(), probs.mean(dim=0)))
        out = (probs @ vals).to(h.dtype).transpose(0, 1).reshape(r, nh * hd)
        h = h + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h_last: Tensor) -> Tensor:
        lm = self.language_model
        return lm.lm_head(lm.model.norm(h_last)).float()

    @torch.no_grad()
    def generate(
        self,
        image: Any,
        instruction: str | Sequence[int],
        max_new_tokens: int | None = None,
        keep_visual: Tensor | Sequence[int] | None = None,
        prune_layer: int = 3,
        return_attn_layers: Sequence[int] = (),
        unnorm_key: str | None = None,
    ) -> ReferenceOutput:
        """Greedy decoding, optionally VLA-Pruner-pruned (``keep_visual``: kept visual indices).

        ``max_new_tokens`` defaults to the action dimension of ``unnorm_key`` (the only
        dataset if there is one). ``image`` may be a PIL image/array or preprocessed
        pixel values ([1, 6, S, S]).
        """
        return self.generate_from_inputs(
            self.build_inputs(image, instruction),
            max_new_tokens
            if max_new_tokens is not None
            else self.action_decoder.action_dim(unnorm_key),
            keep_visual=keep_visual,
            prune_layer=prune_layer,
            return_attn_layers=return_attn_layers,
        )

    @torch.no_grad()
    def generate_from_inputs(
        self,
        inputs: ReferenceInputs,
        max_new_tokens: int,
        keep_visual: Tensor | Sequence[int] | None = None,
        prune_layer: int = 3,
        return_attn_layers: Sequence[int] = (),
    ) -> ReferenceOutput:
        layers = self.language_model.model.layers
        n_layers = len(layers)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        bad = [i for i in return_attn_layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"return_attn_layers {bad} out of range [0, {n_layers})")
        emb, _, vs, m = inputs
        t = emb.shape[0]
        keep = self._check_keep(keep_visual, m, prune_layer, n_layers)
        caches = [_LayerCache() for _ in layers]
        collectors = {i: _AttnCollector() for i in return_attn_layers}

        pos = torch.arange(t)
        h = emb.to(self.dtype)
        kept_positions = None
        for i, layer in enumerate(layers):
            if keep is not None and i == prune_layer:
                sel = torch.cat([torch.arange(vs), vs + keep, torch.arange(vs + m, t)])
                h, pos = h[sel], pos[sel]
                kept_positions = pos.clone()
            h = self._layer_step(layer, h, pos, caches[i], collectors.get(i))
        for c in collectors.values():
            c.num_prefill_rows = len(c.rows[0][0])
        logits = [self._logits(h[-1])]
        tokens = [int(logits[-1].argmax())]
        embed = self.language_model.get_input_embeddings()
        for step in range(1, max_new_tokens):
            h = embed(torch.tensor([tokens[-1]]))
            p = torch.tensor([t + step - 1])
            for i, layer in enumerate(layers):
                h = self._layer_step(layer, h, p, caches[i], collectors.get(i))
            logits.append(self._logits(h[-1]))
            tokens.append(int(logits[-1].argmax()))
        attn = {i: c.finish(caches[i].pos) for i, c in collectors.items()}
        return ReferenceOutput(tokens, torch.stack(logits), attn, t, kept_positions)

    @staticmethod
    def _check_keep(
        keep_visual: Tensor | Sequence[int] | None, m: int, prune_layer: int, n_layers: int
    ) -> Tensor | None:
        if keep_visual is None:
            return None
        if not 0 <= prune_layer <= n_layers:
            raise ValueError(f"prune_layer must be in [0, {n_layers}], got {prune_layer}")
        keep = torch.as_tensor(keep_visual, dtype=torch.long).flatten()
        if keep.numel() and (keep.min() < 0 or keep.max() >= m):
            raise ValueError(f"keep_visual indices must be in [0, {m})")
        keep = torch.sort(keep).values
        if keep.numel() != torch.unique(keep).numel():
            raise ValueError("keep_visual indices must be unique")
        return keep

    def predict_action(
        self, image: Any, instruction: str, unnorm_key: str | None = None, **generate_kwargs: Any
    ) -> list[float]:
        """OpenVLA's ``predict_action``: greedy action tokens -> un-normalised action."""
        out = self.generate(image, instruction, unnorm_key=unnorm_key, **generate_kwargs)
        return self.action_decoder.decode(out.token_ids, unnorm_key)

    # ---- batched teacher forcing (training) ----------------------------------------

    def expand_image_tokens(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Insert M image placeholders after BOS unless every row already has exactly M.

        Inserted positions get label ``IGNORE_INDEX`` and attention mask 1; existing
        placeholders also get ``IGNORE_INDEX``.
        """
        m, img = self.num_visual, self.image_token_id
        counts = (input_ids == img).sum(dim=1)
        if bool((counts == m).all()):
            if labels is not None:
                labels = labels.masked_fill(input_ids == img, IGNORE_INDEX)
            return input_ids, labels, attention_mask
        if bool(counts.any()):
            raise ValueError(f"each row must hold 0 or exactly {m} image placeholders")
        b = input_ids.shape[0]

        def insert(x: Tensor, fill: int) -> Tensor:
            pad = x.new_full((b, m), fill)
            return torch.cat([x[:, :1], pad, x[:, 1:]], dim=1)

        return (
            insert(input_ids, img),
            None if labels is None else insert(labels, IGNORE_INDEX),
            None if attention_mask is None else insert(attention_mask, 1),
        )

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> ReferenceForwardOutput:
        """Teacher-forced batch (right padding); HF's shifted cross-entropy when ``labels``."""
        ids, labels, attention_mask = self.expand_image_tokens(input_ids, labels, attention_mask)
        is_img = ids == self.image_token_id
        vis = self.embed_images(pixel_values)
        emb = self.language_model.get_input_embeddings()(ids.masked_fill(is_img, 0))
        emb = emb.masked_scatter(is_img[..., None], vis.to(emb.dtype))
        out = self.language_model(inputs_embeds=emb, attention_mask=attention_mask, labels=labels)
        return ReferenceForwardOutput(out.loss, out.logits, ids, labels, attention_mask)
