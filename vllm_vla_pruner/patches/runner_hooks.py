"""Worker side: tell the model which requests a forward's rows belong to, and report back.

Why: vLLM calls ``model.forward`` with flat rows only. In-LLM pruning needs, per step, each
request's pruning plan (in ``query_start_loc`` order) and the ``CommonAttentionMetadata`` each
KV group's builder received, to build compacted metadata for layers >= K. No public hook
exists; the V1 ``GPUModelRunner._model_forward`` is documented as the override point for model
execution and the CPU runner inherits it. ``_on_request_state_removed`` is the runner's own
hook for request-scoped side caches (used to commit a robot's action scores).
``sample_tokens`` builds the step's ``ModelRunnerOutput``: the forward's per-request outcomes
are attached to it (attribute ``OUTCOMES_ATTR``), so the scheduler learns what was pruned;
so are the action chunks of parallel-decoding models (``CHUNKS_ATTR``).

Only the V1 runner is hooked (``SUPPORTED_RUNNERS``). ``Worker.load_model`` is wrapped to
refuse to start when the runner the worker built is not a hooked one, so a model runner the
hooks do not cover can never serve the plugin's model silently unpruned.
vLLM: 0.32.x (checked by feature, ``patches.requirements``). Upstream: attention-score capture
/ in-LLM token dropping were requested in vllm-project/vllm issues 3394, 11365 and 20108 and
have no API yet.
"""

from __future__ import annotations

from typing import Any

from vllm_vla_pruner.engine.plan import CHUNKS_ATTR, KEY_STATE, OUTCOMES_ATTR, PruningPlan
from vllm_vla_pruner.engine.settings import (
    KEY_NOISE_SEED,
    KEY_NUM_STEPS,
    KEY_PLAN,
    InvalidPruningSetting,
    validate_noise_seed,
    validate_num_steps,
)
from vllm_vla_pruner.engine.step import StepChannel, StepContext, StepRequest


class UnsupportedRunnerError(RuntimeError):
    """The worker built a model runner the plugin's hooks do not cover."""


def _decoder(runner: Any) -> Any:
    """The model's pruned decoder, or None for models that are not the plugin's."""
    try:
        model = runner.get_model()
    except (AttributeError, AssertionError, RuntimeError):
        return None
    return getattr(model, "pruned_decoder", None)


def _wrap_builders(runner: Any, channel: StepChannel) -> None:
    for gid, groups in enumerate(runner.attn_groups):
        for group in groups:
            builder = group.get_metadata_builder(0)
            if getattr(builder, "_vla_wrapped", False):
                continue
            original = builder.build

            def build(common_prefix_len, common_attn_metadata, *a, _orig=original, _gid=gid, **k):
                channel.record_common_metadata(_gid, common_attn_metadata)
                return _orig(common_prefix_len, common_attn_metadata, *a, **k)

            builder.build = build
            builder._vla_wrapped = True


def _step_requests(runner: Any) -> list[StepRequest]:
    out = []
    for req_id in runner.input_batch.req_ids:
        state = runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        extra = (params.extra_args or {}) if params is not None else {}
        wire = extra.get(KEY_PLAN)
        seed, steps, invalid = _flow_settings(extra, params)
        out.append(
            StepRequest(
                req_id=req_id,
                plan=None if wire is None else PruningPlan.from_wire(wire),
                max_tokens=(params.max_tokens or 0) if params is not None else 0,
                num_prompt_tokens=getattr(state, "num_prompt_tokens", 0) or 0,
                state=_robot_state(extra.get(KEY_STATE)),
                noise_seed=seed,
                num_steps=steps,
                invalid=invalid,
            )
        )
    return out


def _flow_settings(extra: dict, params: Any) -> tuple[int | None, int | None, str | None]:
    """(noise seed, Euler steps, error) of a flow-matching request; the noise seed falls back
    to ``SamplingParams.seed``. Checked again here: a request that skipped the API's checks
    fails alone instead of running with guessed settings."""
    try:
        seed = extra.get(KEY_NOISE_SEED, getattr(params, "seed", None))
        steps = extra.get(KEY_NUM_STEPS)
        return (
            None if seed is None else validate_noise_seed(seed),
            None if steps is None else validate_num_steps(steps),
            None,
        )
    except InvalidPruningSetting as exc:
        return None, None, str(exc)


def _robot_state(raw: Any) -> tuple[float, ...] | None:
    """The request's robot state as floats; None when absent or not a flat number list
    (the model then reports the chunk as failed: the API validates states first)."""
    if not isinstance(raw, (list, tuple)):
        return None
    try:
        return tuple(float(x) for x in raw)
    except (TypeError, ValueError):
        return None


def attach_outcomes(result: Any, channel: StepChannel) -> Any:
    """Put the step's outcomes on the ``ModelRunnerOutput`` the scheduler will read."""
    outcomes = channel.take_outcomes()
    chunks = channel.take_chunks()
    if not outcomes and not chunks:
        return result
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    # Synchronous scheduling returns the output itself, asynchronous a wrapper around it.
    target = result if isinstance(result, ModelRunnerOutput) else None
    if target is None:
        target = getattr(result, "_model_runner_output", None)
    if not isinstance(target, ModelRunnerOutput) or target is EMPTY_MODEL_RUNNER_OUTPUT:
        # Without a carrier the scheduler fails the pruned requests: loud, never silent.
        return result
    if outcomes:
        setattr(target, OUTCOMES_ATTR, outcomes)
    if chunks:
        setattr(target, CHUNKS_ATTR, chunks)
    return result


def runner_kind(runner_cls: type) -> str:
    """``"v1"`` for vLLM's V1 GPU runner and its subclasses (the CPU runner), else ``"v2"``
    (or ``"other"`` for runners of other platforms)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if issubclass(runner_cls, GPUModelRunner):
        return "v1"
    module = runner_cls.__module__
    return "v2" if module.startswith(("vllm.v1.worker.gpu.", "vllm.v1.worker.cpu.")) else "other"


def check_runner(runner: Any) -> None:
    """Refuse a worker whose runner the hooks do not cover, when it serves our model."""
    from vllm_vla_pruner import SUPPORTED_RUNNERS

    if _decoder(runner) is None:
        return
    kind = runner_kind(type(runner))
    if kind not in SUPPORTED_RUNNERS or not getattr(type(runner), "_vla_hooked", False):
        raise UnsupportedRunnerError(
            f"vla_pruner: the worker built {type(runner).__module__}.{type(runner).__name__} "
            f"(model runner {kind}); the plugin's pruning hooks cover {SUPPORTED_RUNNERS} only. "
            "Set VLLM_USE_V2_MODEL_RUNNER=0 for every vLLM process (the plugin sets it unless "
            "it was set to 1, or HiSparse / watermarking force V2)."
        )


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(GPUModelRunner, "_vla_hooked", False):
        return
    original_forward = GPUModelRunner._model_forward
    original_init_kv = GPUModelRunner.initialize_kv_cache
    original_removed = GPUModelRunner._on_request_state_removed
    original_sample = GPUModelRunner.sample_tokens
    original_load = Worker.load_model

    def initialize_kv_cache(self, *args, **kwargs):
        result = original_init_kv(self, *args, **kwargs)
        decoder = _decoder(self)
        if decoder is not None:
            _wrap_builders(self, decoder.channel)
        return result

    def _model_forward(self, *args, **kwargs):
        decoder = _decoder(self)
        if decoder is None:
            return original_forward(self, *args, **kwargs)
        channel = decoder.channel
        ctx = StepContext(self, _step_requests(self), channel.recorded_common_metadata())
        with channel.step(ctx):
            return original_forward(self, *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        result = original_sample(self, *args, **kwargs)
        decoder = _decoder(self)
        return result if decoder is None else attach_outcomes(result, decoder.channel)

    def _on_request_state_removed(self, req_id, req_state):
        decoder = _decoder(self)
        if decoder is not None:
            blocks = [len(ids) for ids in req_state.block_ids] if req_state is not None else []
            decoder.on_request_finished(req_id, blocks)
        return original_removed(self, req_id, req_state)

    def load_model(self, *args, **kwargs):
        result = original_load(self, *args, **kwargs)
        check_runner(self.model_runner)
        return result

    def vla_pruner_report(self):
        decoder = _decoder(self.model_runner)
        return decoder.report() if decoder is not None else None

    def vla_pruner_runner(self) -> dict[str, Any]:
        cls = type(self.model_runner)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "kind": runner_kind(cls),
            "hooked": bool(getattr(cls, "_vla_hooked", False)),
            "forward_hooked": cls._model_forward is _model_forward,
        }

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

    # Worker RPC methods (``collective_rpc("vla_pruner_report")``): how benchmarks, metrics and
    # tests read the worker's pruning counters and runner without pickled callables.
    WorkerBase.vla_pruner_report = vla_pruner_report
    WorkerBase.vla_pruner_runner = vla_pruner_runner
    WorkerBase.vla_pruner_kv_layout = vla_pruner_kv_layout
    Worker.load_model = load_model
    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._vla_unhooked_model_forward = original_forward  # for the fallback test
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._vla_hooked = True
