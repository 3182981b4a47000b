"""The pi0-style Meta-World trainer: the batched forward against the plain-PyTorch oracle, the
flow-matching loss, and a run that stops and resumes into the pi0 layout the plugin serves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.chunk_fixtures import TASKS, fake_dataset, stop_and_resume, tiny_model_args
from vllm_vla_pruner.pi0_spec import (
    is_pi0_checkpoint,
    load_norm_stats,
    pi0_prompt_token_ids,
    pi0_spec,
)
from vllm_vla_pruner.research.reference_pi0 import ReferencePi0
from vllm_vla_pruner.research.sim.metaworld_env import TASK_INSTRUCTIONS
from vllm_vla_pruner.research.sim.train_pi0 import (
    FlowNet,
    build_init_checkpoint,
    main,
    norm_stats,
    sample_time,
    sampling_policy,
    siglip_pixels,
    warm_start,
)
from vllm_vla_pruner.research.sim.validate_pi0 import main as validate_main


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory: pytest.TempPathFactory):
    args = tiny_model_args(expert_width=64)
    out = tmp_path_factory.mktemp("pi0") / "init"
    return build_init_checkpoint(out, args, norm_stats(fake_dataset()))


def test_init_checkpoint_is_a_two_camera_pi0(init_dir) -> None:
    spec = pi0_spec(init_dir)
    assert spec.cameras == ("base_0_rgb", "left_wrist_0_rgb")
    assert (spec.horizon, spec.action_dim, spec.robot_action_dim, spec.state_dim) == (8, 4, 4, 4)
    stats = load_norm_stats(init_dir, spec)
    data = fake_dataset()
    np.testing.assert_allclose(stats["actions"]["mean"], data["actions"].mean(0), atol=1e-5)


def test_batched_forward_equals_reference(init_dir) -> None:
    """Mixed tasks (prompts of different lengths, so padded rows) in one batch: every Euler
    step of the batched flow (one prefix, t = 1, 0.9, ...) gives each sample's oracle chunk
    for the same noise, and one step (t = 1, x_t = noise) the oracle's velocity."""
    model = ReferencePi0.from_pretrained(init_dir)
    tok = AutoTokenizer.from_pretrained(str(init_dir))
    net = FlowNet(model, tok, TASKS)
    data = fake_dataset(seed=1)
    rows, tids = [0, 7, 13], np.array([0, 4, 6])
    cams = [siglip_pixels(data["images"][rows]), siglip_pixels(data["wrist"][rows])]
    assert len({len(net.ids[t].nonzero()) for t in tids}) > 1  # padding is exercised
    state = model.norm.state(data["state"][rows])
    noise = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ten = net.sample(cams, tids, state, noise, 10)
        one = net.sample(cams, tids, state, noise, 1)
    for i, row in enumerate(rows):
        ids = pi0_prompt_token_ids(tok, TASK_INSTRUCTIONS[TASKS[tids[i]]], 48)
        inputs = model.build_inputs([cams[0][i], cams[1][i]], [True, True], ids, data["state"][row])
        ref = model.sample(inputs, noise[i])
        assert ref.normalized.abs().mean() > 0.05
        torch.testing.assert_close(ten[i], ref.normalized, atol=1e-5, rtol=0)
        ref1 = model.sample(inputs, noise[i], num_steps=1)
        torch.testing.assert_close(one[i], ref1.normalized, atol=1e-5, rtol=0)


def test_loss_is_pi0s_flow_matching(init_dir) -> None:
    """The loss equals MSE(v(x_t, t), noise - actions) recomputed from the same draws, and
    k draws per frame on one prefix equal the frames repeated k times."""
    model = ReferencePi0.from_pretrained(init_dir)
    net = FlowNet(model, AutoTokenizer.from_pretrained(str(init_dir)), TASKS)
    data = fake_dataset(seed=2)
    rows, tids = [1, 2], np.array([3, 5])
    cams = [siglip_pixels(data["images"][rows]), siglip_pixels(data["wrist"][rows])]
    state = model.norm.state(data["state"][rows])
    actions = torch.randn(2, 8, 4)
    with torch.no_grad():
        got = net.loss(cams, tids, state, actions, 3, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        t = sample_time(6, gen)
        noise = torch.randn(6, 8, 4, generator=gen)
        a = actions.repeat_interleave(3, 0)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * a
        rep = [c.repeat_interleave(3, 0) for c in cams]
        kv, valid, n_valid = net.prefix(rep, np.repeat(tids, 3))
        v = net.velocity(kv, valid, n_valid, state.repeat_interleave(3, 0), x_t, t)
    torch.testing.assert_close(got, ((v - (noise - a)) ** 2).mean(), atol=1e-6, rtol=1e-5)
    assert (t > 0.001 - 1e-9).all() and (t <= 1.0).all()
    big = sample_time(20000, torch.Generator().manual_seed(0))
    assert abs(float(big.mean()) - (0.001 + 0.999 * 0.6)) < 0.01  # Beta(1.5, 1) mean 0.6


def test_stop_and_resume_writes_the_pi0_layout(tmp_path) -> None:
    out, first, state = stop_and_resume(main, tmp_path, ["--noise-samples", "2", "--no-progress"])
    assert is_pi0_checkpoint(out)
    meta = json.loads((out / "training.json").read_text())
    assert meta["optimizer_steps"] == 4
    served = ReferencePi0.from_pretrained(out)
    for name, value in state["model"].items():
        if not name.startswith("expert.embed_tokens"):  # pi0's expert has no token table
            torch.testing.assert_close(served.state_dict()[name], value)
    changed = [k for k in state["model"] if not torch.equal(state["model"][k], first["model"][k])]
    assert changed  # steps 3-4 trained


def test_grown_policy_starts_as_its_source(init_dir, tmp_path) -> None:
    """--init-from with twice the layers: the prefix LM and the action expert each get
    identity layers, so the deeper policy samples its source's chunk for the same noise
    (the new layers' attention still runs: K/V of every layer are read); a source of
    another width is refused by weight name."""
    stats = json.loads((init_dir / "assets" / "metaworld" / "norm_stats.json").read_text())
    args = tiny_model_args(expert_width=64)
    args.layers *= 2
    deeper = ReferencePi0.from_pretrained(build_init_checkpoint(tmp_path / "deep", args, stats))
    assert warm_start(deeper, init_dir) == args.layers // 2
    assert len(deeper.lm.layers) == len(deeper.expert.layers) == args.layers
    source = ReferencePi0.from_pretrained(init_dir)
    tok = AutoTokenizer.from_pretrained(str(init_dir))
    data = fake_dataset(seed=2)
    rows, tids = [1, 8], np.array([3, 6])
    cams = [siglip_pixels(data["images"][rows]), siglip_pixels(data["wrist"][rows])]
    state = source.norm.state(data["state"][rows])
    noise = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grown = FlowNet(deeper, tok, TASKS).sample(cams, tids, state, noise, 10)
        want = FlowNet(source, tok, TASKS).sample(cams, tids, state, noise, 10)
    assert want.abs().mean() > 0.05
    torch.testing.assert_close(grown, want, atol=1e-5, rtol=0)

    args.hidden *= 2
    wider = ReferencePi0.from_pretrained(build_init_checkpoint(tmp_path / "wide", args, stats))
    with pytest.raises(ValueError, match="no same-shaped source"):
        warm_start(wider, init_dir)


def test_sampling_policy_is_seeded_per_call_and_reset(init_dir) -> None:
    """Validation and DAgger chunks: call n draws its noise from seed + 7919 n, un-normalised
    with the checkpoint's statistics; reset() replays the same noise; the model's training
    mode is left as it was."""
    model = ReferencePi0.from_pretrained(init_dir)
    model.train()
    net = FlowNet(model, AutoTokenizer.from_pretrained(str(init_dir)), TASKS)
    policy, reset = sampling_policy(net, 8, 10, seed=3)
    data = fake_dataset(seed=2)
    rows, tids = [1, 5], np.array([2, 6])
    args = (data["images"][rows], data["wrist"][rows], data["state"][rows], tids)
    first, second = policy(*args), policy(*args)
    assert model.training
    assert not np.allclose(first, second)  # another call, other noise
    reset()
    np.testing.assert_array_equal(policy(*args), first)
    noise = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(3 + 7919))
    cams = [siglip_pixels(data["images"][rows]), siglip_pixels(data["wrist"][rows])]
    with torch.no_grad():
        x = net.sample(cams, tids, model.norm.state(data["state"][rows]), noise, 10)
    np.testing.assert_allclose(second, model.norm.actions(x).float().numpy(), atol=1e-6)


def test_validate_writes_per_task_success_on_validation_goals(init_dir, tmp_path) -> None:
    out = tmp_path / "val.json"
    validate_main(
        [str(init_dir), "--episodes", "1", "--tasks", *TASKS[:2], "--max-steps", "4"]
        + ["--out", str(out)]
    )
    result = json.loads(out.read_text())[str(init_dir)]
    assert set(result["per_task"]) == set(TASKS[:2])
    assert all(v in (0.0, 1.0) for v in result["per_task"].values())
    assert result["mean"] == np.mean(list(result["per_task"].values()))
