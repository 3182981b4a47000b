"""OFT without hand-passed engine flags, and the ``/v1/actions`` chunk form without an engine.

The engine defaults are compared in their CLI and keyword forms on a real tiny-oft
checkpoint; the service runs against a recording stand-in for vLLM's ``EngineClient`` (the
real engine path is tests/test_oft_api_e2e.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.test_cli import vllm_parse
from vllm_vla_pruner import OFT_ARCH
from vllm_vla_pruner.api.protocol import ApiError, parse_action_request
from vllm_vla_pruner.api.service import ActionService
from vllm_vla_pruner.engine.plan import ACTIONS_KEY, KEY_STATE
from vllm_vla_pruner.research.checkpoint import build_checkpoint
from vllm_vla_pruner.server_defaults import (
    cpu_safe_engine_args,
    engine_defaults,
    oft_checkpoint_spec,
    prompt_budget,
)

STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
CAMERAS = ["primary", "wrist"]


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_units"), seed=3)


# ----------------------------------------------------------------------------- engine defaults


def test_oft_rows_in_cli_and_keyword_forms(oft_dir: Path):
    from vllm_vla_pruner.engine.local import engine_kwargs

    spec = oft_checkpoint_spec(oft_dir)
    assert spec is not None and spec.num_images == 2
    config = json.loads((oft_dir / "config.json").read_text())
    rows = engine_defaults(config, max_num_seqs=4, oft=spec)
    by_name = {r.name: r for r in rows}
    assert by_name["hf_overrides"].value == {"architectures": [OFT_ARCH]}
    assert by_name["limit_mm_per_prompt"].value == {"image": 2}
    assert by_name["max_model_len"].value >= prompt_budget(config, spec)
    ns = vllm_parse([str(oft_dir), *cpu_safe_engine_args(oft_dir, ["--max-num-seqs", "4"])])
    kwargs = engine_kwargs(oft_dir, max_num_seqs=4)
    for row in rows:
        assert getattr(ns, row.name) == kwargs[row.name] == row.value, row.name
        assert row.why


def test_ar_checkpoint_gets_no_oft_rows(tiny_ckpt: Path):
    from vllm_vla_pruner.engine.local import engine_kwargs

    assert oft_checkpoint_spec(tiny_ckpt) is None
    kwargs = engine_kwargs(tiny_ckpt)
    assert "hf_overrides" not in kwargs and kwargs["limit_mm_per_prompt"] == {"image": 1}


def test_user_override_wins_for_oft_rows(oft_dir: Path):
    user = ["--limit-mm-per-prompt", '{"image": 1}']
    ns = vllm_parse([str(oft_dir), *cpu_safe_engine_args(oft_dir, user)])
    assert ns.limit_mm_per_prompt == {"image": 1}
    assert ns.hf_overrides == {"architectures": [OFT_ARCH]}


# ----------------------------------------------------------------------------- body checks


def _png(size: tuple[int, int] = (64, 64), seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _chunk_body(**kw: Any) -> dict[str, Any]:
    body = {"images": {c: _png() for c in CAMERAS}, "state": STATE, "instruction": "pick"}
    return {**body, **kw}


def _field(body: dict[str, Any], **ctx: Any) -> str | None:
    with pytest.raises(ApiError) as ei:
        parse_action_request(body, **ctx)
    assert 400 <= ei.value.status < 500
    return ei.value.field


OFT_CTX = {"cameras": CAMERAS, "state_dim": 8}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_chunk_body(images={"primary": "AAAA"}), "images.wrist"),
        (_chunk_body(images={"primary": "A", "wrist": "A", "top": "A"}), "images.top"),
        (_chunk_body(images={}), "images"),
        (_chunk_body(images={"primary": "A", "wrist": " "}), "images"),
        (_chunk_body(state=STATE[:3]), "state"),
        (_chunk_body(state=[*STATE[:7], float("nan")]), "state"),
        (_chunk_body(state=[*STATE[:7], float("inf")]), "state"),
        (_chunk_body(state=[*STATE[:7], "0.1"]), "state"),
        (_chunk_body(state=[*STATE[:7], True]), "state"),
        (_chunk_body(state=None), "state"),
        (_chunk_body(image="AAAA"), "image"),
        ({"image": "AAAA", "instruction": "pick", "state": STATE}, "image"),
        ({"instruction": "pick", "state": STATE}, "images"),
    ],
)
def test_chunk_body_errors_name_the_field(body, field):
    assert _field(body, **OFT_CTX) == field


def test_chunk_body_accepted():
    req = parse_action_request(_chunk_body(state=[1, 2, 3, 4, 5, 6, 7, 8]), **OFT_CTX)
    assert req.state == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0] and req.image is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_chunk_body(), "images"),
        ({"image": _png(), "instruction": "pick", "state": STATE}, "state"),
        ({"instruction": "pick"}, "image"),
    ],
)
def test_chunk_request_to_ar_model_names_the_field(body, field):
    assert _field(body) == field


# ----------------------------------------------------------------------------- the service


class RecordingEngine:
    """``generate``/``abort`` like vLLM's EngineClient; answers a fixed chunk."""

    def __init__(self, rows: list[list[float]], error: str | None = None) -> None:
        self.rows = rows
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def generate(self, prompt, params, request_id, **kw):
        self.calls.append({"prompt": prompt, "params": params, **kw})
        chunk = {"chunk": len(self.rows), "action_dim": len(self.rows[0]), "actions": self.rows}
        if self.error:
            chunk = {**chunk, "actions": [], "error": self.error}
        yield SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=[0], finish_reason="length")],
            kv_transfer_params={ACTIONS_KEY: chunk},
            metrics=None,
        )

    async def abort(self, request_id):
        pass


ROWS = [[float(i * 7 + j) for j in range(7)] for i in range(3)]


def test_service_builds_the_oft_request_and_answers_the_chunk(oft_dir: Path):
    from vllm_vla_pruner.oft import oft_prompt_token_ids

    engine = RecordingEngine(ROWS)
    svc = ActionService(engine, str(oft_dir), served_model_names=["tiny-oft"])
    assert svc.request_context().cameras == tuple(CAMERAS)
    body = _chunk_body(
        images={"wrist": _png((32, 32)), "primary": _png((48, 48))},
        session_id="r1",
        pruning={"method": "vlapruner", "keep_ratio": 0.25},
    )
    req = svc.request_context().parse(body)
    resp = asyncio.run(svc.predict(req))
    assert resp.actions == ROWS and (resp.chunk, resp.action_dim) == (3, 7)
    assert resp.pruning.visual_tokens_total == 2 * svc.num_visual  # both views' tokens
    call = engine.calls[0]
    views = call["prompt"]["multi_modal_data"]["image"]
    assert [v.size for v in views] == [(48, 48), (32, 32)]  # the model's camera order
    ids = svc.builder.prompt_token_ids("pick")
    assert call["prompt"]["prompt_token_ids"] == oft_prompt_token_ids(ids, svc.oft)
    params = call["params"]
    assert params.max_tokens == 1 and params.temperature == 0.0
    assert params.extra_args[KEY_STATE] == STATE
    assert params.extra_args["vla_pruner"] == "vlapruner"
    assert params.extra_args["vla_keep_ratio"] == 0.25
    assert call["session_id"] == "r1"
    info = svc.info()
    assert info.oft is not None and info.oft.cameras == CAMERAS and not info.oft.film


def test_service_bad_view_names_the_camera(oft_dir: Path):
    svc = ActionService(RecordingEngine(ROWS), str(oft_dir))
    body = _chunk_body(images={"primary": _png(), "wrist": "bm90IGFuIGltYWdl"})
    req = svc.request_context().parse(body)
    with pytest.raises(ApiError) as ei:
        asyncio.run(svc.predict(req))
    assert ei.value.field == "images.wrist" and ei.value.message.startswith("images.wrist:")


def test_service_chunk_error_is_an_error_not_a_chunk(oft_dir: Path):
    svc = ActionService(RecordingEngine(ROWS, error="state must be 8 numbers"), str(oft_dir))
    req = svc.request_context().parse(_chunk_body())
    with pytest.raises(ApiError) as ei:
        asyncio.run(svc.predict(req))
    assert ei.value.status == 500 and "state must be 8 numbers" in ei.value.message


def test_single_frame_to_oft_service_is_refused(oft_dir: Path):
    svc = ActionService(RecordingEngine(ROWS), str(oft_dir))
    with pytest.raises(ApiError) as ei:
        asyncio.run(svc.predict_image(Image.new("RGB", (8, 8)), "pick"))
    assert ei.value.field == "image" and ei.value.status == 422


# ----------------------------------------------------------------------------- openpi


def _libero_obs(state: list[float]) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {
        "observation/image": rng.integers(0, 255, (48, 48, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
        "observation/state": np.asarray(state, dtype=np.float32),
        "prompt": "pick up the block",
    }


def test_openpi_feeds_oft_through_the_service(oft_dir: Path):
    from vllm_vla_pruner.api.openpi.msgpack_numpy import packb
    from vllm_vla_pruner.api.openpi.server import OpenpiServer

    engine = RecordingEngine(ROWS)
    server = OpenpiServer(ActionService(engine, str(oft_dir)))
    conn = server.open({"preset": "libero", "method": "vlapruner", "keep_ratio": "0.25"})
    meta = server.metadata(conn)
    assert meta["model_inputs"]["cameras"] == ["agentview", "wrist"]
    assert meta["model_inputs"]["state_dim"] == 8 and meta["action"]["horizon"] == 3
    kind, request = server.decode(conn, packb(_libero_obs(STATE)))
    assert kind == "infer" and "image" not in request
    reply = asyncio.run(server.infer(conn, request, 0.0))
    assert reply["actions"].shape == (3, 7) and reply["actions"].tolist() == ROWS
    call = engine.calls[0]
    assert [v.size for v in call["prompt"]["multi_modal_data"]["image"]] == [(48, 48), (32, 32)]
    assert call["params"].extra_args[KEY_STATE] == pytest.approx(STATE)
    assert call["params"].extra_args["vla_keep_ratio"] == 0.25


@pytest.mark.parametrize(
    ("state", "reason"), [(STATE[:5], "the model takes 8"), ([*STATE[:7], np.nan], "finite")]
)
def test_openpi_bad_state_names_the_key(oft_dir: Path, state, reason):
    from vllm_vla_pruner.api.openpi.msgpack_numpy import packb
    from vllm_vla_pruner.api.openpi.observations import ObservationError
    from vllm_vla_pruner.api.openpi.server import OpenpiServer

    server = OpenpiServer(ActionService(RecordingEngine(ROWS), str(oft_dir)))
    conn = server.open({"preset": "libero"})
    with pytest.raises(ObservationError) as ei:
        server.decode(conn, packb(_libero_obs(state)))
    assert ei.value.key == "observation/state" and reason in ei.value.reason
