"""The benchmark's run store: a finished configuration survives a stopped run, only under the
same settings, and pairs with the unpruned row as if it had run now."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_vla_pruner.research.sim.benchmark import compare_with_unpruned
from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkRunRecord
from vllm_vla_pruner.research.sim.evaluate import _result
from vllm_vla_pruner.research.sim.run_store import RunSettings, RunStore, model_identity


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


def test_report_only_tables_what_the_store_holds_without_an_engine(tmp_path):
    """A stopped registry run still gives its table: ``--report-only`` reads the store, pairs
    every finished row with the unpruned one, stars rows another process ran, lists the
    configurations not run yet, and never starts an engine."""
    from vllm_vla_pruner.config import load_config_json
    from vllm_vla_pruner.research.sim.chunk_benchmark import (
        OFT_MODEL,
        evaluate_policies,
        resolved_pruning,
    )

    tasks = ["drawer-open-v3", "window-open-v3"]
    out = tmp_path / "bench"
    settings = RunSettings.of(
        model=model_identity(OFT_MODEL),
        goals="heldout",
        tasks=tasks,
        episodes_per_task=3,
        execute_steps=4,
        max_steps=None,
        pruning=resolved_pruning(load_config_json(OFT_MODEL)),
    )
    store = RunStore(out / "runs" / OFT_MODEL.name, settings, resume=False)
    base = _record("none", 1.0, [True, True, False, True, False, True])
    same = _record("fastv", 0.25, [True, False, False, True, True, True])
    other = _record("random", 0.25, [True] * 6)
    base.invocation = same.invocation = "run-a"
    other.invocation = "run-b"
    for rec in (base, same, other):
        store.save(rec)

    with pytest.raises(ValueError, match="AR checkpoint"):
        evaluate_policies(
            [OFT_MODEL.parent / "metaworld-vla"],
            out,
            ["fastv"],
            [0.25],
            tasks,
            3,
            report_only=True,
            print_table=False,
            progress=False,
        )
    res = evaluate_policies(
        [OFT_MODEL],
        out,
        ["fastv", "random", "divprune"],
        [0.25],
        tasks,
        3,
        report_only=True,
        print_table=False,
        progress=False,
    )
    rows = {r["method"]: r for r in res["summary"]}
    assert set(rows) == {"none", "fastv", "random"}
    assert rows["fastv"]["relative_success"] == pytest.approx((4 / 6) / (4 / 6))
    assert rows["fastv"]["paired"] == {"only_unpruned_succeeded": 1, "only_this_succeeded": 1}
    assert rows["fastv"]["same_run_as_unpruned"] and not rows["random"]["same_run_as_unpruned"]
    assert res["policies"][0]["missing"] == ["divprune@0.25"]
    table = (out / "metaworld-oft.md").read_text()
    assert "Not run yet for metaworld-oft: divprune@0.25" in table
    random_line = next(line for line in table.splitlines() if "| random |" in line)
    assert random_line.rstrip().endswith("x * |")


def test_model_identity_follows_the_weights_not_the_path(tmp_path) -> None:
    """A copy elsewhere is the same model; other weights under the same name are not."""
    import shutil

    from vllm_vla_pruner.research.sim.chunk_benchmark import OFT_MODEL

    copy = tmp_path / "elsewhere" / OFT_MODEL.name
    shutil.copytree(OFT_MODEL, copy)
    assert model_identity(copy) == model_identity(OFT_MODEL)
    head = next(copy.glob("action_head--*.pt"))
    head.write_bytes(head.read_bytes() + b"\0")
    assert model_identity(copy) != model_identity(OFT_MODEL)
