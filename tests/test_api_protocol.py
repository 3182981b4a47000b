"""Unit tests of the /v1/actions API without an engine: every request field's validation,
image decoding, the engine settings built from a request, error mapping and the HTTP route
(driven in-process against a fake engine client)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from tests.tiny_config import vision_config
from vllm_vla_pruner.api.endpoint import STATE_KEY, ActionEndpointPlugin
from vllm_vla_pruner.api.images import decode_image
from vllm_vla_pruner.api.protocol import ApiError, ServiceLimits, parse_action_request
from vllm_vla_pruner.api.request_builder import pruning_extra_args
from vllm_vla_pruner.api.service import ActionService

PRUNERS = ["fastv", "none", "vlapruner"]
KEYS = ["bridge", "libero"]


def png_b64(size: tuple[int, int] = (8, 6), mode: str = "RGB", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color=(200, 10, 30) if mode == "RGB" else 128).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def body(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"image": png_b64(), "instruction": "pick up the block"}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not _DROP}


_DROP = object()


def parse(d: dict[str, Any]):
    return parse_action_request(d, pruners=PRUNERS, unnorm_keys=KEYS)


def refused(d: Any) -> ApiError:
    with pytest.raises(ApiError) as ei:
        parse_action_request(d, pruners=PRUNERS, unnorm_keys=KEYS)
    return ei.value


# ----------------------------------------------------------------------------- protocol


def test_minimal_request_defaults():
    r = parse(body())
    assert r.model is None and r.unnorm_key is None and r.session_id is None
    assert r.new_episode is False and r.pruning is None
    assert r.instruction == "pick up the block"


def test_full_request():
    r = parse(
        body(
            model="m",
            unnorm_key="bridge",
            session_id="robot-7",
            new_episode=True,
            pruning={"method": "vlapruner", "keep_ratio": 0.25},
        )
    )
    assert (r.model, r.unnorm_key, r.session_id, r.new_episode) == ("m", "bridge", "robot-7", True)
    assert r.pruning.method == "vlapruner" and r.pruning.keep_ratio == 0.25


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (body(image=_DROP), "image"),
        (body(instruction=_DROP), "instruction"),
        (body(image=None), "image"),
        (body(image=123), "image"),
        (body(image=""), "image"),
        (body(image="   "), "image"),
        (body(instruction=5), "instruction"),
        (body(instruction=["a"]), "instruction"),
        (body(instruction=""), "instruction"),
        (body(instruction="  \n "), "instruction"),
        (body(instruction="x" * 2001), "instruction"),
        (body(model=3), "model"),
        (body(unnorm_key=1), "unnorm_key"),
        (body(unnorm_key="mars"), "unnorm_key"),
        (body(session_id=7), "session_id"),
        (body(session_id=""), "session_id"),
        (body(session_id="x" * 257), "session_id"),
        (body(session_id="a\nb"), "session_id"),
        (body(new_episode="yes"), "new_episode"),
        (body(new_episode=1), "new_episode"),
        (body(pruning=[1]), "pruning"),
        (body(pruning="fastv"), "pruning"),
        (body(pruning={"method": "magic"}), "pruning.method"),
        (body(pruning={"method": ""}), "pruning.method"),
        (body(pruning={"method": 1}), "pruning.method"),
        (body(pruning={"keep_ratio": 0}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": -0.5}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": 1.5}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": float("nan")}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": "0.5"}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": True}), "pruning.keep_ratio"),
        (body(pruning={"keep_ratio": 0.5, "layer": 3}), "pruning.layer"),
        (body(instructions="typo"), "instructions"),
    ],
)
def test_bad_field_is_named(data: dict[str, Any], field: str):
    err = refused(data)
    assert err.status == 422
    assert err.field == field
    assert field.split(".")[-1] in err.message


def test_unknown_fields_all_named():
    err = refused(body(foo=1, bar=2))
    assert err.field == "foo" and "'foo'" in err.message and "'bar'" in err.message


@pytest.mark.parametrize("data", [[], "x", 3, None])
def test_non_object_body(data: Any):
    err = refused(data)
    assert err.status == 422 and err.field is None


def test_keep_ratio_bounds_inclusive_one():
    assert parse(body(pruning={"keep_ratio": 1})).pruning.keep_ratio == 1.0
    assert parse(body(pruning={"keep_ratio": 1e-6})).pruning.keep_ratio == 1e-6


def test_instruction_is_stripped():
    assert parse(body(instruction="  open the drawer \n")).instruction == "open the drawer"


def test_without_context_only_checkpoint_names_are_not_checked():
    """``unnorm_key`` depends on the served checkpoint; the pruner registry does not, so an
    ingress without the context refuses unknown pruners as the engine would."""
    r = parse_action_request(body(unnorm_key="anything", pruning={"method": "fastv"}))
    assert r.unnorm_key == "anything" and r.pruning.method == "fastv"
    with pytest.raises(ApiError) as ei:
        parse_action_request(body(pruning={"method": "future"}))
    assert ei.value.field == "pruning.method" and "vlapruner" in ei.value.message


def test_context_can_narrow_the_pruners():
    err = refused(body(pruning={"method": "random"}))  # in the registry, not in PRUNERS here
    assert err.field == "pruning.method" and "fastv" in err.message


def test_error_json_shape():
    err = refused(body(instruction=""))
    assert err.to_dict() == {
        "error": {"field": "instruction", "message": err.message, "type": "invalid_request"}
    }


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_png_jpeg(fmt: str):
    img = decode_image(png_b64((9, 7), fmt=fmt))
    assert img.size == (9, 7) and img.mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA"])
def test_decode_converts_to_rgb(mode: str):
    buf = io.BytesIO()
    Image.new(mode, (4, 4)).save(buf, format="PNG")
    img = decode_image(base64.b64encode(buf.getvalue()).decode())
    assert img.mode == "RGB"


def test_decode_data_url_and_wrapped_base64():
    b64 = png_b64()
    assert decode_image(f"data:image/png;base64,{b64}").size == (8, 6)
    wrapped = "\n".join(b64[i : i + 60] for i in range(0, len(b64), 60))
    assert decode_image(wrapped).size == (8, 6)


def test_decode_urlsafe_unpadded():
    raw = base64.b64decode(png_b64())
    assert decode_image(base64.urlsafe_b64encode(raw).decode().rstrip("=")).size == (8, 6)


@pytest.mark.parametrize(
    "data",
    [
        "not base64 at all!",
        base64.b64encode(b"hello, this is text").decode(),
        png_b64()[:40],  # truncated PNG
        "data:image/png,xyz",  # not base64
        "data:text/plain;base64," + base64.b64encode(b"x").decode(),
        "data:image/png;base64",  # no comma
        "https://example.com/cam.png",
        "====",
    ],
)
def test_undecodable_image_names_image(data: str):
    with pytest.raises(ApiError) as ei:
        decode_image(data)
    assert ei.value.field == "image" and ei.value.status in (413, 422)


def test_other_formats_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="GIF")
    with pytest.raises(ApiError, match="GIF") as ei:
        decode_image(base64.b64encode(buf.getvalue()).decode())
    assert ei.value.field == "image"


def test_image_size_limits():
    with pytest.raises(ApiError) as ei:
        decode_image(png_b64((64, 64)), ServiceLimits(max_image_pixels=32 * 32))
    assert ei.value.field == "image" and "pixels" in ei.value.message
    with pytest.raises(ApiError) as ei:
        decode_image(png_b64((64, 64)), ServiceLimits(max_image_bytes=50))
    assert ei.value.field == "image" and ei.value.status == 413


# ----------------------------------------------------------------------------- service


class FakeDecoder:
    """Action decoding stand-in: token t -> float(t) (the real one is tested elsewhere)."""

    default_unnorm_key = None
    dims = {"bridge": 7, "libero": 4}

    def action_dim(self, key: str) -> int:
        return self.dims[key]

    def decode(self, token_ids: list[int], key: str) -> list[float]:
        return [float(t) for t in token_ids]

    def prompt_token_ids(self, tokenizer: Any, instruction: str) -> list[int]:
        return [1] + [10 + len(w) for w in instruction.split()]


class FakeEngine:
    """Enough of vLLM's EngineClient: records calls, answers with deterministic tokens."""

    def __init__(
        self, delay: float = 0.0, fail: BaseException | None = None, kv_params: Any = None
    ) -> None:
        self.kv_params = kv_params
        self.calls: list[dict[str, Any]] = []
        self.aborted: list[str] = []
        self.delay = delay
        self.fail = fail
        self.model_config = None

    async def generate(self, prompt, params, request_id, *, session_id=None, **kw):
        self.calls.append(
            {"prompt": prompt, "params": params, "request_id": request_id, "session": session_id}
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        n = params.max_tokens
        stats = SimpleNamespace(
            queued_ts=1.0, scheduled_ts=1.001, first_token_ts=1.003, last_token_ts=1.006
        )
        out = SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=list(range(100, 100 + n)))],
            metrics=stats,
            finished=True,
            kv_transfer_params=self.kv_params,
        )
        yield out

    async def abort(self, request_id):
        self.aborted.append(request_id)


TINY_CONFIG = {**vision_config(32), "norm_stats": {"bridge": {}, "libero": {}}}


def make_service(engine: FakeEngine | None = None, **kw: Any) -> ActionService:
    defaults = dict(
        served_model_names=["tiny"],
        decoder=FakeDecoder(),
        tokenizer=object(),
        hf_config=TINY_CONFIG,
        max_model_len=64,
    )
    return ActionService(engine or FakeEngine(), "/models/tiny", **{**defaults, **kw})


def run(coro):
    return asyncio.run(coro)


def test_service_predict_builds_engine_request():
    engine = FakeEngine()
    svc = make_service(engine)
    req = parse(
        body(
            unnorm_key="libero",
            session_id="r1",
            new_episode=True,
            pruning={"method": "fastv", "keep_ratio": 0.5},
        )
    )
    resp = run(svc.predict(req))
    assert resp.action == [100.0, 101.0, 102.0, 103.0]
    assert resp.action_token_ids == [100, 101, 102, 103]
    assert (resp.model, resp.unnorm_key, resp.session_id) == ("tiny", "libero", "r1")
    call = engine.calls[0]
    params = call["params"]
    assert params.temperature == 0.0 and params.max_tokens == params.min_tokens == 4
    assert params.ignore_eos and params.detokenize is False
    assert params.extra_args == {
        "vla_pruner": "fastv",
        "vla_keep_ratio": 0.5,
        "vla_new_episode": True,
        "vla_session_id": "r1",
    }
    assert call["session"] == "r1"
    prompt = call["prompt"]
    assert prompt["prompt_token_ids"] == [1, 14, 12, 13, 15]
    assert prompt["multi_modal_data"]["image"].mode == "RGB"
    assert resp.pruning.visual_tokens_total == 16
    # The fake engine reports nothing: no kept count is claimed from the request alone.
    assert resp.pruning.visual_tokens_kept is None and resp.pruning.source == "requested"
    assert resp.timing.queue_ms == pytest.approx(1.0, abs=1e-6)
    assert resp.timing.prefill_ms == pytest.approx(2.0, abs=1e-6)
    assert resp.timing.total_ms >= 0


def test_service_session_header_and_defaults():
    engine = FakeEngine()
    svc = make_service(engine, pruning_defaults={"method": "vlapruner", "keep_ratio": 0.25})
    resp = run(svc.predict(parse(body(unnorm_key="bridge")), session_header="cam-2"))
    assert resp.session_id == "cam-2" and engine.calls[0]["session"] == "cam-2"
    assert engine.calls[0]["params"].extra_args == {
        "vla_new_episode": False,
        "vla_session_id": "cam-2",
    }
    assert resp.pruning.method == "vlapruner" and resp.pruning.keep_ratio == 0.25
    assert resp.pruning.visual_tokens_kept is None  # not reported by an engine
    # body wins over header; no session at all -> none sent
    resp = run(svc.predict(parse(body(unnorm_key="bridge", session_id="b")), "h"))
    assert resp.session_id == "b"
    run(svc.predict(parse(body(unnorm_key="bridge"))))
    assert engine.calls[-1]["session"] is None
    assert "vla_session_id" not in engine.calls[-1]["params"].extra_args


def test_service_bad_header_named():
    with pytest.raises(ApiError) as ei:
        run(make_service().predict(parse(body(unnorm_key="bridge")), "bad\x00id"))
    assert ei.value.field == "session_id" and "X-Session-ID" in ei.value.message


def test_service_needs_unnorm_key_when_ambiguous():
    with pytest.raises(ApiError) as ei:
        run(make_service().predict(parse(body())))
    assert ei.value.field == "unnorm_key" and "bridge" in ei.value.message


def test_service_wrong_model_is_404():
    with pytest.raises(ApiError) as ei:
        run(make_service().predict(parse(body(model="gpt-9", unnorm_key="bridge"))))
    assert ei.value.status == 404 and ei.value.field == "model" and "gpt-9" in ei.value.message


def test_service_prompt_too_long():
    svc = make_service(max_model_len=20)
    with pytest.raises(ApiError) as ei:
        run(svc.predict(parse(body(unnorm_key="bridge"))))
    assert ei.value.field == "instruction" and "max_model_len" in ei.value.message


def test_service_timeout_aborts():
    engine = FakeEngine(delay=5.0)
    svc = make_service(engine, limits=ServiceLimits(timeout_s=0.2))
    with pytest.raises(ApiError) as ei:
        run(svc.predict(parse(body(unnorm_key="bridge"))))
    assert ei.value.status == 504
    assert engine.aborted == [engine.calls[0]["request_id"]]


def test_service_engine_errors_mapped():
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    req = parse(body(unnorm_key="bridge"))
    err = VLLMValidationError("keep ratio not allowed", parameter="vla_keep_ratio")
    with pytest.raises(ApiError) as ei:
        run(make_service(FakeEngine(fail=err)).predict(req))
    assert ei.value.status == 422 and ei.value.field == "pruning.keep_ratio"
    with pytest.raises(ApiError) as ei:
        run(make_service(FakeEngine(fail=EngineDeadError())).predict(req))
    assert ei.value.status == 503
    with pytest.raises(ApiError) as ei:
        run(make_service(FakeEngine(fail=RuntimeError("boom"))).predict(req))
    assert ei.value.status == 500 and "boom" in ei.value.message


def test_service_reports_what_the_worker_did_not_the_plan():
    from vllm_vla_pruner.engine.plan import PruneOutcome, PruningResult

    outcome = PruneOutcome(True, 16, 4, used_history=False, history_missing=True)
    result = PruningResult("vlapruner", 0.25, warmup=False, planned_keep=4, outcome=outcome)
    svc = make_service(FakeEngine(kv_params={"vla_pruner": result.to_public()}))
    p = run(svc.predict(parse(body(unnorm_key="bridge", session_id="s")))).pruning
    assert p.source == "worker" and p.warmup is False and p.history_evicted is True
    assert (p.method, p.keep_ratio, p.visual_tokens_total, p.visual_tokens_kept) == (
        "vlapruner",
        0.25,
        16,
        4,
    )
    # A request that never reached its forward reports no kept count, whatever was planned.
    result = PruningResult("vlapruner", 0.25, warmup=False, planned_keep=4, outcome=None)
    svc = make_service(FakeEngine(kv_params={"vla_pruner": result.to_public()}))
    p = run(svc.predict(parse(body(unnorm_key="bridge")))).pruning
    assert p.visual_tokens_kept is None and p.source == "worker"
    # Without an engine report only the request's settings are known: no kept count claimed.
    p = run(make_service(FakeEngine()).predict(parse(body(unnorm_key="bridge")))).pruning
    assert p.source == "requested" and p.visual_tokens_kept is None


def test_service_answers_500_when_the_engine_failed_the_planned_pruning():
    class FailedPruning(FakeEngine):
        async def generate(self, *a, **k):
            async for out in super().generate(*a, **k):
                out.outputs[0].token_ids = []
                out.outputs[0].finish_reason = "error"
                yield out

    with pytest.raises(ApiError) as ei:
        run(make_service(FailedPruning()).predict(parse(body(unnorm_key="bridge"))))
    assert ei.value.status == 500 and "pruning did not run" in ei.value.message


def test_service_wrapped_value_error_is_client_error():
    from vllm.v1.engine.exceptions import EngineGenerateError

    try:
        try:
            raise ValueError("vla_pruner: unknown pruning method 'x'")
        except ValueError as e:
            raise EngineGenerateError() from e
    except EngineGenerateError as wrapped:
        err = wrapped
    with pytest.raises(ApiError) as ei:
        run(make_service(FakeEngine(fail=err)).predict(parse(body(unnorm_key="bridge"))))
    assert ei.value.status == 422 and ei.value.field == "pruning.method"


def test_extra_args_only_given_settings():
    assert pruning_extra_args(keep_ratio=1) == {"vla_new_episode": False, "vla_keep_ratio": 1.0}


def test_info():
    info = make_service().info()
    assert info.action_dims == {"bridge": 7, "libero": 4}
    assert info.visual_tokens == 16 and info.image_size == 32
    assert "vlapruner" in info.pruners


# ----------------------------------------------------------------------------- HTTP route


def make_app(svc: ActionService) -> FastAPI:
    app = FastAPI()
    ActionEndpointPlugin().attach_router(app)
    setattr(app.state, STATE_KEY, svc)
    return app


async def _post(
    app: FastAPI,
    content: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        if json_body is not None:
            return await c.post("/v1/actions", json=json_body, headers=headers)
        return await c.post("/v1/actions", content=content, headers=headers)


def test_route_ok_and_errors():
    svc = make_service(limits=ServiceLimits(max_body_bytes=4096))
    app = make_app(svc)
    r = run(_post(app, json_body=body(unnorm_key="bridge"), headers={"X-Session-ID": "r9"}))
    assert r.status_code == 200, r.text
    assert len(r.json()["action"]) == 7 and r.json()["session_id"] == "r9"

    r = run(_post(app, content=b"{not json"))
    assert r.status_code == 400 and r.json()["error"]["field"] is None

    r = run(_post(app, json_body=body(instruction="")))
    assert r.status_code == 422 and r.json()["error"]["field"] == "instruction"

    r = run(_post(app, json_body=body(image="A" * 5000)))
    assert r.status_code == 413 and r.json()["error"]["field"] == "image"

    r = run(_post(app, json_body=body(model="other", unnorm_key="bridge")))
    assert r.status_code == 404 and r.json()["error"]["field"] == "model"

    r = run(_post(app, json_body=body(unnorm_key="bridge", image=png_b64()[:30])))
    assert r.status_code == 422 and r.json()["error"]["field"] == "image"


#: Nesting bombs (json.loads alone: RecursionError -> 500) and near misses, 400 naming the
#: top-level field that holds the bomb when there is one.
NESTING: list[tuple[str, bytes, str | None]] = [
    ("list bomb", b"[" * 100_000 + b"]" * 100_000, None),
    ("object bomb", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "a"),
    ("unclosed bomb", b"[" * 100_000, None),
    ("bomb in pruning", b'{"image": "x", "pruning": ' + b"[" * 65 + b"]" * 65 + b"}", "pruning"),
    (
        "bomb after escapes",
        b'{"instruction": "\\\\\\"]]", "p":' + b"[" * 65 + b"]" * 65 + b"}",
        "p",
    ),
]


@pytest.mark.parametrize(("name", "raw", "field"), NESTING, ids=[n[0] for n in NESTING])
def test_nesting_bomb_is_400_naming_the_field(name: str, raw: bytes, field: str | None):
    from vllm_vla_pruner.api.json_body import MAX_JSON_DEPTH, parse_json_body

    with pytest.raises(ApiError) as ei:
        parse_json_body(raw)
    assert ei.value.status == 400 and ei.value.field == field, ei.value
    assert f"deeper than {MAX_JSON_DEPTH}" in ei.value.message
    r = run(_post(make_app(make_service()), content=raw))
    assert r.status_code == 400, r.text[:200]
    assert r.json()["error"]["field"] == field


def test_nesting_within_limit_and_brackets_in_strings_pass():
    from vllm_vla_pruner.api.json_body import MAX_JSON_DEPTH, parse_json_body

    deep = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json_body(deep) is not None
    with pytest.raises(ApiError):
        parse_json_body(b"[" + deep + b"]")
    text = {"instruction": "[" * 500 + '\\"{' * 100, "image": "x"}
    assert parse_json_body(json.dumps(text).encode()) == text
    flat = json.dumps([[i] for i in range(1000)]).encode()
    assert len(parse_json_body(flat)) == 1000


def test_body_must_be_utf8_json():
    from vllm_vla_pruner.api.json_body import parse_json_body

    assert parse_json_body('{"a": "é"}'.encode()) == {"a": "é"}
    assert parse_json_body(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # with a BOM
    for raw in ('{"a": 1}'.encode("utf-16"), '{"a": 1}'.encode("utf-32"), b"", b"\xff{"):
        with pytest.raises(ApiError) as ei:
            parse_json_body(raw)
        assert ei.value.status == 400 and ei.value.field is None


def test_route_info_and_uninitialised():
    app = make_app(make_service())

    async def get(a: FastAPI) -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=a), base_url="http://t"
        ) as c:
            return await c.get("/v1/actions/info")

    r = run(get(app))
    assert r.status_code == 200 and r.json()["action_dims"]["libero"] == 4
    bare = FastAPI()
    ActionEndpointPlugin().attach_router(bare)
    assert run(get(bare)).status_code == 503


def test_route_client_disconnect_aborts_engine_request():
    """A robot that hangs up must not leave its request running in the engine."""
    import vllm.sampling_params  # noqa: F401 - import outside the timed part
    from starlette.requests import Request

    from vllm_vla_pruner.api.endpoint import build_router

    engine = FakeEngine(delay=30.0)
    app = make_app(make_service(engine))
    payload = json.dumps(body(unnorm_key="bridge")).encode()
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        while not engine.calls:  # hang up once the request is in the engine
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/actions",
        "headers": [],
        "query_string": b"",
        "app": app,
    }
    route = next(r for r in build_router().routes if r.path == "/v1/actions")

    async def go():
        return await asyncio.wait_for(route.endpoint(Request(scope, receive)), 60)

    resp = run(go())
    assert resp.status_code == 499
    assert engine.aborted == [engine.calls[0]["request_id"]]


def test_plugin_satisfies_vllm_protocol():
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    plugin = ActionEndpointPlugin()
    assert isinstance(plugin, EndpointPlugin)
    assert plugin.name == "vla_pruner" and "generate" in plugin.required_tasks


def test_vllm_loads_both_plugin_groups(monkeypatch):
    """VLLM_PLUGINS=vla_pruner selects the general plugin and the endpoint plugin."""
    from importlib.metadata import entry_points

    import vllm.plugins as vp

    general = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert general.get("vla_pruner") == "vllm_vla_pruner:register"
    monkeypatch.setenv("VLLM_PLUGINS", "vla_pruner")
    plugins = vp.load_endpoint_plugins(("generate",))
    assert [p.name for p in plugins] == ["vla_pruner"]
    assert vp.load_endpoint_plugins(("render",)) == []


def test_response_is_json_serialisable():
    resp = run(make_service().predict(parse(body(unnorm_key="bridge"))))
    json.dumps(resp.model_dump(mode="json"))
