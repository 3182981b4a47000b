"""Pruning cannot silently switch off, and preemption cannot corrupt a robot's history.

Real engine (tiny checkpoint) with a small KV pool, so concurrent long requests get preempted
and recomputed, and a worker extension that can make the runner skip the plugin's step hook
(what a model runner the hooks do not cover does).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vllm_vla_pruner.engine.plan import PruningResult

pytestmark = pytest.mark.engine

INSTRUCTION = "open the top drawer"


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def safety_engine(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    llm = make_llm(
        tiny_ckpt,
        max_num_seqs=8,
        max_model_len=160,  # 5 blocks of 32 per KV group: the smallest pool vLLM accepts is 10
        num_gpu_blocks_override=12,
        worker_extension_cls="tests.worker_ext.PruningHookSwitch",
        pruning={"window": 1, "layer": 3},
    )
    yield llm
    shutdown_llm(llm)


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from vllm_vla_pruner.research.reference import ReferenceOpenVLA

    return ReferenceOpenVLA.from_pretrained(tiny_ckpt)


def _request(ref, seed: int, xargs: dict, max_tokens: int = 7):
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": ref.prompt_token_ids(INSTRUCTION), "multi_modal_data": {
        "image": _image(seed)
    }}  # fmt: skip
    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
        extra_args=xargs,
    )  # fmt: skip
    return prompt, params


def _generate(llm, requests):
    prompts, params = zip(*requests)
    return llm.generate(list(prompts), list(params), use_tqdm=False)


def test_a_forward_without_the_hooks_fails_the_pruned_request_and_nothing_else(
    safety_engine, reference
):
    fastv = {"vla_pruner": "fastv", "vla_keep_ratio": 0.25}
    [ok] = _generate(safety_engine, [_request(reference, 1, fastv)])
    outcome = PruningResult.from_public(ok.kv_transfer_params).outcome
    assert outcome.pruned and outcome.visual_tokens_kept == 16

    safety_engine.collective_rpc("vla_test_bypass_hooks", args=(True,))
    try:
        pruned, unpruned = _generate(
            safety_engine,
            [_request(reference, 1, fastv), _request(reference, 2, {"vla_pruner": "none"})],
        )
    finally:
        safety_engine.collective_rpc("vla_test_bypass_hooks", args=(False,))
    # The request planned to be pruned is an error, never an answer claiming pruning.
    assert pruned.outputs[0].finish_reason == "error" and list(pruned.outputs[0].token_ids) == []
    # The unpruned request in the same batch is answered, exactly as the reference does.
    expected = reference.generate(_image(2), INSTRUCTION, max_new_tokens=7).token_ids
    assert unpruned.outputs[0].finish_reason == "length"
    assert list(unpruned.outputs[0].token_ids) == expected
    # With the hooks back the same request is pruned again: the engine kept serving.
    [again] = _generate(safety_engine, [_request(reference, 1, fastv)])
    assert list(again.outputs[0].token_ids) == list(ok.outputs[0].token_ids)


def _report(llm) -> dict:
    return llm.collective_rpc("vla_pruner_report")[0]["stats"]


def test_preempted_requests_are_recomputed_without_corrupting_action_history(
    safety_engine, reference
):
    """Six robots' long requests overflow the 12-block KV pool: the scheduler preempts and
    recomputes some. Every action must equal the one computed without memory pressure, and
    only complete, first-computation actions may enter the robots' histories."""
    vla = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}
    sessions = [f"preempt-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
    before = _report(safety_engine)
    runs = []
    for frame in range(2):  # frame 0 warms up (window 1), frame 1 is pruned with history
        reqs = [
            _request(reference, 100 + 10 * i + frame, {**vla, "vla_session_id": s}, 40)
            for i, s in enumerate(sessions)
        ]
        runs.append(_generate(safety_engine, reqs))
    after = _report(safety_engine)
    results = [[PruningResult.from_public(o.kv_transfer_params) for o in outs] for outs in runs]
    recomputed = [[r.outcome.recomputed for r in frame] for frame in results]
    assert after["recomputed"] > before["recomputed"], "the KV pool was meant to force preemption"
    # A recomputed request's action is not recorded; every other one is, exactly once.
    recorded = after["actions_recorded"] - before["actions_recorded"]
    assert recorded == 12 - sum(map(sum, recomputed))
    for frame, outs in enumerate(runs):
        for out, result in zip(outs, results[frame]):
            assert result.warmup is (frame == 0) and result.outcome.pruned is (frame == 1)
            assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 40
    # A robot whose warm-up frame was recomputed has no history: its next frame says so.
    missing = [r.outcome.history_missing for r in results[1]]
    assert missing == recomputed[0]
    assert [r.outcome.used_history for r in results[1]] == [not m for m in missing]

    # The same frames one robot at a time (no memory pressure): the same actions wherever the
    # batched run had the same history.
    for i, s in enumerate(sessions):
        xargs = {**vla, "vla_session_id": f"{s}-alone"}
        for frame in range(2):
            req = _request(reference, 100 + 10 * i + frame, xargs, 40)
            [alone] = _generate(safety_engine, [req])
            if frame == 1 and missing[i]:
                continue
            assert list(alone.outputs[0].token_ids) == list(runs[frame][i].outputs[0].token_ids)
