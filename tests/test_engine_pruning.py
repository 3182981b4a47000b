"""In-engine pruning against the plain-PyTorch reference (the correctness oracle of issue 4).

Every test drives the real vLLM engine (CPU backend) with the plugin on the tiny checkpoint,
and replays the engine's pruning decisions through ``ReferenceOpenVLA`` (transformers'
Llama and vision towers, not vLLM): same kept indices -> same greedy action tokens, and the
chosen tokens' log-probabilities agree within ``LOGPROB_TOL``.
"""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from tests.engine_fixtures import EngineHandle
from vllm_vla_pruner.engine.plan import PruningResult
from vllm_vla_pruner.pruning import PruneInputs, select_tokens

pytestmark = pytest.mark.engine

LOGPROB_TOL = 2e-3  # float32 engine vs float32 reference, different kernels
INSTRUCTIONS = ["pick up the red block", "open the top drawer", "push the button"]


def _image(seed: int, side: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from vllm_vla_pruner.research.reference import ReferenceOpenVLA

    return ReferenceOpenVLA.from_pretrained(tiny_ckpt)


def _request(ref, image, instruction, xargs=None, session=None, max_tokens=7):
    from vllm import SamplingParams

    ids = ref.prompt_token_ids(instruction)
    args = dict(xargs or {})
    if session is not None:
        args["vla_session_id"] = session
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, logprobs=0, extra_args=args or None
    )
    return prompt, params


def _result(output) -> PruningResult:
    """What the engine reports it did (the worker's outcome beside the scheduler's plan)."""
    result = PruningResult.from_public(output.kv_transfer_params)
    assert result is not None, output.kv_transfer_params
    return result


def _chosen_logprobs(output) -> list[float]:
    comp = output.outputs[0]
    return [lp[tok].logprob for tok, lp in zip(comp.token_ids, comp.logprobs)]


def _kept_of(engine: EngineHandle, output) -> list[int] | None:
    for req_id, rec in engine.trace().items():
        if req_id.startswith(output.request_id + "-") or req_id == output.request_id:
            return rec["kept"]
    return None


def _assert_matches_reference(ref, image, instruction, output, kept) -> None:
    out_ref = ref.generate(
        image,
        instruction,
        max_new_tokens=len(output.outputs[0].token_ids),
        keep_visual=None if kept is None else torch.tensor(kept),
    )
    assert list(output.outputs[0].token_ids) == out_ref.token_ids
    ref_lp = torch.log_softmax(out_ref.logits.float(), -1)
    for step, (tok, lp) in enumerate(zip(out_ref.token_ids, _chosen_logprobs(output))):
        assert math.isclose(lp, float(ref_lp[step, tok]), abs_tol=LOGPROB_TOL), (step, lp)


def test_unpruned_matches_reference(tiny_engine, reference):
    cases = [(_image(s), INSTRUCTIONS[s % 3]) for s in range(3)]
    outs = tiny_engine.generate(*zip(*[_request(reference, im, ins) for im, ins in cases]))
    for (im, ins), out in zip(cases, outs):
        _assert_matches_reference(reference, im, ins, out, None)
    # The checkpoint is sensitive to its inputs, so the comparisons above can see errors.
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("method", ["fastv", "vlapruner", "divprune", "sparsevlm", "random"])
def test_pruned_matches_reference(tiny_engine, reference, method, keep):
    image, ins = _image(7), INSTRUCTIONS[1]
    [out] = tiny_engine.generate(
        *[
            [x]
            for x in _request(reference, image, ins, {"vla_pruner": method, "vla_keep_ratio": keep})
        ]
    )
    kept = _kept_of(tiny_engine, out)
    assert kept is not None and len(kept) == round(64 * keep)
    assert _result(out).outcome.visual_tokens_kept == len(kept)
    _assert_matches_reference(reference, image, ins, out, kept)
    # Pruning really changed the computation (else the comparison above proves little).
    unpruned = reference.generate(image, ins, max_new_tokens=7)
    lp = torch.log_softmax(unpruned.logits.float(), -1)
    unpruned_lp = [float(lp[i, t]) for i, t in enumerate(out.outputs[0].token_ids)]
    assert max(abs(a - b) for a, b in zip(unpruned_lp, _chosen_logprobs(out))) > 1e-3


def test_engine_selection_matches_reference_scores(tiny_engine, reference):
    """The engine's own scores (layer K-1 q/k) pick what the reference's attention picks."""
    image, ins = _image(11), INSTRUCTIONS[2]
    for method in ("fastv", "vlapruner"):
        [out] = tiny_engine.generate(
            *[
                [x]
                for x in _request(
                    reference, image, ins, {"vla_pruner": method, "vla_keep_ratio": 0.25}
                )
            ]
        )
        ref_out = reference.generate(image, ins, max_new_tokens=1, return_attn_layers=[2])
        inputs = reference.build_inputs(image, ins)
        pin = PruneInputs(
            attn=ref_out.attn[2].prefill,
            visual_start=inputs.visual_start,
            num_visual=inputs.num_visual,
            embeddings=inputs.inputs_embeds[1:65].float(),
            grid_shape=(8, 8),
            text_start=65,
        )
        expected = select_tokens(pin, method, 16).tolist()
        got = _kept_of(tiny_engine, out)
        overlap = len(set(expected) & set(got)) / 16
        assert overlap >= 0.9, (method, expected, got)  # near-ties may flip a token or so


def test_keep_one_and_none_are_unpruned(tiny_engine, reference):
    image, ins = _image(3), INSTRUCTIONS[0]
    reqs = [
        _request(reference, image, ins),
        _request(reference, image, ins, {"vla_pruner": "none"}),
        _request(reference, image, ins, {"vla_pruner": "fastv", "vla_keep_ratio": 1.0}),
    ]
    outs = tiny_engine.generate(*zip(*reqs))
    base = outs[0].outputs[0].token_ids
    for o in outs[1:]:
        assert o.outputs[0].token_ids == base
        assert _chosen_logprobs(o) == pytest.approx(_chosen_logprobs(outs[0]), abs=1e-5)
        assert _result(o).outcome.pruned is False


def test_mixed_batch_equals_alone(tiny_engine, reference):
    """One engine step mixing pruners, keep ratios and unpruned requests of several robots."""
    specs = [
        (None, 0),
        ({"vla_pruner": "fastv", "vla_keep_ratio": 0.25}, 1),
        ({"vla_pruner": "divprune", "vla_keep_ratio": 0.5}, 2),
        ({"vla_pruner": "vlapruner", "vla_keep_ratio": 0.125}, 3),
        (None, 4),
        ({"vla_pruner": "random", "vla_keep_ratio": 0.25}, 5),
    ]
    reqs = [_request(reference, _image(20 + s), INSTRUCTIONS[s % 3], x) for x, s in specs]
    together = tiny_engine.generate(*zip(*reqs))
    for req, out in zip(reqs, together):
        [alone] = tiny_engine.generate([req[0]], [req[1]])
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert _chosen_logprobs(out) == pytest.approx(_chosen_logprobs(alone), abs=1e-4)
        assert _kept_of(tiny_engine, out) == _kept_of(tiny_engine, alone)


def test_staggered_arrivals_mix_prefill_and_decode(tiny_engine, reference):
    """Requests joining while others decode: steps hold prefills and decodes together."""
    engine = tiny_engine.llm.llm_engine
    specs = [
        ({"vla_pruner": "fastv", "vla_keep_ratio": 0.25}, 30),
        (None, 31),
        ({"vla_pruner": "divprune", "vla_keep_ratio": 0.125}, 32),
    ]
    reqs = [_request(reference, _image(s), INSTRUCTIONS[s % 3], x) for x, s in specs]
    ids = [f"stagger-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(reqs))]
    finished = {}
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(ids[i], prompt, params)
        for _ in range(2):  # the earlier requests decode while the next one is prefilled
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    for rid, (prompt, params) in zip(ids, reqs):
        [alone] = tiny_engine.generate([prompt], [params])
        assert finished[rid].outputs[0].token_ids == alone.outputs[0].token_ids


def test_temporal_history_warmup_and_new_episode(tiny_engine, reference):
    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}
    plans = []
    for frame in range(5):
        [out] = tiny_engine.generate(
            *[
                [x]
                for x in _request(
                    reference, _image(40 + frame), INSTRUCTIONS[0], xargs, session=session
                )
            ]
        )
        plans.append(_result(out))
        if frame == 3:
            rec = [r for r in tiny_engine.trace().values() if r["session"] == session]
            assert rec and rec[-1]["had_history"], "4th frame must use the smoothed action scores"
            _assert_matches_reference(reference, _image(43), INSTRUCTIONS[0], out, rec[-1]["kept"])
    assert [p.warmup for p in plans] == [True, True, True, False, False]
    assert [p.outcome.visual_tokens_kept for p in plans] == [64, 64, 64, 16, 16]
    assert [p.outcome.used_history for p in plans] == [False, False, False, True, True]
    [out] = tiny_engine.generate(
        *[
            [x]
            for x in _request(
                reference,
                _image(50),
                INSTRUCTIONS[0],
                {**xargs, "vla_new_episode": True},
                session=session,
            )
        ]
    )
    assert _result(out).warmup is True


def test_random_draws_per_robot_frame_and_replays(tiny_engine, reference):
    """``random`` is a sanity floor only if it is random: a robot gets a new subset every
    frame (not one fixed mask), a new episode replays the same draws, and a pruned frame's
    actions equal the reference run on its kept tokens."""
    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "random", "vla_keep_ratio": 0.25}
    image, ins = _image(60), INSTRUCTIONS[2]

    def frame(extra=None):
        [out] = tiny_engine.generate(
            *[[x] for x in _request(reference, image, ins, {**xargs, **(extra or {})}, session)]
        )
        return out, _kept_of(tiny_engine, out)

    draws = [frame() for _ in range(3)]
    kept = [k for _, k in draws]
    assert all(k is not None and len(k) == 16 for k in kept)
    assert len({tuple(k) for k in kept}) == 3
    _assert_matches_reference(reference, image, ins, draws[1][0], kept[1])
    _, replay = frame({"vla_new_episode": True})
    assert replay == kept[0]


def test_action_history_matches_reference_decode_attention(tiny_engine, reference):
    """The temporal signal end to end: three warm-up frames feed the robot's history with
    their action-decode attention (engine: captured at the action layer); the fourth frame's
    selection equals the one computed from the reference's own decode attention, smoothed
    by the pure ActionHistory."""
    from vllm_vla_pruner.pruning import ActionHistory, action_scores

    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}
    ins = INSTRUCTIONS[1]
    action_layer = reference.config["text_config"]["num_hidden_layers"] // 2
    history = ActionHistory(window=3, gamma=0.8)
    for frame in range(4):
        image = _image(70 + frame)
        [out] = tiny_engine.generate(
            *[[x] for x in _request(reference, image, ins, xargs, session)]
        )
        inputs = reference.build_inputs(image, ins)
        m = inputs.num_visual
        if frame < 3:  # warm-up: unpruned, so the action layer saw every visual key
            ref = reference.generate(
                image, ins, max_new_tokens=7, return_attn_layers=[action_layer]
            )
            rows = ref.attn[action_layer].action_rows()
            assert rows.shape[0] == 7  # last prompt row + one row per decode step
            cols = torch.arange(inputs.visual_start, inputs.visual_start + m)
            history.push(session, action_scores(rows, cols, torch.arange(m), m))
            continue
        ref = reference.generate(image, ins, max_new_tokens=1, return_attn_layers=[2])
        pin = dict(
            attn=ref.attn[2].prefill,
            visual_start=inputs.visual_start,
            num_visual=m,
            embeddings=inputs.inputs_embeds[1 : 1 + m].detach().float(),
            grid_shape=(8, 8),
            text_start=1 + m,
        )
        expected = select_tokens(
            PruneInputs(**pin, action_estimate=history.estimate(session)), "vlapruner", 16
        ).tolist()
        without_history = select_tokens(PruneInputs(**pin), "vlapruner", 16).tolist()
        got = _kept_of(tiny_engine, out)
        # The action signal changes the choice, so agreeing below is evidence it was right.
        assert set(expected) != set(without_history)
        overlap = len(set(expected) & set(got)) / 16
        assert overlap >= 0.9, (expected, got)


def test_pruned_requests_allocate_fewer_kv_blocks(tiny_engine, reference):
    from vllm_vla_pruner.engine.local import decoder_report, kv_layout

    layout = kv_layout(tiny_engine.llm)
    assert [g["spec"] for g in layout] == ["FullAttentionSpec", "PrunedAttentionSpec"]
    image, ins = _image(60), INSTRUCTIONS[2]
    outs = tiny_engine.generate(
        *zip(
            _request(reference, image, ins),
            _request(reference, image, ins, {"vla_pruner": "fastv", "vla_keep_ratio": 0.125}),
        )
    )
    log = dict(decoder_report(tiny_engine.llm)["kv_blocks"])
    blocks = [next(v for k, v in log.items() if k.startswith(o.request_id)) for o in outs]
    prompt_len = len(reference.prompt_token_ids(ins)) + 64 + 6  # the 7th token is never fed back
    assert blocks[0] == [math.ceil(prompt_len / 32)] * 2
    assert blocks[1][0] == blocks[0][0]
    assert blocks[1][1] == math.ceil((prompt_len - 56) / 32) < blocks[0][1]
