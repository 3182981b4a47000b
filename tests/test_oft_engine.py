"""OpenVLA-OFT in the real vLLM engine: one forward's chunk equals the PyTorch oracle's.

One engine for the module (tiny-oft, float32). The chunk leaves the engine on the per-request
report channel (``kv_transfer_params["vla_actions"]``) with ``max_tokens=1``.
Tolerance: 1e-4 absolute on the head's normalised scale (un-normalised dims compared after
mapping back through the bounds; the gripper dim is not un-normalised).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vllm_vla_pruner.engine.plan import KEY_STATE, ActionChunk
from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.research.reference_oft import ReferenceOFT

pytestmark = pytest.mark.engine

TOL = 1e-4
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory):
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_engine"), seed=5)


@pytest.fixture(scope="module")
def ref(oft_dir):
    return ReferenceOFT.from_pretrained(oft_dir)


@pytest.fixture(scope="module")
def llm(oft_dir):
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    # The engine defaults select the OFT architecture and allow its two views.
    engine = make_llm(oft_dir, max_num_seqs=8)
    yield engine
    shutdown_llm(engine)


def _images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def _request(ref, seed: int, instruction: str, state, **extra):
    from vllm import SamplingParams

    from vllm_vla_pruner.oft import oft_prompt_token_ids

    ids = ref.base.prompt_token_ids(instruction)
    prompt = {
        "prompt_token_ids": oft_prompt_token_ids(ids, ref.spec),
        "multi_modal_data": {"image": _images(seed)},
    }
    args = {KEY_STATE: state, **extra} if state is not None else extra
    return prompt, SamplingParams(max_tokens=1, temperature=0.0, extra_args=args)


def _normalized(ref, actions: torch.Tensor) -> torch.Tensor:
    """Back to the head's scale (where the mask un-normalised), to compare on one scale."""
    stats = ref.stats[ref.spec.unnorm_key]["action"]
    lo, hi = (torch.tensor(stats[k], dtype=torch.float64) for k in ref.spec.bound_keys)
    mask = torch.tensor(stats["mask"])
    return torch.where(mask, 2 * (actions - lo) / (hi - lo + 1e-8) - 1, actions)


def _chunk(output) -> ActionChunk:
    chunk = ActionChunk.from_public(output.kv_transfer_params)
    assert chunk is not None, output.kv_transfer_params
    return chunk


def _check(ref, output, seed, instruction, state):
    chunk = _chunk(output)
    assert chunk.error is None and (chunk.chunk, chunk.action_dim) == (3, 7)
    got = torch.tensor(chunk.rows(), dtype=torch.float64)
    want = ref.predict_chunk(_images(seed), instruction, state)
    err = (_normalized(ref, got) - want.normalized.double()).abs().max()
    assert err < TOL, f"engine vs reference: {err}"
    return got, want


def test_chunk_alone_matches_reference(llm, ref):
    prompt, params = _request(ref, 0, "pick up the red block", STATE)
    (out,) = llm.generate([prompt], [params], use_tqdm=False)
    got, _ = _check(ref, out, 0, "pick up the red block", STATE)
    assert len(out.outputs[0].token_ids) == 1  # one forward, no decode steps
    # Sensitivity: plain causal attention over the action rows gives a visibly other chunk.
    causal = ref.predict_chunk(_images(0), "pick up the red block", STATE, attention="causal")
    assert (_normalized(ref, got) - causal.normalized.double()).abs().max() > 100 * TOL


def test_mixed_batch_each_gets_its_own_chunk(llm, ref):
    cases = [
        (1, "pick up the red block", STATE),
        (2, "open the drawer", [0.0] * 8),
        (3, "put the bowl on the plate", [x * -2 for x in STATE]),
        (1, "pick up the red block", [0.0] * 8),  # same views, other state
    ]
    reqs = [_request(ref, *c) for c in cases]
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    chunks = [_check(ref, out, *c)[0] for out, c in zip(outs, cases)]
    assert (chunks[0] - chunks[3]).abs().max() > 1e-4  # the state reached the model


def test_bad_state_fails_only_its_request(llm, ref):
    good = _request(ref, 4, "pick up the red block", STATE)
    short = _request(ref, 5, "pick up the red block", STATE[:3])
    missing = _request(ref, 6, "pick up the red block", None)
    outs = llm.generate([good[0], short[0], missing[0]], [good[1], short[1], missing[1]])
    _check(ref, outs[0], 4, "pick up the red block", STATE)
    for out in outs[1:]:
        chunk = _chunk(out)
        assert chunk.values == () and "state must be 8 numbers" in chunk.error


def test_wrong_number_of_views_fails_only_its_request(llm, ref):
    good = _request(ref, 9, "pick up the red block", STATE)
    one_view = _request(ref, 10, "pick up the red block", STATE)
    one_view[0]["multi_modal_data"]["image"] = one_view[0]["multi_modal_data"]["image"][:1]
    outs = llm.generate([one_view[0], good[0]], [one_view[1], good[1]], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    _check(ref, outs[1], 9, "pick up the red block", STATE)
