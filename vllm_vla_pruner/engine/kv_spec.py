"""A KV cache group for layers >= K that really allocates fewer blocks for pruned requests.

Layers >= K store KV only for BOS, the kept visual tokens and the text/action tokens. Giving
those layers their own spec type puts them in their own KV cache group(s) (vLLM's hybrid KV
cache), with their own block tables; this group's manager sizes each request for
``num_tokens - P`` slots, where P = M - num_keep was fixed by the scheduler-side plan
(read from the scheduler's :class:`~vllm_vla_pruner.engine.scheduler_state.SchedulerPruning`,
which the scheduler patch attaches to these managers).

The spec is a plain ``AttentionSpec`` subclass on purpose: a ``FullAttentionSpec`` subclass
would be merged back into the full-attention group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

if TYPE_CHECKING:
    from vllm_vla_pruner.engine.scheduler_state import SchedulerPruning


@dataclass(frozen=True, kw_only=True)
class PrunedAttentionSpec(AttentionSpec):
    """Full causal attention over the tokens that survive pruning at layer K."""

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @classmethod
    def from_full(cls, spec: FullAttentionSpec) -> PrunedAttentionSpec:
        return cls(
            block_size=spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            head_size_v=spec.head_size_v,
            dtype=spec.dtype,
            kv_quant_mode=spec.kv_quant_mode,
            page_size_padded=spec.page_size_padded,
            block_stride_alignment=spec.block_stride_alignment,
            dcp_sharded=spec.dcp_sharded,
            max_tp_shards=spec.max_tp_shards,
        )

    def copy_with_new_block_size(self, block_size: int) -> PrunedAttentionSpec:
        from dataclasses import replace

        return replace(self, block_size=block_size)


class PrunedAttentionManager(FullAttentionManager):
    """Allocates ``num_tokens - P`` slots per request; everything else as full attention."""

    #: Set by the scheduler patch when the scheduler's pruning state is created.
    pruning: SchedulerPruning | None = None

    def _pruned_slots(self, request_id: str) -> int:
        return self.pruning.pruned_slots(request_id) if self.pruning is not None else 0

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        num_tokens = max(num_tokens - self._pruned_slots(request_id), 0)
        return super().get_num_blocks_to_allocate(request_id, num_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        p = self._pruned_slots(request_id)
        return super().allocate_new_blocks(
            request_id, max(num_tokens - p, 0), max(num_tokens_main_model - p, 0)
        )


_registered = False


def register_spec() -> None:
    """Register the spec/manager pair with vLLM (every process: specs cross process lines)."""
    global _registered
    if _registered:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()  # else the built-in specs would be dropped
    KVCacheSpecRegistry.register(
        PrunedAttentionSpec, PrunedAttentionManager, uniform_type_base_spec=PrunedAttentionSpec
    )
    _registered = True
