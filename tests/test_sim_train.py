"""The Meta-World trainer: DAgger seed plan (pure) and a fine-tuning stage end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("metaworld", reason="metaworld==3.1.1 is not installed (pip install .[sim])")

from vllm_vla_pruner.research.reference import ReferenceOpenVLA  # noqa: E402
from vllm_vla_pruner.research.sim.chunk_training import ChunkRun  # noqa: E402
from vllm_vla_pruner.research.sim.data import collect_expert, save_dataset  # noqa: E402
from vllm_vla_pruner.research.sim.metaworld_env import VAL_SEED_OFFSET, val_seeds  # noqa: E402
from vllm_vla_pruner.research.sim.train import DAGGER_SEED_OFFSET, dagger_seeds, main  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "vllm_vla_pruner" / "assets" / "metaworld-vla"


def test_dagger_seeds_differ_per_stage_and_round_and_stay_below_validation() -> None:
    plans = [dagger_seeds(stage, r, 100) for stage in range(4) for r in range(10)]
    flat = [s for p in plans for s in p]
    assert len(flat) == len(set(flat)) == 4000
    assert min(flat) == DAGGER_SEED_OFFSET
    assert max(flat) < VAL_SEED_OFFSET <= min(val_seeds(1))
    # The first stage keeps the seeds earlier single-stage runs used.
    assert dagger_seeds(0, 1, 3) == [DAGGER_SEED_OFFSET + 100 + i for i in range(3)]
    with pytest.raises(ValueError, match="validation seeds"):
        dagger_seeds(40, 0, 8)
    with pytest.raises(ValueError, match="at most 10 rounds"):
        dagger_seeds(0, 10, 8)


def test_chunk_run_numbers_rounds_within_their_stage() -> None:
    """A run resumed with a new ``--dagger-stage`` starts that stage's goals at round 0
    (before, its 11th round overall raised, whatever the stage); unstaged (older) rounds
    count as the current stage, as every earlier run used one."""
    from types import SimpleNamespace

    def run(stage: int, rounds: list[dict]) -> int:
        r = SimpleNamespace(args=SimpleNamespace(dagger_stage=stage), history={"dagger": rounds})
        return ChunkRun.stage_round(r)

    old = [{"step": s} for s in range(10)]  # ten rounds recorded before stages were stored
    assert run(2, old) == 10  # the same stage: its ten rounds are used up (dagger_seeds raises)
    assert run(3, [{"step": s, "stage": 2} for s in range(10)]) == 0
    mixed = [{"step": 0, "stage": 2}, {"step": 1, "stage": 3}, {"step": 2, "stage": 3}]
    assert (run(2, mixed), run(3, mixed), run(4, mixed)) == (1, 2, 0)
    seeds = [dagger_seeds(3, run(3, mixed[:k]), 4) for k in (1, 2, 3)]
    assert len({s for p in seeds for s in p}) == 12  # each round of a stage: new goals


def test_fine_tuning_stage_rolls_out_only_the_named_tasks(tmp_path: Path) -> None:
    """A stage continued from the embedded model: validated before training (the baseline it
    must beat), DAgger only on ``--dagger-tasks``, chained provenance, a loadable checkpoint."""
    tasks = ["drawer-close-v3", "button-press-topdown-v3"]
    demos = tmp_path / "demos.npz"
    data = collect_expert(tasks, 1, max_steps=8, progress=False)
    save_dataset(data, demos)
    out = tmp_path / "ckpt"
    args = ["--out", str(out), "--demos", str(demos), "--init", str(ASSET)]
    args += ["--tasks", ",".join(tasks), "--minutes", "0.05", "--first-round", "0"]
    args += ["--dagger-rounds", "1", "--dagger-betas", "0.0", "--dagger-seeds", "2"]
    args += ["--rollout-steps", "6", "--val-episodes", "1", "--batch", "8", "--warmup", "5"]

    with pytest.raises(ValueError, match="--dagger-tasks .*reach-v3"):
        main([*args, "--dagger-tasks", "reach-v3"])

    main([*args, "--dagger-tasks", "button-press-topdown-v3"])
    meta = json.loads((out / "training.json").read_text())
    assert meta["history"]["evals"][0]["tag"] == "init"
    assert meta["history"]["evals"][-1]["tag"] == "final"
    (round_,) = meta["history"]["dagger"]
    assert list(round_["rollout_success"]) == ["button-press-topdown-v3"]
    assert round_["frames_added"] == 2 * 6  # 2 seeds x the 6-step cap (no early success)
    assert meta["frames"] == len(data["actions"]) + round_["frames_added"]
    previous = json.loads((ASSET / "training.json").read_text())
    assert len(meta["stages"]) == len(previous["stages"]) + 1
    assert meta["stages"][-1]["command"] == previous["command"]
    assert meta["optimizer_steps"] >= 30
    model = ReferenceOpenVLA.from_pretrained(out)
    action = model.predict_action(data["images"][0], "press the button down")
    assert len(action) == 4 and all(-1.0 <= a <= 1.0 for a in action)
