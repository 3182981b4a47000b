"""Engine-core side: fix each request's pruning plan when it enters the scheduler.

Why: the KV blocks of layers >= K must be sized before the worker decides which tokens to
keep, and warm-up (the first ``window`` frames of a robot episode run unpruned) must be
decided once, in one process. ``Scheduler.add_request`` sees every request before any
allocation; the plan is written into ``sampling_params.extra_args`` so the worker reads the
same decision. ``Scheduler._connector_finished`` returns it with the final output (as
``kv_transfer_params``, which vLLM forwards to the client and which is otherwise unused when
no KV connector is configured), so the API can say how many tokens were kept.
vLLM: 0.32.x. Upstream: none (per-request model state has no scheduler API).
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from vllm_vla_pruner.engine.kv_spec import forget_request, set_pruned_slots
from vllm_vla_pruner.engine.planner import FrameCounter, make_plan
from vllm_vla_pruner.engine.settings import KEY_PLAN, REQUEST_KEYS, PruningSettings

logger = init_logger(__name__)


def _is_vla(vllm_config: Any) -> bool:
    hf = getattr(vllm_config.model_config, "hf_config", None)
    return getattr(hf, "model_type", None) == "openvla"


def plan_request(scheduler: Any, request: Any) -> None:
    if not _is_vla(scheduler.vllm_config) or request.sampling_params is None:
        return
    state = getattr(scheduler, "_vla_state", None)
    if state is None:
        settings = PruningSettings.from_vllm_config(scheduler.vllm_config)
        state = (settings, FrameCounter(settings.max_sessions, settings.idle_timeout_s))
        scheduler._vla_state = state
    settings, frames = state
    extra = request.sampling_params.extra_args or {}
    asked = any(k in extra for k in REQUEST_KEYS)
    if not asked and settings.method == "none":
        return
    features = getattr(request, "mm_features", None) or []
    if not features:
        return  # text-only request: nothing visual to prune
    place = features[0].mm_position
    try:
        plan = make_plan(
            extra,
            request.session_id,
            place.offset,
            place.length,
            settings,
            frames,
            request_seed=request.sampling_params.seed,
        )
    except ValueError as e:  # validated in the API process; never take the engine down
        logger.warning("request %s: ignoring invalid pruning settings: %s", request.request_id, e)
        return
    request.sampling_params.extra_args = {**extra, KEY_PLAN: plan}
    if plan["prune"]:
        set_pruned_slots(request.request_id, plan["num_visual"] - plan["num_keep"])


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_vla_hooked", False):
        return
    original_add = Scheduler.add_request
    original_finished = Scheduler._connector_finished

    def add_request(self, request):
        plan_request(self, request)
        return original_add(self, request)

    def _connector_finished(self, request):
        delay, params = original_finished(self, request)
        forget_request(request.request_id)
        extra = (request.sampling_params.extra_args or {}) if request.sampling_params else {}
        plan = extra.get(KEY_PLAN)
        if plan is not None and params is None:
            public = {k: v for k, v in plan.items() if k != "seed"}
            params = {"vla_pruner": public}
        return delay, params

    Scheduler.add_request = add_request
    Scheduler._connector_finished = _connector_finished
    Scheduler._vla_hooked = True
