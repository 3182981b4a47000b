"""The benchmark's run store: a finished configuration survives a stopped run, only under the
same settings, and pairs with the unpruned row as if it had run now."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_vla_pruner.research.sim.benchmark import compare_with_unpruned
from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkRunRecord
from vllm_vla_pruner.research.sim.evaluate import _result
from vllm_vla_pruner.research.sim.run_store import RunSettings, RunStore


def _settings(**over) -> RunSettings:
    kw = dict(
        model="/m",
        goals="heldout",
        tasks=["drawer-open-v3", "window-open-v3"],
        episodes_per_task=3,
        execute_steps=4,
        max_steps=None,
        pruning={"layer": 2, "action_layer": 2, "semantic_rows": "last", "window": 3},
    )
    return RunSettings.of(**{**kw, **over})


def _record(method: str, keep: float, wins: list[bool]) -> ChunkRunRecord:
    outcomes = {
        "drawer-open-v3": [(w, 50 + i) for i, w in enumerate(wins[:3])],
        "window-open-v3": [(w, 80 + i) for i, w in enumerate(wins[3:])],
    }
    rec = ChunkRunRecord(method, keep, _result(outcomes, 1.5, 2.0, 300, 9.0))
    rec.engine_seconds, rec.engine_calls, rec.requests = 1.25, 40, 75
    rec.pruned_requests, rec.visual_kept, rec.visual_total = 60, 1920, 7680
    rec.chunk_shapes = {(8, 4)}
    rec.action_min, rec.action_max = np.array([-1, -0.5, -1, -1.0]), np.array([1, 0.5, 1, 1.0])
    return rec


def test_round_trip_keeps_what_the_table_and_paired_ci_need(tmp_path):
    store = RunStore(tmp_path, _settings(), resume=False)
    base = _record("none", 1.0, [True, True, False, True, False, True])
    rec = _record("fastv", 0.25, [True, False, False, True, True, True])
    store.save(base)
    store.save(rec)
    again = RunStore(tmp_path, _settings(), resume=True)
    b2 = again.load("none", 1.0, ChunkRunRecord)
    r2 = again.load("fastv", 0.25, ChunkRunRecord)
    assert again.load("fastv", 0.5, ChunkRunRecord) is None
    assert r2.result == rec.result  # per-episode outcomes, CIs, timings
    assert (r2.engine_calls, r2.requests, r2.visual_kept, r2.chunk_shapes) == (
        40,
        75,
        1920,
        {(8, 4)},
    )
    np.testing.assert_allclose(r2.action_max, rec.action_max)
    assert compare_with_unpruned(b2.result, r2.result) == compare_with_unpruned(
        base.result, rec.result
    )


def test_other_settings_are_refused_naming_the_setting(tmp_path):
    RunStore(tmp_path, _settings(), resume=False).save(_record("none", 1.0, [True] * 6))
    store = RunStore(tmp_path, _settings(episodes_per_task=20), resume=True)
    with pytest.raises(ValueError, match="episodes_per_task=3"):
        store.load("none", 1.0, ChunkRunRecord)
    store = RunStore(tmp_path, _settings(pruning={"layer": 3}), resume=True)
    with pytest.raises(ValueError, match="pruning"):
        store.load("none", 1.0, ChunkRunRecord)


def test_a_fresh_run_clears_the_old_one(tmp_path):
    RunStore(tmp_path, _settings(), resume=False).save(_record("none", 1.0, [True] * 6))
    assert RunStore(tmp_path, _settings(), resume=False).load("none", 1.0, ChunkRunRecord) is None
