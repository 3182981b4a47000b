"""The scheduler-side plan: warm-up per robot episode and the ``random`` pruner's seed."""

from __future__ import annotations

from vllm_vla_pruner.engine.plan import PruningPlan
from vllm_vla_pruner.engine.planner import FrameCounter, make_plan, random_seed
from vllm_vla_pruner.engine.settings import PruningSettings

SETTINGS = PruningSettings()


def _plans(
    method: str, session: str | None, n: int, frames: FrameCounter, **kw
) -> list[PruningPlan]:
    args = {"vla_pruner": method, "vla_keep_ratio": 0.25}
    return [make_plan(args, session, 1, 64, SETTINGS, frames, **kw) for _ in range(n)]


def test_random_draws_a_new_subset_every_frame_and_replays_exactly() -> None:
    frames = FrameCounter(16, 900.0)
    seeds = [p.seed for p in _plans("random", "robot-1", 5, frames)]
    assert len(set(seeds)) == 5  # a fixed mask would be a different baseline
    other = [p.seed for p in _plans("random", "robot-2", 5, frames)]
    assert not set(seeds) & set(other)
    # A new episode of the same robot (or a rerun of the benchmark) replays the same draws.
    first = make_plan(
        {"vla_pruner": "random", "vla_new_episode": True}, "robot-1", 1, 64, SETTINGS, frames
    )
    assert first.seed == seeds[0] == random_seed("robot-1", 0)


def test_random_seed_from_the_client_or_zero_without_a_session() -> None:
    frames = FrameCounter(16, 900.0)
    assert {p.seed for p in _plans("random", "robot-3", 3, frames, request_seed=7)} == {7}
    assert {p.seed for p in _plans("random", None, 3, frames)} == {0}


def test_warmup_only_for_methods_with_action_history() -> None:
    frames = FrameCounter(16, 900.0)
    vla = _plans("vlapruner", "robot-4", SETTINGS.window + 1, frames)
    assert [p.warmup for p in vla] == [True] * SETTINGS.window + [False]
    assert [p.num_keep for p in vla] == [64] * SETTINGS.window + [16]
    fastv = _plans("fastv", "robot-5", 2, frames)
    assert [(p.warmup, p.num_keep) for p in fastv] == [(False, 16), (False, 16)]


def test_plan_crosses_the_process_boundary_in_wire_form() -> None:
    plan = _plans("vlapruner", "robot-6", SETTINGS.window + 1, FrameCounter(16, 900.0))[-1]
    wire = plan.to_wire()
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in wire)
    assert PruningPlan.from_wire(wire) == plan and PruningPlan.from_wire(list(wire)) == plan
    assert plan.prune and plan.expects_history and plan.pruned_slots == 64 - 16
