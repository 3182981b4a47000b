"""What the OFT and pi0 trainer tests share: a small fake demo set and a stop + resume run."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.engine_fixtures import pruning_trace
from vllm_vla_pruner.research.sim.metaworld_env import DEFAULT_TASKS
from vllm_vla_pruner.research.sim.oft_data import save_dataset

TASKS = list(DEFAULT_TASKS)


def fake_dataset(n: int = 60, seed: int = 0) -> dict:
    """Random two-camera frames with proprio and actions, 10-frame episodes, every task."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
        "wrist": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
        "state": rng.uniform(-0.3, 0.7, (n, 4)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
        "task_ids": rng.integers(0, len(TASKS), n).astype(np.int16),
        "episode_ids": np.repeat(np.arange(n // 10), 10).astype(np.int32),
        "steps": np.tile(np.arange(10), n // 10).astype(np.int16),
        "tasks": TASKS,
    }


def tiny_model_args(**extra: Any) -> argparse.Namespace:
    """The model shape the stop + resume runs use (``--vision-width 64`` ...), for
    ``build_init_checkpoint``; ``extra`` adds a trainer's own options."""
    return argparse.Namespace(
        image_size=64,
        patch_size=8,
        vision_width=64,
        vision_depth=2,
        hidden=128,
        layers=2,
        init_gain=0.6,
        chunk=8,
        seed=0,
        **extra,
    )


def stop_and_resume(
    main: Callable[[list[str]], None], tmp_path: Path, extra: list[str]
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A tiny run stopped at step 2 and resumed to 4 (no closed loop); checks the resumed
    state and returns (checkpoint dir, state.pt at 2, state.pt at 4)."""
    demos = tmp_path / "demos.npz"
    save_dataset(fake_dataset(), demos)
    out = tmp_path / "ckpt"
    common = [
        "--out", str(out), "--demos", str(demos), "--batch", "4", "--val-episodes", "0",
        "--vision-width", "64", "--vision-depth", "2", "--hidden", "128", "--layers", "2",
        "--save-every", "2", "--warmup", "1", *extra,
    ]  # fmt: skip
    main([*common, "--steps", "2"])
    first = torch.load(out / "_work" / "state.pt", weights_only=False)
    assert first["step"] == 2
    main([*common, "--steps", "4", "--resume"])
    state = torch.load(out / "_work" / "state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["history"]["loss"]) == 4
    assert len(state["commands"]) == 2 and "--resume" in state["commands"][1]
    return out, first, state


def one_episode_unpruned_and_vlapruner(
    model: Path, out: Path, execute: int, steps: int
) -> tuple[dict, dict]:
    """One drawer-open episode of a chunk policy through the engine, unpruned and VLA-Pruner
    at keep 0.25 (``bench metaworld-oft`` in small): its two summary rows. The kept-index
    trace env var the benchmark sets is put back as it was."""
    from vllm_vla_pruner.research.sim.chunk_benchmark import evaluate_policies

    with pruning_trace():
        res = evaluate_policies(
            [model],
            out,
            ["vlapruner"],
            [0.25],
            ["drawer-open-v3"],
            1,
            execute_steps=execute,
            max_steps=steps,
            progress=False,
            print_table=False,
        )
    base, pruned = res["summary"]
    return base, pruned
