"""Smoke version of the closed-loop evaluation: the embedded Meta-World policy, driven through
the real vLLM engine with pruning, one short held-out episode (the full one is
``vla-pruner bench metaworld``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.engine_fixtures import pruning_trace

pytestmark = pytest.mark.engine
pytest.importorskip("metaworld", reason="Meta-World is installed by scripts/setup.sh")


def test_one_episode_through_the_engine(tmp_path):
    from vllm_vla_pruner.research.sim.benchmark import DEFAULT_MODEL, evaluate_pruners

    model = Path(os.environ.get("VLA_TEST_METAWORLD_MODEL", DEFAULT_MODEL))
    assert (model / "config.json").exists(), f"the embedded model is missing at {model}"
    with pruning_trace():  # the benchmark sets its own; put back after
        res = evaluate_pruners(
            model,
            tmp_path,
            ["vlapruner"],
            [0.25],
            ["button-press-topdown-v3"],
            1,
            with_fidelity=True,
            max_steps=12,
        )
    base, pruned = res["summary"]
    assert (base["method"], pruned["method"]) == ("none", "vlapruner")
    for s in (base, pruned):
        assert 0.0 <= s["success"] <= 1.0 and s["engine_ms_per_step"] > 0
    assert 0.0 <= pruned["token_agreement"] <= 1.0
    recommended = json.loads((model / "config.json").read_text()).get("vla_pruner", {})
    assert res["semantic_rows"] == recommended.get("semantic_rows", "all")  # what it ran, recorded
    # 12 frames of one episode: 3 warm-up frames, then every frame pruned to M/4.
    trace = [json.loads(x) for x in (tmp_path / "pruning_trace.jsonl").read_text().splitlines()]
    closed_loop = [r for r in trace if r["session"] == "run1/0"]
    assert len(closed_loop) == 12 - 3
    assert all(len(r["kept"]) == 16 and r["had_history"] for r in closed_loop)
    for name in ("metaworld.json", "metaworld.md", "success_vs_keep.png", "kept_patches.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_layer_sweep_smoke(tmp_path):
    """``bench metaworld-layers`` on one short validation episode and a one-cell grid."""
    from vllm_vla_pruner.research.sim.benchmark import DEFAULT_MODEL
    from vllm_vla_pruner.research.sim.layer_sweep import parse_grid, sweep

    model = Path(os.environ.get("VLA_TEST_METAWORLD_MODEL", DEFAULT_MODEL))
    grid = parse_grid(["layer=1", "action_layer=0"])
    assert grid == {"layer": [1], "action_layer": [0]}
    with pytest.raises(ValueError, match="layers=1"):
        parse_grid(["layers=1"])
    with pytest.raises(ValueError, match="vla_pruner.layer must be in"):
        sweep(model, tmp_path, {"layer": [9]})  # refused before any roll-out
    res = sweep(model, tmp_path, grid, tasks=["drawer-open-v3"], episodes=1, max_steps=8)
    (cell,) = res["cells"]
    assert cell["settings"] == {"layer": 1, "action_layer": 0} and res["goals"] == "validation"
    assert res["best"] == {"layer": 1, "action_layer": 0}
    assert 0.0 <= cell["success"] <= 1.0 and cell["engine_ms_per_step"] > 0
    assert json.loads((tmp_path / "layers.json").read_text())["cells"] == res["cells"]
    assert "| 1 | 0 |" in (tmp_path / "layers.md").read_text()
    assert (tmp_path / "layers.png").stat().st_size > 0
