"""Demonstrations for the OFT-style Meta-World policy: two camera views, proprio, chunk labels.

A dataset is a dict of numpy arrays, one row per frame: ``images`` and ``wrist`` (uint8,
N x S x S x 3: the fixed and the wrist camera), ``state`` (float32, N x 4: hand xyz + gripper
opening), ``actions`` (float32, N x 4: the expert's action at that frame, even when another
action was executed), ``task_ids``, ``episode_ids``, ``steps``; plus ``tasks``. The chunk label
of row i is the expert's actions at rows i .. i + chunk - 1 of the same episode (the last row
repeated past the episode's end): :func:`chunk_index` builds it at training time, so one
dataset serves any chunk length.

Expert episodes can execute ``expert + N(0, noise)`` (labels stay clean) to widen the visited
states; DAgger roll-outs (:func:`dagger_rollouts`) add the states the policy itself visits,
labelled by the expert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .data import collect_expert, load_dataset, save_dataset
from .metaworld_env import (
    ACTION_DIM,
    EVAL_SEED_OFFSET,
    PROPRIO_DIM,
    MetaWorldTask,
    lockstep_envs,
)

__all__ = [
    "ChunkPolicy",
    "chunk_index",
    "collect_expert_views",
    "dagger_rollouts",
    "load_dataset",
    "proprio_norm_stats",
    "save_dataset",
]

Dataset = dict[str, Any]
#: policy(images[B,S,S,3], wrist[B,S,S,3], state[B,4], task_ids[B]) -> chunks[B, chunk, 4]
ChunkPolicy = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_ROW_KEYS = ("images", "wrist", "state", "actions", "task_ids", "episode_ids", "steps")


def _stack(rows: dict[str, list], tasks: Sequence[str], image_size: int) -> Dataset:
    if not rows["images"]:
        img = np.zeros((0, image_size, image_size, 3), np.uint8)
        return {
            "images": img,
            "wrist": img.copy(),
            "state": np.zeros((0, PROPRIO_DIM), np.float32),
            "actions": np.zeros((0, ACTION_DIM), np.float32),
            "task_ids": np.zeros((0,), np.int16),
            "episode_ids": np.zeros((0,), np.int32),
            "steps": np.zeros((0,), np.int16),
            "tasks": list(tasks),
        }
    return {
        "images": np.stack(rows["images"]).astype(np.uint8),
        "wrist": np.stack(rows["wrist"]).astype(np.uint8),
        "state": np.stack(rows["state"]).astype(np.float32),
        "actions": np.stack(rows["actions"]).astype(np.float32),
        "task_ids": np.asarray(rows["task_ids"], np.int16),
        "episode_ids": np.asarray(rows["episode_ids"], np.int32),
        "steps": np.asarray(rows["steps"], np.int16),
        "tasks": list(tasks),
    }


def views_and_proprio(env: MetaWorldTask) -> dict[str, np.ndarray]:
    """What the OFT-style policy's frames record: both camera views and the robot state."""
    fixed, wrist = env.render_views()
    return {"images": fixed, "wrist": wrist, "state": env.proprio()}


def collect_expert_views(
    tasks: Sequence[str],
    episodes_per_task: int,
    image_size: int = 64,
    seed: int = 0,
    noise_std: float = 0.3,
    noisy_fraction: float = 0.5,
    max_steps: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Expert episodes on training goals (seeds ``seed ..``), both views and proprio per frame:
    :func:`~.data.collect_expert` recording :func:`views_and_proprio`."""
    return collect_expert(
        tasks,
        episodes_per_task,
        image_size,
        seed=seed,
        noise_std=noise_std,
        noisy_fraction=noisy_fraction,
        max_steps=max_steps,
        progress=progress,
        record=views_and_proprio,
        stack=_stack,
        rng_offset=54321,
        desc="expert demos (2 views)",
    )


def dagger_rollouts(
    policy: ChunkPolicy,
    tasks: Sequence[str],
    seeds: Sequence[int] | Mapping[str, Sequence[int]],
    beta: float,
    execute: int,
    image_size: int = 64,
    rng_seed: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[Dataset, dict[str, float]]:
    """Roll out the chunk policy (first ``execute`` actions of each chunk, re-planning after),
    on every (task, seed) pair in lockstep (``seeds`` for every task, or per task by name);
    with probability ``beta`` per step the expert's action is executed instead. Every visited
    frame is labelled with the expert's action, so :func:`chunk_index` gives chunk labels
    along the visited path. Returns the new frames and the per-task success of these
    roll-outs."""
    per_task_seeds = seeds if isinstance(seeds, Mapping) else dict.fromkeys(tasks, seeds)
    if any(s >= EVAL_SEED_OFFSET for v in per_task_seeds.values() for s in v):
        raise ValueError("DAgger must not visit held-out evaluation goals")
    rng = np.random.default_rng(rng_seed)
    pairs = [(t, s) for t in range(len(tasks)) for s in per_task_seeds.get(tasks[t], ())]
    envs = lockstep_envs([(tasks[t], s) for t, s in pairs], image_size, max_steps)
    obs = [env.reset(s) for env, (_, s) in zip(envs, pairs, strict=True)]
    success = np.zeros(len(envs), bool)
    plans: dict[int, list[np.ndarray]] = {}
    rows: dict[str, list] = {k: [] for k in _ROW_KEYS}
    active = list(range(len(envs)))
    bar = tqdm(total=len(envs), desc=f"DAgger roll-outs (beta={beta:.2f})", disable=not progress)
    while active:
        views = [envs[i].render_views() for i in active]
        need = [j for j, i in enumerate(active) if not plans.get(i)]
        if need:
            chunks = policy(
                np.stack([views[j][0] for j in need]),
                np.stack([views[j][1] for j in need]),
                np.stack([envs[active[j]].proprio() for j in need]),
                np.asarray([pairs[active[j]][0] for j in need]),
            )
            for j, chunk in zip(need, chunks, strict=True):
                plans[active[j]] = list(chunk[:execute])
        still = []
        for j, i in enumerate(active):
            expert = envs[i].expert_action(obs[i])
            rows["images"].append(views[j][0])
            rows["wrist"].append(views[j][1])
            rows["state"].append(envs[i].proprio())
            rows["actions"].append(expert)
            rows["task_ids"].append(pairs[i][0])
            rows["episode_ids"].append(i)
            rows["steps"].append(envs[i].steps)
            planned = plans[i].pop(0)
            executed = expert if rng.random() < beta else planned
            obs[i], ok, done = envs[i].step(executed)
            success[i] |= ok
            if done:
                bar.update(1)
            else:
                still.append(i)
        active = still
    bar.close()
    per_task = {
        tasks[t]: float(np.mean([success[i] for i, (tt, _) in enumerate(pairs) if tt == t]))
        for t in range(len(tasks))
    }
    return _stack(rows, tasks, image_size), per_task


def chunk_index(episode_ids: np.ndarray, chunk: int) -> np.ndarray:
    """[N, chunk] row indices of each row's chunk label: rows i .. i + chunk - 1 of the same
    episode, the episode's last row repeated past its end (rows of an episode are contiguous)."""
    n = len(episode_ids)
    idx = np.arange(n)[:, None] + np.arange(chunk)[None, :]
    # Last row of each row's episode: episodes are contiguous runs of equal ids.
    change = np.flatnonzero(np.diff(episode_ids)) + 1
    ends = np.append(change, n) - 1
    run = np.searchsorted(change, np.arange(n), side="right")
    return np.minimum(idx, ends[run][:, None])


def proprio_norm_stats(state: np.ndarray) -> dict[str, list[float]]:
    """OFT's ``proprio`` statistics (q01/q99/min/max/mean/std) of the robot state."""
    state = np.asarray(state, np.float64)
    q01, q99 = np.quantile(state, 0.01, axis=0), np.quantile(state, 0.99, axis=0)
    q99 = np.where(q99 - q01 < 1e-6, q01 + 1e-6, q99)

    def r(x: np.ndarray) -> list[float]:
        return [round(float(v), 6) for v in x]

    return {
        "mean": r(state.mean(0)),
        "std": r(state.std(0)),
        "max": r(state.max(0)),
        "min": r(state.min(0)),
        "q01": r(q01),
        "q99": r(q99),
    }


def main() -> None:
    """``python -m vllm_vla_pruner.research.sim.oft_data --out FILE.npz``: cache demos."""
    import argparse

    from .metaworld_env import DEFAULT_TASKS

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    data = collect_expert_views(
        a.tasks.split(","), a.episodes, a.image_size, seed=a.seed, noise_std=a.noise
    )
    save_dataset(data, Path(a.out))
    print(f"wrote {a.out}: {len(data['images'])} frames")


if __name__ == "__main__":
    main()
