"""The OFT engine bench's pure helpers: FLOPs-ideal speedup, share of ideal, targets."""

from __future__ import annotations

import pytest

from vllm_vla_pruner.metrics import ModelDims
from vllm_vla_pruner.research.bench.engine_bench import (
    flops_ideal_speedup,
    oft_targets,
    per_action_vs_ar,
    share_of_ideal,
)

DIMS = ModelDims(hidden=512, intermediate=1376, num_layers=32, num_heads=8, num_kv_heads=8)


def test_flops_ideal_grows_as_fewer_tokens_are_kept_and_is_one_unpruned():
    assert flops_ideal_speedup(DIMS, 592, 512, 512, 3) == pytest.approx(1.0)
    ideals = [flops_ideal_speedup(DIMS, 592, 512, k, 3) for k in (256, 128, 64)]
    assert 1.0 < ideals[0] < ideals[1] < ideals[2]
    # Pruning every row after layer K can't beat L / K.
    assert ideals[2] < 32 / 3


def test_share_of_ideal():
    assert share_of_ideal(2.0, 3.0) == pytest.approx(0.5)
    assert share_of_ideal(1.0, 1.0) is None


def _row(batch, method, keep, ms, share, select):
    return {
        "batch": batch,
        "method": method,
        "keep_ratio": keep,
        "ms_per_action": ms,
        "share_of_ideal": share,
        "select_share": select,
    }


def test_targets_met_and_missed_from_the_numbers():
    out = {
        "results": [
            _row(1, "none", 1.0, 200.0, None, 0.0),
            _row(1, "vlapruner", 0.25, 80.0, 0.95, 0.02),
            _row(1, "fastv", 0.25, 90.0, 0.80, 0.04),
            _row(1, "vlapruner", 0.5, 120.0, 0.5, 0.5),  # other keep ratios are not targets
        ],
        "ar": {"1": {"ms_per_action": 1000.0}},
    }
    got = {t["target"]: (t["value"], t["met"]) for t in oft_targets(out)}
    assert got["batch 1 vlapruner keep 0.25: speedup >= 90% of FLOPs-ideal"] == (0.95, True)
    assert got["batch 1 fastv keep 0.25: speedup >= 90% of FLOPs-ideal"] == (0.80, False)
    assert got["batch 1 fastv keep 0.25: scoring + selection < 3% of the pruned step"][1] is False
    unpruned = got["batch 1 OFT unpruned: time per action >= 10x below AR OpenVLA unpruned"]
    pruned = got["batch 1 OFT vlapruner 0.25: time per action >= 10x below AR OpenVLA unpruned"]
    assert unpruned == (pytest.approx(5.0), False)
    assert pruned == (pytest.approx(12.5), True)
    assert len(got) == 6
    (row,) = per_action_vs_ar(out)
    assert row["oft_unpruned_ms_per_action"] == 200.0
