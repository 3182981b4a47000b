"""The OFT-style Meta-World trainer: chunk labels, the batched forward against the reference,
and a run that stops and resumes into the checkpoint layout the plugin serves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.chunk_fixtures import TASKS, fake_dataset, stop_and_resume, tiny_model_args
from vllm_vla_pruner.config import is_oft_checkpoint, oft_spec
from vllm_vla_pruner.research.reference_oft import ReferenceOFT
from vllm_vla_pruner.research.sim.data import action_norm_stats
from vllm_vla_pruner.research.sim.evaluate import pixel_values_from_uint8
from vllm_vla_pruner.research.sim.metaworld_env import TASK_INSTRUCTIONS
from vllm_vla_pruner.research.sim.oft_data import chunk_index, proprio_norm_stats
from vllm_vla_pruner.research.sim.train_oft import (
    ChunkNet,
    build_init_checkpoint,
    main,
    random_visual_drop,
    warm_start,
)


def test_chunk_index_stays_inside_each_episode() -> None:
    episodes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    idx = chunk_index(episodes, 3)
    assert idx.tolist()[:5] == [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 4], [4, 4, 4]]
    assert (episodes[idx] == episodes[:, None]).all()
    assert (np.diff(idx, axis=1) >= 0).all()


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory):
    data = fake_dataset()
    stats = action_norm_stats(data["actions"], 6)
    stats["proprio"] = proprio_norm_stats(data["state"])
    args = tiny_model_args()
    return build_init_checkpoint(tmp_path_factory.mktemp("oft") / "init", args, stats)


def test_batched_forward_equals_reference(init_dir) -> None:
    """Mixed tasks (different prompt lengths, so padded rows) in one batch give each sample's
    reference chunk: the attention contract and the head's row shift are the served ones."""
    model = ReferenceOFT.from_pretrained(init_dir, "metaworld")
    net = ChunkNet(model, TASKS)
    data = fake_dataset(seed=1)
    rows = [0, 7, 13]
    tids = np.array([0, 4, 6])
    fixed = pixel_values_from_uint8(data["images"][rows])
    wrist = pixel_values_from_uint8(data["wrist"][rows])
    with torch.no_grad():
        batched = net.forward(fixed, wrist, data["state"][rows], tids)
    for i, row in enumerate(rows):
        ref = model.predict_chunk(
            [fixed[i : i + 1], wrist[i : i + 1]],
            TASK_INSTRUCTIONS[TASKS[tids[i]]],
            data["state"][row],
        )
        assert ref.normalized.abs().mean() > 0.05
        torch.testing.assert_close(batched[i], ref.normalized, atol=2e-5, rtol=0)


def test_visual_drop_trains_the_pruned_forward_the_engine_serves(init_dir) -> None:
    """`--visual-drop`: a sample that loses visual tokens from layer K on gets the reference's
    chunk for the complementary kept set pruned at K (the oracle the engine equals), and a
    sample that loses none its unpruned chunk."""
    model = ReferenceOFT.from_pretrained(init_dir, "metaworld")
    net = ChunkNet(model, TASKS)
    data = fake_dataset(seed=2)
    rows, tids = [3, 9], np.array([1, 5])
    m = 2 * model.base.num_visual
    dropped = random_visual_drop(np.random.default_rng(0), 2, m, share=1.0)
    dropped[1] = False
    assert 0 < dropped[0].sum() < m
    fixed = pixel_values_from_uint8(data["images"][rows])
    wrist = pixel_values_from_uint8(data["wrist"][rows])
    with torch.no_grad():
        batched = net.forward(
            fixed, wrist, data["state"][rows], tids, torch.from_numpy(dropped), drop_layer=1
        )
    for i, row in enumerate(rows):
        kept = torch.from_numpy(np.flatnonzero(~dropped[i]))
        ref = model.predict_chunk(
            [fixed[i : i + 1], wrist[i : i + 1]],
            TASK_INSTRUCTIONS[TASKS[tids[i]]],
            data["state"][row],
            keep_visual=kept if i == 0 else None,
            prune_layer=1,
        )
        torch.testing.assert_close(batched[i], ref.normalized, atol=2e-5, rtol=0)
    unpruned = model.predict_chunk(
        [fixed[:1], wrist[:1]], TASK_INSTRUCTIONS[TASKS[tids[0]]], data["state"][rows[0]]
    )
    assert (batched[0] - unpruned.normalized).abs().max() > 1e-3  # the drop changed it


def test_random_visual_drop_keeps_the_table_budgets() -> None:
    out = random_visual_drop(np.random.default_rng(1), 400, 128, share=0.5)
    kept = 128 - out.sum(axis=1)
    assert set(kept.tolist()) == {128, 64, 32, 16}
    assert 0.4 < (kept < 128).mean() < 0.6


def test_stop_and_resume_writes_the_oft_layout(tmp_path) -> None:
    out, first, state = stop_and_resume(main, tmp_path, [])
    assert is_oft_checkpoint(out)
    spec = oft_spec(out)
    assert (spec.num_images, spec.chunk, spec.action_dim, spec.proprio_dim) == (2, 8, 4, 4)
    assert spec.action_head_file == "action_head--4_checkpoint.pt"
    meta = json.loads((out / "training.json").read_text())
    assert meta["optimizer_steps"] == 4
    served = ReferenceOFT.from_pretrained(out, "metaworld")
    trained = {k: v for k, v in state["model"].items() if k.startswith("action_head.")}
    for name, value in trained.items():
        torch.testing.assert_close(served.state_dict()[name], value)


def test_grown_policy_starts_as_its_source(init_dir, tmp_path) -> None:
    """--init-from with twice the layers: the new layers are identities, so the deeper policy
    predicts its source's chunk; a source of another width is refused by weight name."""
    data = fake_dataset()
    stats = json.loads((init_dir / "dataset_statistics.json").read_text())["metaworld"]
    args = tiny_model_args()
    args.layers *= 2
    deeper = ReferenceOFT.from_pretrained(
        build_init_checkpoint(tmp_path / "deep", args, stats), "metaworld"
    )
    assert warm_start(deeper, init_dir) == args.layers // 2
    source = ReferenceOFT.from_pretrained(init_dir, "metaworld")
    rows, tids = [0, 9], np.array([2, 5])
    fixed = pixel_values_from_uint8(data["images"][rows])
    wrist = pixel_values_from_uint8(data["wrist"][rows])
    with torch.no_grad():
        grown = ChunkNet(deeper, TASKS).forward(fixed, wrist, data["state"][rows], tids)
        want = ChunkNet(source, TASKS).forward(fixed, wrist, data["state"][rows], tids)
    assert want.abs().mean() > 0.05
    torch.testing.assert_close(grown, want, atol=1e-6, rtol=0)

    args.hidden *= 2
    wider = ReferenceOFT.from_pretrained(
        build_init_checkpoint(tmp_path / "wide", args, stats), "metaworld"
    )
    with pytest.raises(ValueError, match="no same-shaped source"):
        warm_start(wider, init_dir)
