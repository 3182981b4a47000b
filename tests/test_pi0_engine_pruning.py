"""VLA-Pruner on pi0 in the real engine, against the PyTorch oracle.

One engine for the module (tiny-pi0: 3 cameras x 64 visual tokens, 6 layers, K = 2, action
layer 3). The worker's trace gives each pruned request's kept visual indices (one index space
over the present cameras); the oracle re-runs the prefix with exactly those (layers >= K see
only the kept visual rows, so every Euler step reads the smaller prefix). The selection of a
robot's fourth frame is recomputed from the oracle's own attention: semantic = the prefix's
bidirectional attention at layer K-1, action = the expert's action queries' attention to the
visual keys at the action layer, averaged over the Euler steps, smoothed over 3 frames.
Tolerance: 1e-4 absolute on the normalised chunk.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from PIL import Image

from tests.engine_fixtures import pruning_trace
from tests.pi0_fixtures import camera_images, checkpoint_fixtures, siglip_pixels
from vllm_vla_pruner.engine.plan import KEY_STATE, ActionChunk, PruningResult
from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED
from vllm_vla_pruner.pi0_spec import pi0_noise, pi0_prompt_token_ids
from vllm_vla_pruner.pruning import PRUNERS

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"
ALL = (True, True, True)


model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi0", seed=4)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("pi0_trace") / "pruning.jsonl"
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    with pruning_trace(trace):
        llm = make_llm(model_dir, max_num_seqs=8, pruning={"window": 3, "gamma": 0.8, "layer": K})
    yield llm, trace
    shutdown_llm(llm)


def _request(tokenizer, ref, seed, xargs=None, session=None, mask=ALL):
    from vllm import SamplingParams

    ids = pi0_prompt_token_ids(tokenizer, INS, ref.spec.max_token_len)
    args = {KEY_STATE: STATE, KEY_NOISE_SEED: seed, **(xargs or {})}
    if session:
        args["vla_session_id"] = session
    images = [Image.fromarray(im) for im, m in zip(camera_images(seed), mask) if m]
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
    return prompt, SamplingParams(max_tokens=1, temperature=0.0, extra_args=args)


def _inputs(tokenizer, ref, seed, mask=ALL):
    ids = pi0_prompt_token_ids(tokenizer, INS, ref.spec.max_token_len)
    images = [siglip_pixels(im) if m else None for im, m in zip(camera_images(seed), mask)]
    return ref.build_inputs(images, list(mask), ids, STATE)


def _run(engine, reqs):
    llm, trace = engine
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    rows = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    kept = []
    for out in outs:
        recs = [r for r in rows if r["req_id"].startswith(out.request_id + "-")]
        recs += [r for r in rows if r["req_id"] == out.request_id]
        kept.append(recs[-1]["kept"] if recs else None)
    return outs, kept


def _normalized(ref, rows) -> torch.Tensor:
    mean, std = ref.norm._act
    return (torch.tensor(rows, dtype=torch.float64) - mean) / (std + 1e-6)


def _check(tokenizer, ref, out, seed, kept, mask=ALL, **kw):
    chunk = ActionChunk.from_public(out.kv_transfer_params)
    assert chunk is not None and chunk.error is None, out.kv_transfer_params
    got = _normalized(ref, chunk.rows())
    noise = pi0_noise(seed, ref.spec.horizon, ref.spec.action_dim)
    keep = None if kept is None else torch.tensor(kept)
    want = ref.sample(
        _inputs(tokenizer, ref, seed, mask), noise, keep_visual=keep, prune_layer=K, **kw
    )
    err = (got - want.normalized[:, : ref.spec.robot_action_dim].double()).abs().max()
    assert err < TOL, f"engine vs reference: {err}"
    return got, want


def _result(out) -> PruningResult:
    result = PruningResult.from_public(out.kv_transfer_params)
    assert result is not None, out.kv_transfer_params
    return result


@pytest.mark.parametrize("method", sorted(set(PRUNERS) - {"none"}))
def test_pruned_chunk_matches_reference_with_same_kept(engine, ref, tokenizer, method):
    xargs = {"vla_pruner": method, "vla_keep_ratio": 0.25}
    outs, (kept,) = _run(engine, [_request(tokenizer, ref, 10, xargs)])
    result = _result(outs[0])
    m = 3 * ref.tokens_per_camera
    assert result.outcome.pruned and result.outcome.visual_tokens_total == m
    assert result.outcome.visual_tokens_kept == len(kept) == m // 4
    _check(tokenizer, ref, outs[0], 10, kept)


def test_pruning_changes_the_chunk(ref, tokenizer):
    inputs = _inputs(tokenizer, ref, 10)
    noise = pi0_noise(10, ref.spec.horizon, ref.spec.action_dim)
    full = ref.sample(inputs, noise).normalized
    some = ref.sample(inputs, noise, keep_visual=torch.arange(0, 192, 4), prune_layer=K)
    assert (full - some.normalized).abs().max() > 100 * TOL


def test_keep_one_equals_unpruned(engine, ref, tokenizer):
    xargs = {"vla_pruner": "fastv", "vla_keep_ratio": 1.0}
    outs, _ = _run(engine, [_request(tokenizer, ref, 11, xargs)])
    assert not _result(outs[0]).outcome.pruned
    _check(tokenizer, ref, outs[0], 11, None)


def test_mixed_batch_each_as_alone(engine, ref, tokenizer):
    cases = [
        (12, {"vla_pruner": "fastv", "vla_keep_ratio": 0.5}, (True, False, True)),
        (13, None, ALL),
        (14, {"vla_pruner": "divprune", "vla_keep_ratio": 0.125}, ALL),
        (15, {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}, (True, True, False)),
    ]
    outs, kept = _run(engine, [_request(tokenizer, ref, s, x, mask=m) for s, x, m in cases])
    for (seed, xargs, mask), out, k in zip(cases, outs, kept):
        _check(tokenizer, ref, out, seed, k if xargs else None, mask)
    assert [len(k) for k in (kept[0], kept[2], kept[3])] == [64, 24, 32]


def test_history_from_expert_attention_drives_fourth_chunk(engine, ref, tokenizer):
    """Three warm-up frames fill the robot's history with the expert's action queries'
    attention to the visual keys (mean over Euler steps, action layer); the fourth frame is
    pruned with it; its kept set equals the oracle's own selection from the same signals."""
    from vllm_vla_pruner.pruning import ActionHistory, PruneInputs, select_tokens

    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}
    layer = len(ref.lm.layers) // 2
    history = ActionHistory(window=3, gamma=0.8)
    m = 3 * ref.tokens_per_camera
    for frame in range(4):
        seed = 40 + frame
        outs, (kept,) = _run(engine, [_request(tokenizer, ref, seed, xargs, session)])
        result = _result(outs[0])
        if frame < 3:
            assert result.warmup and not result.outcome.pruned
            _, want = _check(tokenizer, ref, outs[0], seed, None, return_attn_layers=[layer])
            history.push(session, ref.action_scores(want, layer, m))
            continue
        assert result.outcome.pruned and result.outcome.used_history
        _check(tokenizer, ref, outs[0], seed, kept)
        inputs = _inputs(tokenizer, ref, seed)
        attn = {K - 1: None}
        _, _, plen = ref.prefix_pass(inputs, None, K, attn)
        # The engine's rows are [BOS, visual, text]; the oracle's [visual, BOS, text].
        perm = torch.cat([torch.tensor([m]), torch.arange(m), torch.arange(m + 1, plen)])
        sem = attn[K - 1][perm][:, perm]
        visual = inputs.embeds[inputs.valid][:m]
        pin = dict(
            attn=sem,
            visual_start=1,
            num_visual=m,
            embeddings=visual.detach().float(),
            grid_shape=(24, 8),
            text_start=1 + m,
        )
        expected = select_tokens(
            PruneInputs(**pin, action_estimate=history.estimate(session)), "vlapruner", m // 4
        ).tolist()
        without = select_tokens(PruneInputs(**pin), "vlapruner", m // 4).tolist()
        assert set(expected) != set(without)  # the action signal changed the choice
        overlap = len(set(expected) & set(kept)) / (m // 4)
        assert overlap >= 0.9, (expected, kept)


def test_pruned_pi0_request_allocates_kv_for_kept_rows_only(engine, ref, tokenizer):
    """Layers >= K hold KV for the kept visual tokens of the three cameras only (block 32)."""
    import math

    from vllm_vla_pruner.engine.local import decoder_report, kv_layout

    llm, _ = engine
    specs = [g["spec"] for g in kv_layout(llm)]  # K = 2 of 6 layers: groups of 2 layers
    assert specs == ["FullAttentionSpec"] + ["PrunedAttentionSpec"] * (len(specs) - 1)
    xargs = {"vla_pruner": "fastv", "vla_keep_ratio": 0.125}
    outs, _ = _run(engine, [_request(tokenizer, ref, 23), _request(tokenizer, ref, 23, xargs)])
    log = dict(decoder_report(llm)["kv_blocks"])
    blocks = [next(v for k, v in log.items() if k.startswith(o.request_id)) for o in outs]
    rows = len(pi0_prompt_token_ids(tokenizer, INS, 48)) + 3 * ref.tokens_per_camera
    assert blocks[0] == [math.ceil(rows / 32)] * len(specs)
    pruned = math.ceil((rows - 168) / 32)  # 24 of 192 visual tokens kept
    assert blocks[1][0] == blocks[0][0]
    assert blocks[1][1:] == [pruned] * (len(specs) - 1) and pruned < blocks[0][1]
