"""The settings sweep's report (pure: from a result dict to table, best cell and plot)."""

from __future__ import annotations

import json

import pytest

from vllm_vla_pruner.research.sim.layer_sweep import markdown, parse_grid, render


def _cell(settings: dict, success: float, lost: int) -> dict:
    return {
        "settings": settings,
        "success": success,
        "relative_success": success / 0.8,
        "relative_ci95": [success / 0.8 - 0.1, min(1.1, success / 0.8 + 0.1)],
        "lost": lost,
        "gained": 0,
        "per_task": {"drawer-open-v3": success},
        "engine_ms_per_step": 9.5,
    }


def _result(grid: dict, cells: list[dict]) -> dict:
    return {
        "method": "vlapruner",
        "keep_ratio": 0.25,
        "goals": "validation",
        "tasks": ["drawer-open-v3"],
        "episodes_per_task": 10,
        "num_layers": 4,
        "grid": grid,
        "unpruned_success": 0.8,
        "cells": cells,
    }


@pytest.mark.parametrize("two_d", [True, False])
def test_render_picks_the_best_cell_and_writes_table_and_plot(tmp_path, two_d: bool) -> None:
    if two_d:  # heatmap
        grid = {"layer": [1, 2], "action_layer": [0, 2]}
        cells = [
            _cell({"layer": k, "action_layer": a}, s, lost)
            for (k, a), s, lost in zip(
                [(1, 0), (1, 2), (2, 0), (2, 2)], [0.6, 0.7, 0.75, 0.75], [9, 7, 5, 3]
            )
        ]
        best = {"layer": 2, "action_layer": 2}  # tie on success: fewer episodes lost wins
    else:  # bars
        grid = {"layer": [2], "semantic_rows": ["all", "text", "last"]}
        cells = [
            _cell({"layer": 2, "semantic_rows": r}, s, 1)
            for r, s in zip(grid["semantic_rows"], [0.7, 0.78, 0.6])
        ]
        best = {"layer": 2, "semantic_rows": "text"}
    result = _result(grid, cells)
    render(result, tmp_path)
    assert result["best"] == best
    assert json.loads((tmp_path / "layers.json").read_text())["best"] == best
    table = (tmp_path / "layers.md").read_text()
    assert table == markdown(result) and table.count("\n| ") == 1 + len(cells)
    assert (tmp_path / "layers.png").stat().st_size > 1000


def test_parse_grid_names_the_bad_item() -> None:
    assert parse_grid(["gamma=0.8,1"]) == {"gamma": [0.8, 1]}
    for bad in ("layer", "layer=", "nope=1"):
        with pytest.raises(ValueError, match=f"--grid '{bad}'"):
            parse_grid([bad])


def test_sweep_runs_chunk_policies_as_chunk_policies(tiny_ckpt, tmp_path) -> None:
    """OFT and pi0 checkpoints go through the chunk roll-out (a chunk per request), the AR
    OpenVLA one through the per-step one: the one dispatch the sweep and bench metaworld-oft
    share."""
    from vllm_vla_pruner.research.checkpoint import build_checkpoint
    from vllm_vla_pruner.research.sim.chunk_benchmark import is_chunk_policy

    assert not is_chunk_policy(tiny_ckpt)
    assert is_chunk_policy(build_checkpoint("tiny-oft", tmp_path / "oft", seed=0))
    assert is_chunk_policy(build_checkpoint("tiny-pi0", tmp_path / "pi0", seed=0))
