"""One-episode smoke test of the OFT Meta-World policy in closed loop through the real vLLM
engine (``vla-pruner bench metaworld-oft`` / ``vla-pruner demo`` in small): both camera views
and the proprio state per chunk request, the chunk's first rows executed, unpruned and
VLA-Pruner at keep 0.25 (which must report pruning once its warm-up is over).

The shipped checkpoint (``vllm_vla_pruner/assets/metaworld-oft``) is used when it is there;
otherwise a random one of the same layout (2 views of 64 px / patch 8, chunk 8 x 4, proprio 4).
``VLA_TEST_OFT_MODEL`` names another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.chunk_fixtures import one_episode_unpruned_and_vlapruner

pytestmark = pytest.mark.engine
pytest.importorskip("metaworld", reason="Meta-World is installed by scripts/setup.sh")

EXECUTE = 4
STEPS = 20  # 5 chunk requests: VLA-Pruner's 3 warm-up requests, then 2 pruned ones


@pytest.fixture(scope="module")
def oft_model(tmp_path_factory) -> Path:
    from vllm_vla_pruner.research.sim.chunk_benchmark import OFT_MODEL

    named = os.environ.get("VLA_TEST_OFT_MODEL")
    if named:
        return Path(named)
    if (OFT_MODEL / "config.json").is_file():
        return OFT_MODEL
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    oft = {
        "num_images_in_input": 2,
        "num_actions_chunk": 8,
        "action_dim": 4,
        "proprio_dim": 4,
        "unnorm_key": "metaworld",
        "ddp_prefix": False,
    }
    return build_checkpoint(
        "tiny-oft",
        tmp_path_factory.mktemp("metaworld_oft_standin"),
        image_size=64,
        patch_size=8,
        use_fused_vision_backbone=False,
        num_hidden_layers=4,
        oft=oft,
    )


def test_one_oft_episode_through_the_engine(oft_model: Path, tmp_path: Path):
    from vllm_vla_pruner.config import load_oft_statistics, oft_spec

    spec = oft_spec(oft_model)
    assert (spec.num_images, spec.chunk, spec.action_dim, spec.proprio_dim) == (2, 8, 4, 4)
    base, pruned = one_episode_unpruned_and_vlapruner(oft_model, tmp_path, EXECUTE, STEPS)
    assert (base["method"], pruned["method"]) == ("none", "vlapruner")
    stats = load_oft_statistics(oft_model)[spec.unnorm_key]["action"]
    lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    for s in (base, pruned):
        assert s["chunk_shapes"] == [[8, 4]]  # every request answered a whole 8 x 4 chunk
        assert 0.0 <= s["success"] <= 1.0 and s["engine_ms_per_control_step"] > 0
        # The episode ran (it ends early only on success), one request per EXECUTE steps.
        steps = s["control_steps"]
        assert 0 < steps <= STEPS and s["requests"] == -(-steps // EXECUTE)
        # Finite (non-finite chunks raise) and un-normalised into the checkpoint's action
        # range: normalised values within [-3, 3] (a trained head stays near [-1, 1]).
        rng = np.asarray(s["action_range"])
        assert np.isfinite(rng).all()
        width = hi - lo
        assert (rng[:, 0] >= lo - width).all() and (rng[:, 1] <= hi + width).all(), rng
    # VLA-Pruner: 3 warm-up requests unpruned, then every request pruned to 32 of 128 tokens.
    assert pruned["visual_tokens_total"] == 128
    if pruned["requests"] > 3:
        assert pruned["pruned_requests"] == pruned["requests"] - 3
        assert pruned["visual_tokens_kept_mean"] == 32
    assert base["pruned_requests"] == 0
    trace = tmp_path / f"pruning_trace-{oft_model.name}.jsonl"
    kept = [json.loads(x) for x in trace.read_text().splitlines()]
    assert kept and all(len(r["kept"]) == 32 and r["had_history"] for r in kept)
    assert max(i for r in kept for i in r["kept"]) < 128
    files = ["metaworld-oft.json", "metaworld-oft.md", "success_and_speed_vs_keep.png"]
    for name in files + [f"kept_patches_{oft_model.name}.png"]:
        assert (tmp_path / name).stat().st_size > 0


def test_layer_sweep_runs_the_oft_policy_in_chunks(oft_model: Path, tmp_path: Path):
    """``bench metaworld-layers`` on the OFT policy: one short validation episode per cell, a
    chunk per request (5 requests for 20 steps executing 4 rows each), and the sweep's cell
    settings reach the engine: its VLA-Pruner requests after the warm-up keep 32 of 128."""
    from tests.engine_fixtures import pruning_trace
    from vllm_vla_pruner.research.sim.layer_sweep import sweep

    trace = tmp_path / "sweep_trace.jsonl"
    with pruning_trace(trace):
        res = sweep(
            oft_model,
            tmp_path,
            {"layer": [3], "action_layer": [1]},
            keep=0.25,
            tasks=["drawer-open-v3"],
            episodes=1,
            max_steps=STEPS,
        )
    (cell,) = res["cells"]
    assert cell["settings"] == {"layer": 3, "action_layer": 1}
    assert 0.0 <= cell["success"] <= 1.0 and cell["engine_ms_per_step"] > 0
    kept = [json.loads(x) for x in trace.read_text().splitlines()]
    assert kept and all(len(r["kept"]) == 32 for r in kept)
    assert (tmp_path / "layers.md").stat().st_size > 0
