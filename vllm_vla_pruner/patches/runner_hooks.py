"""Worker side: tell the model which requests a forward's rows belong to.

Why: vLLM calls ``model.forward`` with flat rows only. In-LLM pruning needs, per step, each
request's pruning plan (in ``query_start_loc`` order) and the ``CommonAttentionMetadata`` each
KV group's builder received, to build compacted metadata for layers >= K. No public hook
exists; ``GPUModelRunner._model_forward`` is documented as the override point for model
execution and the CPU runner inherits it. ``_on_request_state_removed`` is the runner's own
hook for request-scoped side caches (used to commit a robot's action scores).
vLLM: 0.32.x. Upstream: attention-score capture / in-LLM token dropping were requested in
vllm-project/vllm issues 3394, 11365 and 20108 and have no API yet.
"""

from __future__ import annotations

from typing import Any

from vllm_vla_pruner.engine import step as step_ctx
from vllm_vla_pruner.engine.settings import KEY_PLAN


def _wrap_builders(runner: Any) -> None:
    for gid, groups in enumerate(runner.attn_groups):
        for group in groups:
            builder = group.get_metadata_builder(0)
            if getattr(builder, "_vla_wrapped", False):
                continue
            original = builder.build

            def build(common_prefix_len, common_attn_metadata, *a, _orig=original, _gid=gid, **k):
                step_ctx.record_common_metadata(_gid, common_attn_metadata)
                return _orig(common_prefix_len, common_attn_metadata, *a, **k)

            builder.build = build
            builder._vla_wrapped = True


def _step_requests(runner: Any) -> list[step_ctx.StepRequest]:
    out = []
    for req_id in runner.input_batch.req_ids:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = (params.extra_args or {}) if params is not None else {}
        max_tokens = (params.max_tokens or 0) if params is not None else 0
        out.append(step_ctx.StepRequest(req_id, extra.get(KEY_PLAN), max_tokens))
    return out


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(GPUModelRunner, "_vla_hooked", False):
        return
    original_forward = GPUModelRunner._model_forward
    original_init_kv = GPUModelRunner.initialize_kv_cache
    original_removed = GPUModelRunner._on_request_state_removed

    def initialize_kv_cache(self, *args, **kwargs):
        result = original_init_kv(self, *args, **kwargs)
        _wrap_builders(self)
        return result

    def _model_forward(self, *args, **kwargs):
        ctx = step_ctx.StepContext(
            runner=self,
            requests=_step_requests(self),
            common_metadata=step_ctx.recorded_common_metadata(),
        )
        step_ctx.set_current(ctx)
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            step_ctx.set_current(None)

    def _on_request_state_removed(self, req_id, req_state):
        decoder = getattr(self.get_model(), "pruned_decoder", None)
        if decoder is not None:
            blocks = [len(ids) for ids in req_state.block_ids] if req_state is not None else []
            decoder.on_request_finished(req_id, blocks)
        return original_removed(self, req_id, req_state)

    def vla_pruner_report(self):
        decoder = getattr(self.model_runner.get_model(), "pruned_decoder", None)
        return decoder.report() if decoder is not None else None

    def vla_pruner_kv_layout(self):
        cfg = self.model_runner.kv_cache_config
        return [
            {
                "layers": len(g.layer_names),
                "page_bytes": g.kv_cache_spec.page_size_bytes,
                "block_size": g.kv_cache_spec.block_size,
                "spec": type(g.kv_cache_spec).__name__,
                "num_blocks": cfg.num_blocks,
            }
            for g in cfg.kv_cache_groups
        ]

    # Worker RPC methods (``collective_rpc("vla_pruner_report")``): how benchmarks and the
    # metrics exporter read the worker's pruning counters without pickled callables.
    WorkerBase.vla_pruner_report = vla_pruner_report
    WorkerBase.vla_pruner_kv_layout = vla_pruner_kv_layout
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._vla_hooked = True
