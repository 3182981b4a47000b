"""One-episode smoke test of the pi0-style Meta-World policy in closed loop through the real
vLLM engine (``vla-pruner bench metaworld-oft --models .../metaworld-pi0``, in small): both
camera views, the proprio state and a noise seed per chunk request, the chunk's first rows
executed, unpruned and VLA-Pruner at keep 0.25 (pruning once its warm-up is over).

The shipped checkpoint (``vllm_vla_pruner/assets/metaworld-pi0``); ``VLA_TEST_PI0_MODEL``
names another.
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
PI0_MODEL = Path(__file__).resolve().parents[1] / "vllm_vla_pruner" / "assets" / "metaworld-pi0"


@pytest.fixture(scope="module")
def pi0_model() -> Path:
    return Path(os.environ.get("VLA_TEST_PI0_MODEL") or PI0_MODEL)


def test_one_pi0_episode_through_the_engine(pi0_model: Path, tmp_path: Path):
    from vllm_vla_pruner.pi0_spec import load_norm_stats, pi0_spec

    spec = pi0_spec(pi0_model)
    assert (spec.num_cameras, spec.horizon, spec.robot_action_dim, spec.state_dim) == (2, 8, 4, 4)
    base, pruned = one_episode_unpruned_and_vlapruner(pi0_model, tmp_path, EXECUTE, STEPS)
    assert (base["kind"], base["method"], pruned["method"]) == ("pi0", "none", "vlapruner")
    stats = load_norm_stats(pi0_model, spec)["actions"]
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    for s in (base, pruned):
        assert s["chunk_shapes"] == [[8, 4]]  # every request answered a whole 8 x 4 chunk
        steps = s["control_steps"]
        assert 0 < steps <= STEPS and s["requests"] == -(-steps // EXECUTE)
        # Un-normalised with the checkpoint's z-score: within 6 std of the action mean.
        rng = np.asarray(s["action_range"])
        assert (rng[:, 0] >= mean - 6 * std).all() and (rng[:, 1] <= mean + 6 * std).all(), rng
    # VLA-Pruner: 3 warm-up requests unpruned, then every request pruned to 32 of 128 tokens.
    assert pruned["visual_tokens_total"] == 128
    if pruned["requests"] > 3:
        assert pruned["pruned_requests"] == pruned["requests"] - 3
        assert pruned["visual_tokens_kept_mean"] == 32
    assert base["pruned_requests"] == 0
    trace = tmp_path / f"pruning_trace-{pi0_model.name}.jsonl"
    kept = [json.loads(x) for x in trace.read_text().splitlines()]
    assert kept and all(len(r["kept"]) == 32 for r in kept)
    assert max(i for r in kept for i in r["kept"]) < 128
