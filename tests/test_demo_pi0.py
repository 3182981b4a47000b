"""``vla-pruner demo --policy pi0`` in small: the embedded pi0-style policy in closed loop
through the real engine (unpruned and VLA-Pruner), then one chunk at pi0's token layout
(``bench-pi0``, built into the temp dir as a user's run builds it), and the summary that
reports both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vllm_vla_pruner.research.sim.demo import POLICIES, demo

pytestmark = pytest.mark.engine
pytest.importorskip("metaworld", reason="Meta-World is installed by scripts/setup.sh")


def test_pi0_demo_runs_the_pi0_policy_and_benches_pi0s_layout(tmp_path: Path, capsys):
    model, preset = POLICIES["pi0"]
    assert preset == "bench-pi0" and json.loads((model / "config.json").read_text())["pi0"]
    out = tmp_path / "demo"
    argv = ["--policy", "pi0", "--episodes", "1", "--tasks", "drawer-open-v3"]
    assert demo([*argv, "--max-steps", "8", "--bench-repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "metaworld-pi0, pi0 policy" in text
    assert "pi0's token layout (bench-pi0: 3 x 256 visual tokens, 18 layers, horizon 50" in text
    speed = re.search(r"VLA-Pruner @ keep 0.25 \d+ ms: ([\d.]+)x speedup", text)
    assert speed
    closed_loop = json.loads((out / "metaworld-oft.json").read_text())
    assert [p["kind"] for p in closed_loop["policies"]] == ["pi0"]
    bench = json.loads((out / "bench-pi0" / "engine-pi0.json").read_text())
    assert [r["method"] for r in bench["results"]] == ["none", "vlapruner"]
    assert bench["results"][1]["visual_tokens_kept"] == 192
    # The summary prints the bench's own measurement (no timing asserted here: speed lives in
    # the benchmarks): its speedup is the two chunk times' ratio from the bench's JSON.
    base, pruned = bench["results"]
    assert float(speed.group(1)) == pytest.approx(base["chunk_ms"] / pruned["chunk_ms"], abs=0.01)
