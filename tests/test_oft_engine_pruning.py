"""VLA-Pruner on OpenVLA-OFT in the real engine, against the PyTorch oracle.

One engine for the module (tiny-oft: 2 views x 64 visual tokens, 3 x 7 placeholders, K = 2).
The worker's trace gives each pruned request's kept visual indices (one index space over
both views); the reference re-runs the forward with exactly those, and the selection itself
is recomputed from the reference's own attention (semantic at layer K-1 over the prompt rows,
action signal = the placeholder rows' attention at the action layer of earlier frames).
Tolerance: 1e-4 absolute on the head's normalised scale.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from tests.engine_fixtures import pruning_trace
from vllm_vla_pruner.engine.plan import KEY_STATE, ActionChunk, PruningResult
from vllm_vla_pruner.pruning import PRUNERS
from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.research.reference_oft import ReferenceOFT

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory):
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_pruned"), seed=7)


@pytest.fixture(scope="module")
def ref(oft_dir):
    return ReferenceOFT.from_pretrained(oft_dir)


@pytest.fixture(scope="module")
def engine(oft_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("oft_trace") / "pruning.jsonl"
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    with pruning_trace(trace):
        llm = make_llm(oft_dir, max_num_seqs=8, pruning={"window": 3, "gamma": 0.8, "layer": K})
    yield llm, trace
    shutdown_llm(llm)


def _images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def _request(ref, seed, xargs=None, session=None, instruction=INS):
    from vllm import SamplingParams

    from vllm_vla_pruner.oft import oft_prompt_token_ids

    ids = ref.base.prompt_token_ids(instruction)
    args = {KEY_STATE: STATE, **(xargs or {})}
    if session:
        args["vla_session_id"] = session
    prompt = {
        "prompt_token_ids": oft_prompt_token_ids(ids, ref.spec),
        "multi_modal_data": {"image": _images(seed)},
    }
    return prompt, SamplingParams(max_tokens=1, temperature=0.0, extra_args=args)


def _run(engine, reqs):
    import json

    llm, trace = engine
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    rows = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    kept = []
    for out in outs:
        recs = [r for r in rows if r["req_id"].startswith(out.request_id + "-")]
        recs += [r for r in rows if r["req_id"] == out.request_id]
        kept.append(recs[-1]["kept"] if recs else None)
    return outs, kept


def _normalized(ref, actions: torch.Tensor) -> torch.Tensor:
    stats = ref.stats[ref.spec.unnorm_key]["action"]
    lo, hi = (torch.tensor(stats[k], dtype=torch.float64) for k in ref.spec.bound_keys)
    return torch.where(
        torch.tensor(stats["mask"]), 2 * (actions - lo) / (hi - lo + 1e-8) - 1, actions
    )


def _check(ref, out, seed, kept, instruction=INS):
    chunk = ActionChunk.from_public(out.kv_transfer_params)
    assert chunk is not None and chunk.error is None, out.kv_transfer_params
    got = torch.tensor(chunk.rows(), dtype=torch.float64)
    inputs = ref.build_inputs(_images(seed), instruction, STATE)
    want = ref.forward_inputs(
        inputs, keep_visual=None if kept is None else torch.tensor(kept), prune_layer=K
    )
    err = (_normalized(ref, got) - want.normalized.double()).abs().max()
    assert err < TOL, f"engine vs reference: {err}"
    return got


def _result(out) -> PruningResult:
    result = PruningResult.from_public(out.kv_transfer_params)
    assert result is not None, out.kv_transfer_params
    return result


@pytest.mark.parametrize("method", sorted(set(PRUNERS) - {"none"}))
def test_pruned_chunk_matches_reference_with_same_kept(engine, ref, method):
    outs, (kept,) = _run(
        engine, [_request(ref, 10, {"vla_pruner": method, "vla_keep_ratio": 0.25})]
    )
    result = _result(outs[0])
    m = 2 * ref.base.num_visual
    assert result.outcome.pruned and result.outcome.visual_tokens_total == m
    assert result.outcome.visual_tokens_kept == len(kept) == m // 4  # one budget, both views
    pruned = _check(ref, outs[0], 10, kept)
    unpruned = ref.predict_chunk(_images(10), INS, STATE).actions
    assert (pruned - unpruned).abs().max() > 1e-6  # pruning changed the chunk


def test_keep_one_equals_unpruned(engine, ref):
    outs, _ = _run(engine, [_request(ref, 11, {"vla_pruner": "fastv", "vla_keep_ratio": 1.0})])
    assert not _result(outs[0]).outcome.pruned
    _check(ref, outs[0], 11, None)


def test_mixed_batch_each_as_alone(engine, ref):
    cases = [
        (12, {"vla_pruner": "fastv", "vla_keep_ratio": 0.5}),
        (13, None),
        (14, {"vla_pruner": "divprune", "vla_keep_ratio": 0.125}),
        (15, {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}),
    ]
    outs, kept = _run(engine, [_request(ref, s, x) for s, x in cases])
    for (seed, xargs), out, k in zip(cases, outs, kept):
        _check(ref, out, seed, k if xargs else None)
    assert [len(k) for k in (kept[0], kept[2], kept[3])] == [64, 16, 32]


def test_history_from_placeholder_attention_drives_fourth_chunk(engine, ref):
    """Three warm-up frames fill the robot's history with the placeholder rows' attention at
    the action layer; the fourth frame is pruned with it, and its kept set equals the one
    the reference computes from its own attention, smoothed by the pure ActionHistory."""
    from vllm_vla_pruner.pruning import ActionHistory, PruneInputs, action_scores, select_tokens

    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}
    action_layer = ref.base.text_config.num_hidden_layers // 2
    history = ActionHistory(window=3, gamma=0.8)
    m = 2 * ref.base.num_visual
    for frame in range(4):
        seed = 40 + frame
        outs, (kept,) = _run(engine, [_request(ref, seed, xargs, session)])
        result = _result(outs[0])
        inputs = ref.build_inputs(_images(seed), INS, STATE)
        a0, n_ph = inputs.action_start, inputs.num_placeholders
        if frame < 3:
            assert result.warmup and not result.outcome.pruned
            _check(ref, outs[0], seed, None)
            full = ref.forward_inputs(inputs, return_attn_layers=[action_layer])
            rows = full.attn[action_layer][a0 : a0 + n_ph]  # the placeholders, not the stop row
            cols = torch.arange(1, 1 + m)
            history.push(session, action_scores(rows, cols, torch.arange(m), m))
            continue
        assert result.outcome.pruned and result.outcome.used_history
        _check(ref, outs[0], seed, kept)
        sem = ref.forward_inputs(inputs, return_attn_layers=[K - 1]).attn[K - 1][:a0, :a0]
        pin = dict(
            attn=sem,
            visual_start=1,
            num_visual=m,
            embeddings=inputs.inputs_embeds[1 : 1 + m].detach().float(),
            grid_shape=(16, 8),
            text_start=1 + m,
        )
        expected = select_tokens(
            PruneInputs(**pin, action_estimate=history.estimate(session)), "vlapruner", m // 4
        ).tolist()
        without = select_tokens(PruneInputs(**pin), "vlapruner", m // 4).tolist()
        assert set(expected) != set(without)  # the action signal changed the choice
        overlap = len(set(expected) & set(kept)) / (m // 4)
        assert overlap >= 0.9, (expected, kept)


def test_requests_joining_while_others_decode(engine, ref):
    """Steps that mix a newcomer's prefill (action block) with another request's decode rows
    (an OFT request may ask for more tokens; its decode steps carry no block)."""
    import json

    llm, trace = engine
    core = llm.llm_engine
    specs = [
        (20, {"vla_pruner": "fastv", "vla_keep_ratio": 0.25}, 4),
        (21, None, 1),
        (22, {"vla_pruner": "divprune", "vla_keep_ratio": 0.5}, 3),
    ]
    ids = [f"oft-stagger-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(specs))]
    finished = {}
    for rid, (seed, xargs, max_tokens) in zip(ids, specs):
        prompt, params = _request(ref, seed, xargs)
        params.max_tokens = max_tokens
        core.add_request(rid, prompt, params)
        for o in core.step():
            if o.finished:
                finished[o.request_id] = o
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                finished[o.request_id] = o
    rows = [json.loads(x) for x in trace.read_text().splitlines()]
    for rid, (seed, xargs, _) in zip(ids, specs):
        recs = [r for r in rows if r["req_id"] == rid or r["req_id"].startswith(rid + "-")]
        _check(ref, finished[rid], seed, recs[-1]["kept"] if xargs else None)


def test_pruned_oft_request_allocates_kv_for_kept_rows_only(engine, ref):
    """Layers >= K hold KV for the kept visual tokens of both views only (block size 32)."""
    import math

    from vllm_vla_pruner.engine.local import decoder_report, kv_layout
    from vllm_vla_pruner.oft import oft_prompt_token_ids

    llm, _ = engine
    specs = [g["spec"] for g in kv_layout(llm)]  # K = 2 of 6 layers: groups of 2 layers
    assert (
        specs == ["FullAttentionSpec"] + ["PrunedAttentionSpec"] * (len(specs) - 1)
        and len(specs) > 1
    )
    outs, _ = _run(
        engine,
        [_request(ref, 23), _request(ref, 23, {"vla_pruner": "fastv", "vla_keep_ratio": 0.125})],
    )
    log = dict(decoder_report(llm)["kv_blocks"])
    blocks = [next(v for k, v in log.items() if k.startswith(o.request_id)) for o in outs]
    ids = ref.base.prompt_token_ids(INS)
    rows = len(oft_prompt_token_ids(ids, ref.spec)) + 2 * ref.base.num_visual
    assert blocks[0] == [math.ceil(rows / 32)] * len(specs)
    assert blocks[1][0] == blocks[0][0]
    pruned = math.ceil((rows - 112) / 32)  # 16 of 128 visual tokens kept
    assert blocks[1][1:] == [pruned] * (len(specs) - 1) and pruned < blocks[0][1]
