"""pi0 in the real vLLM engine: the flow-matching chunk equals the PyTorch oracle's.

One engine for the module (tiny-pi0, float32). The prefix is a paged-attention prefill; the
action expert's Euler steps run inside the same forward, batched over the step's requests.
The chunk leaves the engine on the per-request report channel
(``kv_transfer_params["vla_actions"]``) with ``max_tokens=1``.
Tolerance: 1e-4 absolute on the normalised (model-scale) chunk for the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pi0_fixtures import camera_images, checkpoint_fixtures, siglip_pixels
from vllm_vla_pruner.engine.plan import KEY_STATE, ActionChunk
from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED, KEY_NUM_STEPS
from vllm_vla_pruner.pi0_spec import pi0_noise, pi0_prompt_token_ids

pytestmark = pytest.mark.engine

TOL = 1e-4
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]


model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi0", seed=3)


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    engine = make_llm(model_dir, max_num_seqs=8)
    yield engine
    shutdown_llm(engine)


def _request(tokenizer, ref, seed, instruction, state, mask=(True, True, True), **extra):
    from vllm import SamplingParams

    ids = pi0_prompt_token_ids(tokenizer, instruction, ref.spec.max_token_len)
    images = [im for im, m in zip(camera_images(seed), mask) if m]
    prompt = {
        "prompt_token_ids": ids,
        "multi_modal_data": {"image": [Image.fromarray(i) for i in images]},
    }
    args = {KEY_STATE: state, **extra} if state is not None else extra
    return prompt, SamplingParams(max_tokens=1, temperature=0.0, extra_args=args)


def _oracle(
    tokenizer, ref, seed, instruction, state, noise_seed, mask=(True, True, True), steps=None, **kw
):
    ids = pi0_prompt_token_ids(tokenizer, instruction, ref.spec.max_token_len)
    images = [siglip_pixels(im) if m else None for im, m in zip(camera_images(seed), mask)]
    inputs = ref.build_inputs(images, list(mask), ids, state)
    noise = pi0_noise(noise_seed, ref.spec.horizon, ref.spec.action_dim)
    return ref.sample(inputs, noise, num_steps=steps, **kw)


def _chunk(output) -> ActionChunk:
    chunk = ActionChunk.from_public(output.kv_transfer_params)
    assert chunk is not None, output.kv_transfer_params
    return chunk


def _normalized(ref, rows) -> torch.Tensor:
    mean, std = (torch.tensor(ref.norm._act[i]) for i in (0, 1))
    return (torch.tensor(rows, dtype=torch.float64) - mean) / (std + 1e-6)


def _check(ref, output, want) -> torch.Tensor:
    chunk = _chunk(output)
    assert chunk.error is None, chunk.error
    assert (chunk.chunk, chunk.action_dim) == (ref.spec.horizon, ref.spec.robot_action_dim)
    got = _normalized(ref, chunk.rows())
    wanted = want.normalized[:, : ref.spec.robot_action_dim].double()
    err = (got - wanted).abs().max()
    assert err < TOL, f"engine vs reference: {err}"
    return got


def test_chunk_alone_matches_reference(llm, ref, tokenizer):
    prompt, params = _request(
        tokenizer, ref, 0, "pick up the red block", STATE, **{KEY_NOISE_SEED: 7}
    )
    (out,) = llm.generate([prompt], [params], use_tqdm=False)
    want = _oracle(tokenizer, ref, 0, "pick up the red block", STATE, 7)
    got = _check(ref, out, want)
    assert len(out.outputs[0].token_ids) == 1  # one forward, no decode steps
    # Sensitivity: another noise seed gives a visibly other chunk.
    other = _oracle(tokenizer, ref, 0, "pick up the red block", STATE, 8)
    assert (got - other.normalized[:, :7].double()).abs().max() > 100 * TOL


def test_mixed_batch_each_gets_its_own_chunk(llm, ref, tokenizer):
    cases = [
        (1, "pick up the red block", STATE, 1, (True, True, True), None),
        (2, "open the drawer", [0.0] * 8, 2, (True, False, True), None),  # masked wrist camera
        (3, "put the bowl on the plate", [x * -2 for x in STATE], 3, (True, True, False), 4),
        (1, "pick up the red block", STATE, 1, (True, True, True), 3),  # same, 3 steps
        (1, "pick up the red block", [0.0] * 8, 1, (True, True, True), None),  # other state
    ]
    reqs = []
    for seed, text, state, noise, mask, steps in cases:
        extra = {KEY_NOISE_SEED: noise, **({KEY_NUM_STEPS: steps} if steps else {})}
        reqs.append(_request(tokenizer, ref, seed, text, state, mask, **extra))
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    got = []
    for out, (seed, text, state, noise, mask, steps) in zip(outs, cases):
        want = _oracle(tokenizer, ref, seed, text, state, noise, mask, steps)
        got.append(_check(ref, out, want))
    assert (got[0] - got[3]).abs().max() > 1e-3  # the step count reached the expert
    assert (got[0] - got[4]).abs().max() > 1e-3  # the state reached the expert


def test_same_seed_same_chunk(llm, ref, tokenizer):
    reqs = [
        _request(tokenizer, ref, 5, "open the drawer", STATE, **{KEY_NOISE_SEED: 11})
        for _ in range(2)
    ]
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    assert _chunk(outs[0]).values == _chunk(outs[1]).values


def test_bad_state_fails_only_its_request(llm, ref, tokenizer):
    good = _request(tokenizer, ref, 4, "pick up the red block", STATE, **{KEY_NOISE_SEED: 4})
    short = _request(tokenizer, ref, 5, "pick up the red block", STATE[:3])
    missing = _request(tokenizer, ref, 6, "pick up the red block", None)
    outs = llm.generate(
        [good[0], short[0], missing[0]], [good[1], short[1], missing[1]], use_tqdm=False
    )
    _check(ref, outs[0], _oracle(tokenizer, ref, 4, "pick up the red block", STATE, 4))
    for out in outs[1:]:
        chunk = _chunk(out)
        assert chunk.values == () and "state must be 8 numbers" in chunk.error


def test_non_square_cameras_are_padded_as_openpi(llm, ref, tokenizer):
    """Cameras of other shapes than the tower's square: the engine's chunk is the oracle's on
    openpi-client's ``resize_with_pad`` of each camera (aspect kept, black bands), not on a
    stretched frame (which gives a visibly other chunk)."""
    from openpi_client.image_tools import resize_with_pad as openpi_resize
    from vllm import SamplingParams

    side = ref.image_size
    rng = np.random.default_rng(21)
    shapes = [(48, 80), (80, 48), (30, 30)]
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    ids = pi0_prompt_token_ids(tokenizer, "open the drawer", ref.spec.max_token_len)
    prompt = {
        "prompt_token_ids": ids,
        "multi_modal_data": {"image": [Image.fromarray(i) for i in images]},
    }
    params = SamplingParams(
        max_tokens=1, temperature=0.0, extra_args={KEY_STATE: STATE, KEY_NOISE_SEED: 9}
    )
    (out,) = llm.generate([prompt], [params], use_tqdm=False)
    noise = pi0_noise(9, ref.spec.horizon, ref.spec.action_dim)

    def oracle(frames: list[np.ndarray]) -> object:
        inputs = ref.build_inputs([siglip_pixels(f) for f in frames], [True] * 3, ids, STATE)
        return ref.sample(inputs, noise)

    got = _check(ref, out, oracle([openpi_resize(i, side, side) for i in images]))
    stretched = [np.asarray(Image.fromarray(i).resize((side, side), Image.BICUBIC)) for i in images]
    other = oracle(stretched).normalized[:, : ref.spec.robot_action_dim].double()
    assert (got - other).abs().max() > 100 * TOL
