"""The OFT closed loop's chunk bookkeeping, without an engine or a simulator: one request per
``execute_steps`` control steps per robot, the chunk's rows executed in order, a new session
per episode, all robots that need a chunk in one engine call; and the report's comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_request_builder import ChunkRecordingLLM
from vllm_vla_pruner.research.sim.evaluate import StepBatch


class FakeEnv:
    """What the chunk policy reads from a ``MetaWorldTask``: two views and the proprio."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.observed = 0

    def render_views(self) -> tuple[np.ndarray, np.ndarray]:
        self.observed += 1
        return tuple(self.rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2))

    def proprio(self) -> np.ndarray:
        return np.zeros(8, np.float32)


@pytest.fixture(scope="module")
def tiny_oft(tmp_path_factory) -> Path:
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_cb"), seed=2)


def test_one_request_per_executed_rows_and_rows_in_order(tiny_oft: Path):
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy

    rows = [[float(10 * i + j) for j in range(7)] for i in range(3)]  # tiny-oft: chunk 3 x 7
    llm = ChunkRecordingLLM(rows)
    policy = ChunkEnginePolicy(llm, tiny_oft, "vlapruner", 0.25, "t", execute_steps=2)
    envs = [FakeEnv(0), FakeEnv(1)]
    executed = []
    calls_per_step = []
    for step in range(6):
        before = len(llm.requests)
        batch = StepBatch(
            episodes=[4, 9],
            images=np.zeros((2, 0), np.uint8),
            instructions=["open the drawer", "close the drawer"],
            first=[step == 0, step == 0],
            envs=envs,
        )
        executed.append(policy(batch))
        calls_per_step.append(len(llm.requests) - before)
    # Both robots ask together every 2 steps: 3 engine calls of 2 requests.
    assert calls_per_step == [2, 0, 2, 0, 2, 0] and policy.rec.engine_calls == 3
    assert policy.rec.requests == 6 and [e.observed for e in envs] == [3, 3]
    # Rows 0 and 1 of each chunk executed, in order (row 2 never: the robot asked again).
    acts = np.stack(executed)  # [step, robot, dim]
    for step in range(6):
        assert acts[step, 0].tolist() == rows[step % 2]
    params = [p for _, p in llm.requests]
    sessions = [p.extra_args["vla_session_id"] for p in params]
    assert sessions == ["t/4", "t/9"] * 3
    assert [p.extra_args["vla_new_episode"] for p in params] == [True, True] + [False] * 4
    assert policy.rec.chunk_shapes == {(3, 7)}
    assert policy.rec.action_min.tolist() == rows[0] and policy.rec.action_max.tolist() == rows[2]
    assert len(policy.rec.views) == 0  # episode 0 is recorded; these robots are 4 and 9


def test_a_new_episode_drops_the_old_chunk(tiny_oft: Path):
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy

    llm = ChunkRecordingLLM([[0.0] * 7] * 3)
    policy = ChunkEnginePolicy(llm, tiny_oft, "none", 1.0, "t", execute_steps=3)
    env = FakeEnv(0)

    def step(first: bool) -> None:
        policy(StepBatch([0], np.zeros((1, 0), np.uint8), ["go"], [first], [env]))

    step(True)
    step(False)
    step(True)  # rows left, but a new episode asks at once
    assert len(llm.requests) == 2 and len(policy.rec.views) == 2


def test_execute_steps_outside_the_chunk_is_refused(tiny_oft: Path):
    from vllm_vla_pruner.api.protocol import ApiError
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy

    with pytest.raises(ApiError, match="execute_steps"):
        ChunkEnginePolicy(ChunkRecordingLLM([[0.0] * 7] * 3), tiny_oft, "none", 1.0, "t", 4)


def test_non_finite_chunk_is_an_error_not_an_action(tiny_oft: Path):
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy

    llm = ChunkRecordingLLM([[float("nan")] * 7] * 3)
    policy = ChunkEnginePolicy(llm, tiny_oft, "none", 1.0, "t", 2)
    with pytest.raises(RuntimeError, match="non-finite"):
        policy(StepBatch([0], np.zeros((1, 0), np.uint8), ["go"], [True], [FakeEnv(0)]))


def test_interleaved_configurations_call_the_engine_separately_in_turn(tiny_oft: Path):
    """Each configuration's robots in their own engine call (its own time), the calls' order
    rotating each step; episode ``e`` is configuration ``e // n`` on goal ``e % n``."""
    from vllm_vla_pruner.research.sim.chunk_benchmark import (
        ChunkEnginePolicy,
        InterleavedPolicies,
    )

    llm = ChunkRecordingLLM([[0.0] * 7] * 3)
    a = ChunkEnginePolicy(llm, tiny_oft, "none", 1.0, "a", execute_steps=1)
    b = ChunkEnginePolicy(llm, tiny_oft, "fastv", 0.25, "b", execute_steps=1)
    both = InterleavedPolicies([a, b], n_pairs=2)
    envs = [FakeEnv(i) for i in range(4)]
    callers = []
    for step in range(3):
        before = len(llm.requests)
        acts = both(
            StepBatch([0, 1, 2, 3], np.zeros((4, 0), np.uint8), ["go"] * 4, [step == 0] * 4, envs)
        )
        assert acts.shape == (4, 7)
        callers.append([p.extra_args["vla_session_id"][0] for _, p in llm.requests[before:]])
    assert callers == [["a", "a", "b", "b"], ["b", "b", "a", "a"], ["a", "a", "b", "b"]]
    assert a.rec.engine_calls == b.rec.engine_calls == 3
    assert [p.extra_args["vla_session_id"] for _, p in llm.requests[:4]] == [
        "a/0",
        "a/1",
        "b/0",
        "b/1",
    ]


def test_pi0_requests_carry_a_noise_seed_per_episode_and_chunk(tmp_path: Path, tiny_oft: Path):
    """A pi0 checkpoint goes through the same policy: every configuration's n-th chunk of an
    episode is denoised from the same seed (paired comparisons, reproducible runs), a new
    episode starts the count again; OFT requests carry no seed."""
    from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED
    from vllm_vla_pruner.research.checkpoint import build_checkpoint
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy, chunk_length

    pi0 = build_checkpoint("tiny-pi0", tmp_path / "pi0", seed=1)  # horizon 5, 7 action dims
    assert chunk_length(pi0) == 5 and chunk_length(tiny_oft) == 3
    seeds = {}
    for method, keep in (("none", 1.0), ("vlapruner", 0.25)):
        llm = ChunkRecordingLLM([[0.0] * 7] * 5)
        policy = ChunkEnginePolicy(llm, pi0, method, keep, method, execute_steps=2)
        assert (policy.kind, policy.num_images, policy.chunk) == ("pi0", 3, 5)
        envs = [FakeEnv(0), FakeEnv(1)]
        for step in range(6):
            first = step in (0, 4)  # episode restarts at step 4
            policy(StepBatch([4, 9], np.zeros((2, 0), np.uint8), ["go"] * 2, [first] * 2, envs))
        seeds[method] = [p.extra_args[KEY_NOISE_SEED] for _, p in llm.requests]
        assert len(llm.requests[0][0]["multi_modal_data"]["image"]) == 2  # the cameras sent
    assert seeds["none"] == [4000, 9000, 4001, 9001, 4000, 9000]
    assert seeds["vlapruner"] == seeds["none"]
    oft_llm = ChunkRecordingLLM([[0.0] * 7] * 3)
    oft = ChunkEnginePolicy(oft_llm, tiny_oft, "none", 1.0, "o", execute_steps=2)
    oft(StepBatch([0], np.zeros((1, 0), np.uint8), ["go"], [True], [FakeEnv(0)]))
    assert KEY_NOISE_SEED not in oft_llm.requests[0][1].extra_args


def test_kept_patch_figure_after_a_resume_without_the_figures_keep(tmp_path: Path):
    """A resumed run whose unpruned and keep-0.25 rows came from the store (no frames) draws
    the configurations it ran now instead of failing on an empty figure."""
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkRunRecord, save_chunk_overlays

    view = np.zeros((64, 64, 3), np.uint8)
    stored = [ChunkRunRecord("none", 1.0, None), ChunkRunRecord("vlapruner", 0.25, None)]
    ran = ChunkRunRecord("vlapruner", 0.125, None, views=[(view, view)], request_ids=["r0"])
    trace = {"r0": [0, 5, 70]}
    path = save_chunk_overlays([*stored, ran], trace, 8, tmp_path, "policy")
    assert path.is_file() and path.stat().st_size > 0
