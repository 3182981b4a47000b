"""``execute_steps``: a robot that executes k of a chunk's rows gets only those rows back.

The engine still computes the whole chunk (the request is the same, see
tests/test_request_builder.py); the field is checked in the body (an integer >= 1) and
against the served model's chunk (OFT: 1..chunk, AR: 1), a 422 naming ``execute_steps``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from tests.test_oft_api_units import OFT_CTX, ROWS, RecordingEngine, _chunk_body, _png
from vllm_vla_pruner.api.protocol import ApiError, check_execute_steps, parse_action_request
from vllm_vla_pruner.api.service import ActionService
from vllm_vla_pruner.research.checkpoint import build_checkpoint


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    return build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_k"), seed=3)


def _refused(body, **ctx) -> ApiError:
    with pytest.raises(ApiError) as ei:
        parse_action_request(body, **ctx)
    return ei.value


@pytest.mark.parametrize("bad", [0, -1, "2", 2.0, True, [2]])
def test_not_a_positive_integer_is_refused_naming_the_field(bad):
    err = _refused(_chunk_body(execute_steps=bad), **OFT_CTX, chunk=3)
    assert err.status == 422 and err.field == "execute_steps"


def test_more_steps_than_the_chunk_is_refused():
    assert parse_action_request(_chunk_body(execute_steps=3), **OFT_CTX, chunk=3).execute_steps == 3
    err = _refused(_chunk_body(execute_steps=4), **OFT_CTX, chunk=3)
    assert err.field == "execute_steps" and "[1, 3]" in err.message


def test_ar_model_answers_one_action():
    body = {"image": _png(), "instruction": "pick"}
    assert parse_action_request({**body, "execute_steps": 1}).execute_steps == 1
    assert _refused({**body, "execute_steps": 2}).field == "execute_steps"


def test_check_execute_steps_defaults_to_the_whole_chunk():
    assert check_execute_steps(None, 8) == 8
    assert check_execute_steps(4, 8) == 4
    with pytest.raises(ApiError):
        check_execute_steps(9, 8)


def test_service_answers_the_first_rows_and_validates_its_context(oft_dir: Path):
    engine = RecordingEngine(ROWS)
    svc = ActionService(engine, str(oft_dir))
    ctx = svc.request_context()
    assert ctx.chunk == 3
    resp = asyncio.run(svc.predict(ctx.parse(_chunk_body(execute_steps=2))))
    assert resp.actions == ROWS[:2] and resp.chunk == 3
    whole = asyncio.run(svc.predict(ctx.parse(_chunk_body())))
    assert whole.actions == ROWS
    assert _refused(_chunk_body(execute_steps=4), **vars(ctx)).field == "execute_steps"
    # Callers that skip the body parser (predict_chunk directly) get the same check.
    with pytest.raises(ApiError) as ei:
        views = [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64))]
        asyncio.run(svc.predict_chunk(views, "pick", [0.0] * 8, execute_steps=5))
    assert ei.value.field == "execute_steps"
