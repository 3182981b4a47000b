"""Fast smoke test of the Meta-World pipeline: env, camera, expert, demos -> action tokens."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# MuJoCo picks its GL backend when first imported (metaworld imports it): headless EGL.
os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("metaworld", reason="metaworld==3.1.1 is not installed (pip install .[sim])")

from vllm_vla_pruner.actions import ActionDecoder  # noqa: E402
from vllm_vla_pruner.research.sim.data import (  # noqa: E402
    NORM_STATS_KEY,
    action_norm_stats,
    collect_expert,
    concat,
    empty_dataset,
)
from vllm_vla_pruner.research.sim.evaluate import (  # noqa: E402
    paired_ratio_ci,
    rollout_lockstep,
    wilson_interval,
)
from vllm_vla_pruner.research.sim.metaworld_env import (  # noqa: E402
    DEFAULT_TASKS,
    EVAL_SEED_OFFSET,
    INSTRUCTION_PAIRS,
    TASK_INSTRUCTIONS,
    WRIST_CAMERA,
    eval_seeds,
    lockstep_envs,
    make_task,
)

ASSET = Path(__file__).resolve().parents[1] / "vllm_vla_pruner" / "assets" / "metaworld-vla"


def test_task_list_has_an_instruction_pair() -> None:
    assert len(DEFAULT_TASKS) >= 4
    assert any(a in DEFAULT_TASKS and b in DEFAULT_TASKS for a, b in INSTRUCTION_PAIRS)
    assert len({TASK_INSTRUCTIONS[t] for t in DEFAULT_TASKS}) == len(DEFAULT_TASKS)
    assert min(eval_seeds(3)) >= EVAL_SEED_OFFSET


def test_render_shape_and_content() -> None:
    env = make_task("drawer-open-v3", 64)
    env.reset(0)
    img = env.render()
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert img.std() > 10, "frame looks blank (EGL/osmesa rendering broken?)"
    env.reset(1)
    assert not np.array_equal(env.render(), img), "different goals should look different"


def test_shared_renderer_frames_are_exact() -> None:
    """Envs of one task share a renderer (an EGL context each would cost ~150 MB per
    lockstep episode); a frame must be byte-identical to one from the env's own renderer,
    whichever env's model the shared renderer was built on."""
    import mujoco

    task = "drawer-open-v3"
    envs = lockstep_envs([(task, s) for s in range(3)])
    assert len({id(e.renderer) for e in envs}) == 1
    rng = np.random.default_rng(0)
    for i, env in enumerate(envs):
        env.reset(EVAL_SEED_OFFSET + 7 * i)  # other drawer positions than envs[0]'s
        for _ in range(20):
            env.step(rng.uniform(-1, 1, 4))
    for env in envs[1:]:
        shared = env.renderer
        own = mujoco.Renderer(env.env.model, shared.height, shared.width)
        own.scene.flags[:] = shared.scene.flags
        try:
            for camera in (None, WRIST_CAMERA):
                frame = env.render(camera)
                env.renderer = own
                assert np.array_equal(env.render(camera), frame), camera
                env.renderer = shared
        finally:
            env.renderer = shared
            own.close()
    assert not np.array_equal(envs[1].render(), envs[2].render())


def test_expert_succeeds_within_step_cap() -> None:
    env = make_task("button-press-topdown-v3", 64)
    obs = env.reset(EVAL_SEED_OFFSET)
    done = success = False
    while not done:
        obs, success, done = env.step(env.expert_action(obs))
    assert success and env.steps < env.max_steps


def test_one_short_demo_gives_valid_action_tokens() -> None:
    data = collect_expert(["drawer-close-v3"], 1, 64, max_steps=12, progress=False)
    n = len(data["actions"])
    assert n == 12 and data["images"].shape == (n, 64, 64, 3)
    stats = action_norm_stats(data["actions"], 1)
    assert len(stats["action"]["q01"]) == 4 and stats["action"]["mask"] == [True] * 3 + [False]
    decoder = ActionDecoder({NORM_STATS_KEY: stats}, vocab_size=1024)
    valid = set(decoder.action_token_ids)
    for action in data["actions"]:
        ids = decoder.encode(action)
        assert len(ids) == 4 and set(ids) <= valid
        back = np.asarray(decoder.decode(ids))
        span = np.asarray(stats["action"]["q99"]) - np.asarray(stats["action"]["q01"])
        clipped = np.clip(action, stats["action"]["q01"], stats["action"]["q99"])
        assert np.all(np.abs(back[:3] - clipped[:3]) <= span[:3] / 255 + 1e-6)


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(8, 10)
    assert 0.49 < lo < 0.5 and 0.94 < hi < 0.95
    assert wilson_interval(0, 0) == (0.0, 1.0)


def _rows(tasks: list[str], task_ids: list[int], episodes: list[int]) -> dict:
    data = empty_dataset(tasks, 4)
    n = len(task_ids)
    data.update(
        images=np.full((n, 4, 4, 3), 7, np.uint8),
        actions=np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        task_ids=np.asarray(task_ids, np.int16),
        episode_ids=np.asarray(episodes, np.int32),
        steps=np.arange(n, dtype=np.int16),
    )
    return data


def test_concat_appends_new_tasks_and_remaps_ids() -> None:
    a = _rows(["drawer-open-v3", "drawer-close-v3"], [0, 1, 1], [0, 1, 1])
    b = _rows(["handle-pull-v3", "drawer-close-v3"], [0, 1], [0, 1])
    out = concat(a, b)
    assert out["tasks"] == ["drawer-open-v3", "drawer-close-v3", "handle-pull-v3"]
    names = [out["tasks"][i] for i in out["task_ids"]]
    assert names == ["drawer-open-v3", "drawer-close-v3", "drawer-close-v3"] + [
        "handle-pull-v3",
        "drawer-close-v3",
    ]
    assert out["episode_ids"].tolist() == [0, 1, 1, 2, 3]  # b's episodes kept apart
    assert np.array_equal(out["actions"][3:], b["actions"])


def test_paired_ratio_ci() -> None:
    same = [[True, False, True, True]] * 3
    assert paired_ratio_ci(same, same) == (1.0, 1.0)  # identical outcomes: no spread
    base = [[True] * 10, [True] * 5 + [False] * 5]
    worse = [[True] * 8 + [False] * 2, [True] * 4 + [False] * 6]
    lo, hi = paired_ratio_ci(base, worse)
    assert lo < 12 / 15 < hi <= 1.0  # never better on any episode: the ratio stays <= 1
    with pytest.raises(ValueError, match="differ in number"):
        paired_ratio_ci([[True]], [[True, False]])


def test_lockstep_rollout_indexes_episodes_across_chunks() -> None:
    pairs = [("button-press-topdown-v3", EVAL_SEED_OFFSET + i) for i in range(3)]
    seen: dict[int, int] = {}
    firsts: list[int] = []

    def policy(batch) -> np.ndarray:
        for e, first in zip(batch.episodes, batch.first):
            seen[e] = seen.get(e, 0) + 1
            if first:
                firsts.append(e)
        assert batch.images.shape[1:] == (64, 64, 3)
        assert set(batch.instructions) == {"press the button down"}
        return np.zeros((len(batch.episodes), 4), np.float32)

    res = rollout_lockstep(policy, pairs, 64, max_steps=5, progress=False, max_parallel=2)
    assert seen == {0: 5, 1: 5, 2: 5} and firsts == [0, 1, 2]
    assert res.total_steps == 15 and res.tasks["button-press-topdown-v3"].episodes == 3


@pytest.mark.skipif(not (ASSET / "model.safetensors").exists(), reason="no embedded checkpoint")
def test_embedded_checkpoint_acts_in_the_env() -> None:
    from vllm_vla_pruner.research.reference import ReferenceOpenVLA
    from vllm_vla_pruner.research.sim.evaluate import ReferencePolicy

    policy = ReferencePolicy(ReferenceOpenVLA.from_pretrained(ASSET))
    env = make_task(DEFAULT_TASKS[0], policy.model.image_size)
    env.reset(EVAL_SEED_OFFSET)
    action = policy(env.render(), env.instruction, "smoke", True)
    assert action.shape == (4,) and np.all(np.abs(action) <= 1.0 + 1e-6)
    env.step(action)


def test_lockstep_chunks_take_tasks_in_turn_so_the_env_pool_stays_small() -> None:
    from vllm_vla_pruner.research.sim import metaworld_env
    from vllm_vla_pruner.research.sim.evaluate import _round_robin_by_task

    a, b = "drawer-open-v3", "drawer-close-v3"
    pairs = [(a, 1), (a, 2), (a, 3), (b, 1), (b, 2), (b, 3)]
    assert _round_robin_by_task(pairs) == [0, 3, 1, 4, 2, 5]
    assert _round_robin_by_task([(a, 1), (b, 1), (b, 2)]) == [0, 1, 2]

    metaworld_env._LOCKSTEP_POOL.clear()
    steps_by_episode: dict[int, int] = {}

    def policy(batch) -> np.ndarray:
        tasks = [pairs[e][0] for e in batch.episodes]
        assert sorted(tasks) == sorted([a, b])  # every chunk of two mixes the two tasks
        for e in batch.episodes:
            steps_by_episode[e] = steps_by_episode.get(e, 0) + 1
        return np.zeros((len(batch.episodes), 4), np.float32)

    res = rollout_lockstep(policy, pairs, 64, max_steps=2, progress=False, max_parallel=2)
    pool = {task: len(envs) for (task, _), envs in metaworld_env._LOCKSTEP_POOL.items()}
    assert pool == {a: 1, b: 1}  # task-major chunks would have held 2 of a, then 2 of b
    assert steps_by_episode == dict.fromkeys(range(6), 2)
    assert [len(res.tasks[t].per_episode) for t in (a, b)] == [3, 3]
