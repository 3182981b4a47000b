"""``vla-pruner bench engine`` on a pi0 checkpoint (tiny-pi0, one short run)."""

from __future__ import annotations

import json

import pytest

from vllm_vla_pruner.research.checkpoint import build_checkpoint

pytestmark = pytest.mark.engine


def test_pi0_bench_reports_chunk_split_ideal_and_kv(tmp_path):
    from vllm_vla_pruner.research.bench.engine_bench_pi0 import run_pi0

    model = build_checkpoint("tiny-pi0", tmp_path / "ckpt", seed=0)
    out = run_pi0(model, tmp_path / "out", (1,), (0.25,), ("fastv",), 1, progress=False)
    saved = json.loads((tmp_path / "out" / "engine-pi0.json").read_text())
    assert saved["results"] == json.loads(json.dumps(out["results"]))
    md = (tmp_path / "out" / "engine-pi0.md").read_text()
    assert md.startswith("pi0 engine benchmark")
    # The per-part table: one row (measured / ideal per part) for the pruner at keep 0.25.
    part_rows = [ln for ln in md.splitlines() if ln.startswith("| 1 | fastv |") and " / " in ln]
    assert len(part_rows) == 1
    none, fastv = out["results"]
    assert (none["method"], fastv["method"]) == ("none", "fastv")
    assert none["visual_tokens_kept"] == 192 and fastv["visual_tokens_kept"] == 48
    assert fastv["flops_ideal_speedup"] > 1.2 and none["flops_ideal_speedup"] == 1.0
    for r in out["results"]:
        assert r["prefix_ms"] > 0 and r["denoise_ms"] > 0 and r["chunk_ms"] > 0
        assert r["gflops"]["total"] > r["gflops"]["prefix"] > 0
    assert fastv["gflops"]["denoise"] < none["gflops"]["denoise"]  # the smaller prefix
    blocks = {tuple(r["blocks_per_group"]) for r in out["kv"]["per_request"]}
    assert len(blocks) == 2  # unpruned and pruned requests hold different KV
    assert [
        (t["met"] in (True, False), t["met_as_ratio"] in (True, False)) for t in out["targets"]
    ] == [(True, True)]
