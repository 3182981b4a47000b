"""Demonstrations from Meta-World's scripted experts, action statistics, and DAgger data.

A dataset is a dict of numpy arrays, one row per frame: ``images`` (uint8, N x S x S x 3),
``actions`` (float32, N x 4: the expert's action at that frame, even when another action
was executed), ``task_ids`` (int16, index into ``tasks``), ``episode_ids`` (int32) and
``steps`` (int16); plus ``tasks`` (the task names). Expert episodes can be run with noise
injected into the *executed* action (labels stay clean) to widen the visited states.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .metaworld_env import (
    ACTION_DIM,
    DEFAULT_MAX_STEPS,
    EVAL_SEED_OFFSET,
    MetaWorldTask,
    lockstep_envs,
    make_task,
)

NORM_STATS_KEY = "metaworld"
Dataset = dict[str, Any]
# policy(images[B,S,S,3], task_ids[B]) -> actions[B,4] (batched, for DAgger roll-outs)
BatchPolicy = Callable[[np.ndarray, np.ndarray], np.ndarray]
# record(env) -> one frame's observation rows, e.g. {"images": fixed camera}
FrameRecorder = Callable[[MetaWorldTask], dict[str, np.ndarray]]


def empty_dataset(tasks: Sequence[str], image_size: int) -> Dataset:
    return {
        "images": np.zeros((0, image_size, image_size, 3), np.uint8),
        "actions": np.zeros((0, ACTION_DIM), np.float32),
        "task_ids": np.zeros((0,), np.int16),
        "episode_ids": np.zeros((0,), np.int32),
        "steps": np.zeros((0,), np.int16),
        "tasks": list(tasks),
    }


def concat(a: Dataset, b: Dataset) -> Dataset:
    """Aggregate two datasets (episode ids are kept apart). The task list is ``a``'s followed
    by ``b``'s new tasks, so demonstrations for added tasks can be appended to a cached set."""
    tasks = list(a["tasks"]) + [t for t in b["tasks"] if t not in a["tasks"]]
    remap = np.asarray([tasks.index(t) for t in b["tasks"]], np.int16)
    b = dict(b, task_ids=remap[b["task_ids"]] if len(b["task_ids"]) else b["task_ids"])
    offset = int(a["episode_ids"].max()) + 1 if len(a["episode_ids"]) else 0
    out = {k: np.concatenate([a[k], b[k]]) for k in a if k != "tasks"}
    out["episode_ids"][len(a["episode_ids"]) :] += offset
    out["tasks"] = tasks
    return out


def fixed_view(env: MetaWorldTask) -> dict[str, np.ndarray]:
    """What the AR policy's frames record: the fixed camera."""
    return {"images": env.render()}


def collect_expert(
    tasks: Sequence[str],
    episodes_per_task: int,
    image_size: int = 64,
    seed: int = 0,
    noise_std: float = 0.0,
    noisy_fraction: float = 0.5,
    max_steps: int | None = None,
    progress: bool = True,
    record: FrameRecorder = fixed_view,
    stack: Callable[[dict[str, list], Sequence[str], int], Dataset] | None = None,
    rng_offset: int = 12345,
    desc: str = "expert demos",
) -> Dataset:
    """Expert episodes on training goals (seeds ``seed .. seed + episodes_per_task - 1``).

    A ``noisy_fraction`` of the episodes execute ``expert + N(0, noise_std)`` (clipped);
    every frame is labelled with the clean expert action. Stops at success or the step cap.
    ``record(env)`` gives each frame's observation rows (default: the fixed camera);
    ``stack`` turns the rows into a dataset (default: this module's layout).
    """
    if seed + episodes_per_task > EVAL_SEED_OFFSET:
        raise ValueError("training seeds would overlap the held-out evaluation seeds")
    rng = np.random.default_rng(seed + rng_offset)
    rows: dict[str, list] = defaultdict(list)
    n_success, episode = 0, 0
    jobs = [(t, e) for e in range(episodes_per_task) for t in range(len(tasks))]
    for task_id, e in tqdm(jobs, desc=desc, disable=not progress):
        env = make_task(tasks[task_id], image_size)
        env.max_steps = max_steps or DEFAULT_MAX_STEPS
        obs = env.reset(seed + e)
        noisy = noise_std > 0 and rng.random() < noisy_fraction
        done = success = False
        while not done:
            action = env.expert_action(obs)
            for key, value in record(env).items():
                rows[key].append(value)
            rows["actions"].append(action)
            rows["task_ids"].append(task_id)
            rows["episode_ids"].append(episode)
            rows["steps"].append(env.steps)
            executed = action
            if noisy:
                executed = np.clip(action + rng.normal(0, noise_std, ACTION_DIM), -1, 1)
            obs, success, done = env.step(executed)
        n_success += int(success)
        episode += 1
    if progress:
        print(f"expert success {n_success}/{len(jobs)}, {len(rows['actions'])} frames")
    return (stack or _stack)(rows, tasks, image_size)


def _stack(rows: dict[str, list], tasks: Sequence[str], image_size: int) -> Dataset:
    if not rows.get("images"):
        return empty_dataset(tasks, image_size)
    return {
        "images": np.stack(rows["images"]).astype(np.uint8),
        "actions": np.stack(rows["actions"]).astype(np.float32),
        "task_ids": np.asarray(rows["task_ids"], np.int16),
        "episode_ids": np.asarray(rows["episode_ids"], np.int32),
        "steps": np.asarray(rows["steps"], np.int16),
        "tasks": list(tasks),
    }


def dagger_rollouts(
    policy: BatchPolicy,
    tasks: Sequence[str],
    seeds: Sequence[int],
    beta: float,
    image_size: int = 64,
    rng_seed: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
) -> tuple[Dataset, dict[str, float]]:
    """Roll out the policy (executing the expert's action with probability ``beta`` per step)
    on every (task, seed) pair in lockstep, batched; label every visited frame with the
    expert's action. Returns the new frames and the per-task success of these roll-outs.
    """
    if any(s >= EVAL_SEED_OFFSET for s in seeds):
        raise ValueError("DAgger must not visit held-out evaluation goals")
    rng = np.random.default_rng(rng_seed)
    pairs = [(t, s) for t in range(len(tasks)) for s in seeds]
    envs = lockstep_envs([(tasks[t], s) for t, s in pairs], image_size, max_steps)
    obs = [env.reset(s) for env, (_, s) in zip(envs, pairs, strict=True)]
    active = list(range(len(envs)))
    success = np.zeros(len(envs), bool)
    rows: dict[str, list] = {
        k: [] for k in ("images", "actions", "task_ids", "episode_ids", "steps")
    }
    bar = tqdm(total=len(envs), desc=f"DAgger roll-outs (beta={beta:.2f})", disable=not progress)
    while active:
        images = np.stack([envs[i].render() for i in active])
        task_ids = np.asarray([pairs[i][0] for i in active])
        policy_actions = policy(images, task_ids)
        still = []
        for j, i in enumerate(active):
            expert = envs[i].expert_action(obs[i])
            rows["images"].append(images[j])
            rows["actions"].append(expert)
            rows["task_ids"].append(pairs[i][0])
            rows["episode_ids"].append(i)
            rows["steps"].append(envs[i].steps)
            executed = expert if rng.random() < beta else policy_actions[j]
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


def action_norm_stats(actions: np.ndarray, num_trajectories: int) -> dict[str, Any]:
    """OpenVLA's per-dataset statistics for ``actions`` (N x D): the value of one
    ``norm_stats`` key. The last dimension (gripper) is masked out of normalisation."""
    actions = np.asarray(actions, np.float64)
    dim = actions.shape[1]
    q01 = np.quantile(actions, 0.01, axis=0)
    q99 = np.quantile(actions, 0.99, axis=0)
    # A dimension that is constant over the data would divide by zero when normalising.
    q99 = np.where(q99 - q01 < 1e-6, q01 + 1e-6, q99)
    zeros = [0.0] * dim

    def r(x: np.ndarray) -> list[float]:
        return [round(float(v), 6) for v in x]

    return {
        "action": {
            "mean": r(actions.mean(0)),
            "std": r(actions.std(0)),
            "max": r(actions.max(0)),
            "min": r(actions.min(0)),
            "q01": r(q01),
            "q99": r(q99),
            "mask": [True] * (dim - 1) + [False],
        },
        "proprio": {k: zeros for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": int(len(actions)),
        "num_trajectories": int(num_trajectories),
    }


def save_dataset(data: Dataset, path: str | Path) -> None:
    arrays = {k: v for k, v in data.items() if k != "tasks"}
    np.savez(path, tasks=np.asarray(data["tasks"]), **arrays)


def load_dataset(path: str | Path) -> Dataset:
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data["tasks"] = [str(t) for t in data["tasks"]]
    return data


def main() -> None:
    """``python -m vllm_vla_pruner.research.sim.data --out FILE.npz``: cache expert demos."""
    import argparse

    from .metaworld_env import DEFAULT_TASKS

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--append-to", help="a cached dataset to extend with these tasks' demos")
    a = p.parse_args()
    data = collect_expert(
        a.tasks.split(","), a.episodes, a.image_size, seed=a.seed, noise_std=a.noise
    )
    if a.append_to:
        data = concat(load_dataset(a.append_to), data)
    save_dataset(data, a.out)
    print(f"wrote {a.out}: {len(data['images'])} frames")


if __name__ == "__main__":
    main()
