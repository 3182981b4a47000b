"""Engine-core side: plan each request, check the worker pruned it, return what it did.

Why: the KV blocks of layers >= K must be sized before the worker decides which tokens to
keep, and warm-up (the first ``window`` frames of a robot episode run unpruned) must be
decided once, in one process. Three ``Scheduler`` methods are wrapped; the state lives in one
:class:`~vllm_vla_pruner.engine.scheduler_state.SchedulerPruning` per scheduler:

* ``add_request`` fixes the request's :class:`PruningPlan` before any allocation and puts its
  wire form in ``sampling_params.extra_args`` for the worker;
* ``update_from_output`` takes the worker's outcomes from the step's ``ModelRunnerOutput``;
  a request planned to be pruned whose forward did not prune (a model runner without the
  plugin's hooks, a replayed graph) is finished with ``FINISHED_ERROR``: the client gets an
  error, never an answer that claims pruning that did not happen; the engine keeps serving;
* ``_free_request`` returns the plan and the outcome with the final output, merged into
  ``kv_transfer_params`` (beside a configured KV connector's own entries, not instead of them),
  and so the action chunk of a parallel-decoding model (OFT), under ``ACTIONS_KEY``.

vLLM: 0.32.x (checked by feature, ``patches.requirements``). Upstream: none (per-request
model state has no scheduler API).
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from vllm_vla_pruner.engine.plan import ACTIONS_KEY, CHUNKS_ATTR, OUTCOMES_ATTR, PUBLIC_KEY
from vllm_vla_pruner.engine.scheduler_state import SchedulerPruning
from vllm_vla_pruner.engine.settings import KEY_PLAN, PruningSettings

logger = init_logger(__name__)

MODEL_TYPE = "openvla"
OFT_ARCH = "OpenVLAOFTForActionPrediction"


def _is_vla(vllm_config: Any) -> bool:
    hf = getattr(vllm_config.model_config, "hf_config", None)
    return getattr(hf, "model_type", None) == MODEL_TYPE


def pruning_state(scheduler: Any) -> SchedulerPruning | None:
    """The scheduler's pruning state, created on first use (None for non-VLA models)."""
    state = getattr(scheduler, "_vla_pruning", None)
    if state is None and _is_vla(scheduler.vllm_config):
        from vllm_vla_pruner.engine.kv_spec import PrunedAttentionManager

        state = SchedulerPruning(PruningSettings.from_vllm_config(scheduler.vllm_config))
        for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, PrunedAttentionManager):
                manager.pruning = state
        scheduler._vla_pruning = state
    return state


def visual_span(items: list[tuple[int, int]]) -> tuple[int, int] | None | bool:
    """(start, length) of all images' visual tokens, the pruning candidates (one budget over
    every camera view); None without images, False if they are not one contiguous span."""
    if not items:
        return None
    items = sorted(items)
    start = items[0][0]
    length = sum(n for _, n in items)
    if items[-1][0] + items[-1][1] != start + length:
        return False
    return start, length


def _oft_views(scheduler: Any) -> int | None:
    """Camera views per request of an OFT model (None for other models), read once."""
    if not hasattr(scheduler, "_vla_oft_views"):
        views = None
        model_config = scheduler.vllm_config.model_config
        archs = getattr(getattr(model_config, "hf_config", None), "architectures", None) or []
        if OFT_ARCH in archs:
            from vllm_vla_pruner.config import oft_spec

            views = oft_spec(model_config.model).num_images
        scheduler._vla_oft_views = views
    return scheduler._vla_oft_views


def plan_request(scheduler: Any, request: Any) -> None:
    state = pruning_state(scheduler)
    if state is None or request.sampling_params is None:
        return
    features = getattr(request, "mm_features", None) or []
    span = visual_span([(f.mm_position.offset, f.mm_position.length) for f in features])
    extra = request.sampling_params.extra_args or {}
    views = _oft_views(scheduler)
    if views is not None and len(features) != views:
        # OFT's layout (proprio row, action block) assumes every view: fail, never guess.
        state.refuse(request.request_id, f"OFT needs {views} camera views, got {len(features)}")
        return
    if span is False:
        state.refuse(request.request_id, "the images' visual tokens are not one contiguous span")
        return
    plan = state.plan(
        request.request_id, extra, request.session_id, span, request.sampling_params.seed
    )
    if plan is not None:
        request.sampling_params.extra_args = {**extra, KEY_PLAN: plan.to_wire()}


def fail_unpruned(scheduler: Any, outputs: dict[int, Any], req_ids: list[str]) -> None:
    """Finish requests whose forward did not prune as planned with an error output."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    failed = set(req_ids)
    for req_id in req_ids:
        logger.error(
            "vla_pruner: request %s did not run as planned (invalid settings, or a forward "
            "that did not prune: the model runner did not run the plugin's hooks); failing it",
            req_id,
        )
    alive = [r for r in (scheduler.requests.get(i) for i in req_ids) if r is not None]
    alive = [r for r in alive if not r.is_finished()]
    scheduler.finish_requests([r.request_id for r in alive], RequestStatus.FINISHED_ERROR)
    answered = set()
    for group in outputs.values():
        for out in group.outputs:
            if out.request_id in failed:
                out.new_token_ids = []
                out.finish_reason = FinishReason.ERROR
                answered.add(out.request_id)
    for request in alive:
        if request.request_id not in answered:
            group = outputs.setdefault(request.client_index, EngineCoreOutputs())
            group.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=FinishReason.ERROR,
                )
            )


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_vla_hooked", False):
        return
    original_add = Scheduler.add_request
    original_update = Scheduler.update_from_output
    original_free = Scheduler._free_request

    def add_request(self, request):
        plan_request(self, request)
        return original_add(self, request)

    def update_from_output(self, scheduler_output, model_runner_output):
        state = getattr(self, "_vla_pruning", None)
        failed = []
        if state is not None:  # before the step is processed: it may release requests
            failed = state.take_outcomes(
                scheduler_output.num_scheduled_tokens,
                getattr(model_runner_output, OUTCOMES_ATTR, None),
            )
            state.take_chunks(getattr(model_runner_output, CHUNKS_ATTR, None))
        outputs = original_update(self, scheduler_output, model_runner_output)
        if failed:
            fail_unpruned(self, outputs, failed)
        return outputs

    def _free_request(self, request, *args, **kwargs):
        kv_params, ec_params = original_free(self, request, *args, **kwargs)
        state = getattr(self, "_vla_pruning", None)
        result = state.release(request.request_id) if state is not None else None
        if result is not None:
            kv_params = {**(kv_params or {}), PUBLIC_KEY: result.to_public()}
        chunk = state.release_chunk(request.request_id) if state is not None else None
        if chunk is not None:
            kv_params = {**(kv_params or {}), ACTIONS_KEY: chunk.to_public()}
        return kv_params, ec_params

    Scheduler.add_request = add_request
    Scheduler.update_from_output = update_from_output
    Scheduler._free_request = _free_request
    Scheduler._vla_hooked = True
