"""One request path: the closed-loop benchmark sends the engine what ``/v1/actions`` sends."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vllm_vla_pruner.api.protocol import ApiError
from vllm_vla_pruner.api.request_builder import RequestBuilder
from vllm_vla_pruner.api.service import ActionService


def _output(n_tokens: int, token: int = 1000) -> Any:
    """A finished engine output of ``n_tokens`` valid action tokens (the tiny vocabulary's)."""
    return SimpleNamespace(
        request_id="r",
        outputs=[SimpleNamespace(token_ids=[token] * n_tokens)],
        metrics=None,
        kv_transfer_params=None,
    )


class RecordingEngineClient:
    """vLLM's ``EngineClient.generate``, as ``/v1/actions`` calls it; records the request."""

    model_config = None

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], Any]] = []

    async def generate(self, prompt, params, request_id, **kw):
        self.requests.append((prompt, params))
        yield _output(params.max_tokens)


class RecordingLLM:
    """``vllm.LLM.generate``, as the closed-loop benchmark calls it; records the requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, Any], Any]] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.requests += list(zip(prompts, params))
        return [_output(p.max_tokens) for p in params]


def png_b64(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("method", "keep"), [("vlapruner", 0.25), ("none", 1.0)])
def test_benchmark_request_equals_endpoint_request(tiny_ckpt: Path, method: str, keep: float):
    from vllm_vla_pruner.research.sim.benchmark import EnginePolicy

    frame = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    instruction = "pick up the red block"

    llm = RecordingLLM()
    policy = EnginePolicy(llm, tiny_ckpt, method, keep, tag="run0")
    policy([frame], [instruction], [3], [True])
    [(bench_prompt, bench_params)] = llm.requests

    engine = RecordingEngineClient()
    service = ActionService(engine, str(tiny_ckpt), served_model_names=["tiny"])
    body = {
        "image": png_b64(frame),
        "instruction": instruction,
        "unnorm_key": policy.unnorm_key,
        "session_id": "run0/3",
        "new_episode": True,
        "pruning": {"method": method, "keep_ratio": None if method == "none" else keep},
    }
    req = service.request_context().parse(body)
    asyncio.run(service.predict(req))
    [(api_prompt, api_params)] = engine.requests

    assert bench_params == api_params  # every SamplingParams field, extra_args included
    assert api_params.min_tokens == api_params.max_tokens == policy.dim
    assert api_params.ignore_eos and api_params.detokenize is False
    assert api_params.extra_args["vla_session_id"] == "run0/3"
    assert bench_prompt["prompt_token_ids"] == api_prompt["prompt_token_ids"]
    bench_image = bench_prompt["multi_modal_data"]["image"]
    api_image = api_prompt["multi_modal_data"]["image"]
    assert bench_image.mode == api_image.mode == "RGB"
    assert np.array_equal(np.asarray(bench_image), np.asarray(api_image))


class WordTokenizer:
    bos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] + [10 + len(w) for w in text.split()]

    def convert_tokens_to_ids(self, token: str) -> int:
        return 2


def test_builder_refuses_a_prompt_that_cannot_fit():
    from vllm_vla_pruner.actions import ActionDecoder

    decoder = ActionDecoder.from_config(
        {
            "text_config": {"vocab_size": 1088},
            "pad_to_multiple_of": 64,
            "norm_stats": {"arm": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}},
        }
    )
    builder = RequestBuilder(decoder, WordTokenizer(), num_visual=16, max_model_len=40)
    frame = np.zeros((8, 8, 3), np.uint8)
    ok = builder.build("go", frame, 7)
    assert len(ok.prompt["prompt_token_ids"]) + 16 + 7 <= 40
    with pytest.raises(ApiError) as ei:
        builder.build("go " * 30, frame, 7)
    assert ei.value.status == 422 and ei.value.field == "instruction"


# ----------------------------------------------------------------------------- OFT chunk path


class ChunkRecordingLLM:
    """``vllm.LLM.generate`` for the OFT closed loop: records requests, answers a chunk."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows
        self.requests: list[tuple[dict[str, Any], Any]] = []

    def generate(self, prompts, params, use_tqdm=False):
        from vllm_vla_pruner.engine.plan import ACTIONS_KEY

        self.requests += list(zip(prompts, params))
        chunk = {"chunk": len(self.rows), "action_dim": len(self.rows[0]), "actions": self.rows}
        return [
            SimpleNamespace(
                request_id=str(i),
                outputs=[SimpleNamespace(token_ids=[0], finish_reason="length")],
                kv_transfer_params={ACTIONS_KEY: chunk},
            )
            for i in range(len(prompts))
        ]


@pytest.fixture(scope="module")
def tiny_oft_ckpt(tmp_path_factory) -> Path:
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_rb"), seed=5)


@pytest.mark.parametrize(("method", "keep"), [("vlapruner", 0.25), ("none", 1.0)])
def test_oft_benchmark_request_equals_endpoint_request(
    tiny_oft_ckpt: Path, method: str, keep: float
):
    """The OFT closed loop (``chunk_benchmark``) sends what ``/v1/actions`` sends for the same
    views, state and instruction; ``execute_steps`` trims the answer, not the request."""
    from tests.test_oft_api_units import RecordingEngine
    from vllm_vla_pruner.research.sim.chunk_benchmark import ChunkEnginePolicy

    rng = np.random.default_rng(1)
    views = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    state = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
    instruction = "open the drawer"

    rows = [[float(i * 7 + j) for j in range(7)] for i in range(3)]
    llm = ChunkRecordingLLM(rows)
    policy = ChunkEnginePolicy(llm, tiny_oft_ckpt, method, keep, tag="oft0", execute_steps=2)
    chunks, _ = policy.infer([policy.request(views, state, instruction, 3, True)])
    [(bench_prompt, bench_params)] = llm.requests
    assert chunks[0].shape == (3, 7)

    engine = RecordingEngine(rows)
    service = ActionService(engine, str(tiny_oft_ckpt), served_model_names=["tiny-oft"])
    cams = service.request_context().cameras
    body = {
        "images": {cam: png_b64(v) for cam, v in zip(cams, views)},
        "state": state,
        "instruction": instruction,
        "session_id": "oft0/3",
        "new_episode": True,
        "pruning": {"method": method, "keep_ratio": None if method == "none" else keep},
        "execute_steps": 2,
    }
    req = service.request_context().parse(body)
    resp = asyncio.run(service.predict(req))
    [call] = engine.calls
    api_prompt, api_params = call["prompt"], call["params"]

    assert bench_params == api_params  # every SamplingParams field, extra_args (state) included
    assert api_params.max_tokens == 1 and api_params.extra_args["vla_session_id"] == "oft0/3"
    assert bench_prompt["prompt_token_ids"] == api_prompt["prompt_token_ids"]
    bench_views = bench_prompt["multi_modal_data"]["image"]
    api_views = api_prompt["multi_modal_data"]["image"]
    assert len(bench_views) == len(api_views) == 2
    for b, a in zip(bench_views, api_views):
        assert b.mode == a.mode == "RGB" and np.array_equal(np.asarray(b), np.asarray(a))
    # Both answer the chunk's first execute_steps rows.
    assert resp.actions == rows[:2] and resp.chunk == 3
    assert policy.execute_steps == 2
