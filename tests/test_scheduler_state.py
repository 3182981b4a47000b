"""The scheduler-side pruning state: plans, pruned KV slots, outcome checks, the final report."""

from __future__ import annotations

from vllm_vla_pruner.engine.plan import PUBLIC_KEY, PruneOutcome, PruningResult
from vllm_vla_pruner.engine.scheduler_state import SchedulerPruning
from vllm_vla_pruner.engine.settings import PruningSettings

FASTV = {"vla_pruner": "fastv", "vla_keep_ratio": 0.25}


def _state(**settings) -> SchedulerPruning:
    return SchedulerPruning(PruningSettings(**settings))


def test_only_requests_with_an_image_and_settings_get_a_plan():
    state = _state()  # server default: no pruning
    assert state.plan("a", {}, None, (1, 64), None) is None  # nothing asked for
    assert state.plan("b", FASTV, None, None, None) is None  # text only
    plan = state.plan("c", FASTV, None, (1, 64), None)
    assert plan.prune and plan.num_keep == 16 and state.pruned_slots("c") == 48
    assert state.pruned_slots("a") == 0 and len(state) == 1
    assert _state(method="fastv").plan("d", {}, None, (1, 64), None).prune  # server default


def test_a_pruned_request_without_a_pruned_outcome_is_failed():
    state = _state()
    state.plan("p", FASTV, None, (1, 64), None)
    state.plan("u", {"vla_pruner": "none"}, None, (1, 64), None)
    # The step ran both but the worker reported nothing (a forward without the hooks).
    assert state.take_outcomes(["p", "u", "other"], None) == ["p"]
    # An outcome saying it did not prune fails it too; one that pruned passes, also later.
    assert state.take_outcomes(["p"], {"p": PruneOutcome(False, 64, 64)}) == ["p"]
    assert state.take_outcomes(["p"], {"p": PruneOutcome(True, 64, 16)}) == []
    assert state.take_outcomes(["p"], None) == []


def test_release_reports_the_worker_outcome_not_the_plan():
    state = _state()
    state.plan("p", FASTV, "robot", (1, 64), None)
    state.take_outcomes(["p"], {"p": PruneOutcome(True, 64, 16, history_missing=False)})
    result = state.release("p")
    assert result == PruningResult("fastv", 0.25, False, 16, PruneOutcome(True, 64, 16))
    assert state.release("p") is None and state.pruned_slots("p") == 0
    # The public form rides in kv_transfer_params beside a KV connector's own entries.
    kv_params = {"do_remote_decode": True, PUBLIC_KEY: result.to_public()}
    assert PruningResult.from_public(kv_params) == result
    assert PruningResult.from_public({"do_remote_decode": True}) is None
    assert PruningResult.from_public(None) is None


def test_a_request_that_never_ran_reports_no_outcome():
    state = _state()
    state.plan("p", FASTV, None, (1, 64), None)
    result = state.release("p")  # aborted before its prefill
    assert result.outcome is None and result.to_public()["outcome"] is None


def test_invalid_settings_that_skipped_the_api_fail_the_request_not_the_engine():
    state = _state()
    bad = {"vla_pruner": "fastv", "vla_keep_ratio": 7.0}  # e.g. a prebuilt EngineCoreRequest
    assert state.plan("bad", bad, None, (1, 64), None) is None
    assert state.pruned_slots("bad") == 0
    assert state.take_outcomes(["bad"], None) == ["bad"]
    assert state.release("bad") is None
