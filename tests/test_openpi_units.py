"""openpi protocol without an engine: the wire encoding against the real ``openpi-client``,
the observation presets, and the WebSocket route on a real ``ActionService`` (tiny
checkpoint: real tokenizer, request builder and action decoder) whose engine is a recorder.

The end-to-end tests with a real vLLM server are in ``tests/test_openpi_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openpi_client import msgpack_numpy as openpi_msgpack
from starlette.websockets import WebSocketDisconnect

from vllm_vla_pruner.api.openpi import msgpack_numpy as ours
from vllm_vla_pruner.api.openpi.observations import (
    PRESETS,
    ModelInputs,
    ObservationError,
    ignored_inputs,
    map_observation,
    to_rgb_image,
)
from vllm_vla_pruner.api.openpi.server import (
    ERROR_CLOSE_CODE,
    STATE_KEY,
    OpenpiServer,
    OpenpiSettings,
    authorized,
    build_openpi_router,
)
from vllm_vla_pruner.api.service import ActionService

# ----------------------------------------------------------------------------- wire


def _sample() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "observation/image": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "images": {"cam_high": rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)},
        "big_endian": np.arange(4, dtype=">i4"),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "scalar": np.float32(1.5),
        "int_scalar": np.int64(-3),
        "prompt": "pick up the block",
        "nested": [1, 2.5, None, True, b"raw"],
    }


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    elif isinstance(a, np.generic):
        assert type(a) is type(b) and a == b
    else:
        assert a == b


def test_packing_is_byte_identical_to_openpi_client():
    obs = _sample()
    assert ours.packb(obs) == openpi_msgpack.packb(obs)


def test_both_directions_with_openpi_client():
    obs = _sample()
    _assert_same(obs, ours.unpackb(openpi_msgpack.packb(obs)))
    _assert_same(obs, openpi_msgpack.unpackb(ours.packb(obs)))


def _raw_array(dtype: str, shape: list[int], data: bytes) -> bytes:
    """A hand-made ndarray map: what a hostile or buggy client can send."""
    arr = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}
    return msgpack.packb({"observation/image": arr, "prompt": "x"}, use_bin_type=True)


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (_raw_array("|O", [2], b"\0" * 16), "dtype '|O' is refused"),
        (_raw_array("<c8", [1], b"\0" * 8), "dtype '<c8' is refused"),
        (_raw_array("|V4", [1], b"\0" * 4), "dtype '|V4' is refused"),
        (_raw_array("<f4", [2, 2], b"\0" * 15), "needs 16 bytes, got 15"),
        (_raw_array("<f4", [-1], b""), "non-negative integers"),
        (_raw_array("nonsense", [1], b"\0"), "unknown dtype 'nonsense'"),
        (b"\xc1\xff\x00garbage", "not a msgpack frame"),
        (msgpack.packb({1: 2}), "not a msgpack frame"),
    ],
)
def test_bad_frames_name_the_key(frame: bytes, needle: str):
    with pytest.raises(ours.FrameError) as info:
        ours.unpackb(frame)
    assert needle in str(info.value)
    if "refused" in needle or "bytes" in needle or "integers" in needle:
        assert str(info.value).startswith("observation/image: ")


def test_packer_refuses_what_openpi_refuses():
    for bad in (np.array([1 + 2j]), np.array([object()], dtype=object)):
        with pytest.raises(TypeError, match="refused"):
            ours.packb({"x": bad})


# ----------------------------------------------------------------------------- observations

ONE_CAMERA = ModelInputs(cameras=1, state_dim=0, image_size=32)


def test_image_layouts_and_dtypes_give_the_same_frame():
    hwc = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    want = np.asarray(to_rgb_image(hwc, "k"))
    assert want.shape == (10, 12, 3) and np.array_equal(want, hwc)
    assert np.array_equal(np.asarray(to_rgb_image(hwc.transpose(2, 0, 1), "k")), hwc)
    as_float = hwc.astype(np.float32) / 255.0
    assert np.array_equal(np.asarray(to_rgb_image(as_float, "k")), hwc)
    assert np.array_equal(np.asarray(to_rgb_image(as_float.transpose(2, 0, 1), "k")), hwc)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.zeros((10, 12), np.uint8), "shape (10, 12) is not an image"),
        (np.zeros((10, 12, 4), np.uint8), "expected (H, W, 3) or (3, H, W)"),
        (np.zeros((10, 12, 3), np.int64), "dtype int64 not accepted"),
        (np.full((4, 4, 3), 2.0, np.float32), "values must be in [0, 1]"),
        (np.full((4, 4, 3), np.nan, np.float32), "values must be in [0, 1]"),
        ("a string", "expected an image array"),
        (np.zeros((0, 4, 3), np.uint8), "pixels outside"),
    ],
)
def test_bad_images_are_refused_naming_the_key(value: Any, needle: str):
    with pytest.raises(ObservationError) as info:
        to_rgb_image(value, "observation/image", max_pixels=1 << 20)
    assert str(info.value).startswith("observation/image: ") and needle in str(info.value)


def test_presets_map_their_conventions():
    img = np.zeros((16, 16, 3), np.uint8)
    libero = {
        "observation/image": img,
        "observation/wrist_image": img,
        "observation/state": np.zeros(8),
        "prompt": "open the drawer",
    }
    m = map_observation(libero, PRESETS["libero"], ONE_CAMERA)
    assert list(m.images) == ["agentview"] and m.prompt == "open the drawer" and m.state is None
    droid = {
        "observation/exterior_image_1_left": img,
        "observation/wrist_image_left": img,
        "observation/joint_position": np.zeros(7),
        "observation/gripper_position": np.zeros(1),
        "prompt": "p",
    }
    assert list(map_observation(droid, PRESETS["droid"], ONE_CAMERA).images) == ["exterior"]
    chw = np.zeros((3, 16, 16), np.uint8)
    aloha = {"state": np.zeros(14), "images": {"cam_high": chw, "cam_low": chw}, "prompt": "p"}
    assert list(map_observation(aloha, PRESETS["aloha"], ONE_CAMERA).images) == ["cam_high"]
    # A model that reads two cameras and 14 state values takes them from the same preset.
    two = map_observation(
        {**aloha, "images": {"cam_high": chw, "cam_low": chw}},
        PRESETS["aloha"],
        ModelInputs(cameras=2, state_dim=14),
    )
    assert list(two.images) == ["cam_high", "cam_low"] and two.state.shape == (14,)
    mw = map_observation(
        {"observation/image": img, "prompt": "p"}, PRESETS["metaworld"], ONE_CAMERA
    )
    assert list(mw.images) == ["corner"]


def test_missing_keys_are_named():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ObservationError, match=r"^observation/image: missing"):
        map_observation({"prompt": "p"}, PRESETS["libero"], ONE_CAMERA)
    with pytest.raises(ObservationError, match=r"^prompt: missing"):
        map_observation({"observation/image": img}, PRESETS["libero"], ONE_CAMERA)
    with pytest.raises(ObservationError, match=r"^prompt: expected a string"):
        map_observation({"observation/image": img, "prompt": 3}, PRESETS["libero"], ONE_CAMERA)
    with pytest.raises(ObservationError, match=r"^images\.cam_high: missing"):
        map_observation({"images": {}, "prompt": "p"}, PRESETS["aloha"], ONE_CAMERA)
    with pytest.raises(ObservationError, match=r"^state: has 3 values, the model takes 14"):
        map_observation(
            {"images": {"cam_high": img}, "state": np.zeros(3), "prompt": "p"},
            PRESETS["aloha"],
            ModelInputs(cameras=1, state_dim=14),
        )


def test_ignored_inputs_are_reported():
    ignored = ignored_inputs(PRESETS["libero"], ONE_CAMERA)
    assert set(ignored) == {"observation/wrist_image", "observation/state"}
    assert "takes 1 camera" in ignored["observation/wrist_image"]
    assert ignored_inputs(PRESETS["metaworld"], ONE_CAMERA) == {}


def test_settings_from_additional_config():
    assert OpenpiSettings.from_additional_config(None).preset == "libero"
    assert OpenpiSettings.from_additional_config({"openpi": {"preset": "droid"}}).preset == "droid"
    with pytest.raises(ValueError, match="unknown preset 'lerobot'"):
        OpenpiSettings.from_additional_config({"openpi": {"preset": "lerobot"}})
    with pytest.raises(ValueError, match="unknown openpi settings"):
        OpenpiSettings.from_additional_config({"openpi": {"presets": "droid"}})


def test_auth_schemes():
    import hashlib

    tokens = [hashlib.sha256(b"k1").digest()]
    assert authorized(None, []) and authorized("anything", [])
    assert authorized("Api-Key k1", tokens) and authorized("Bearer k1", tokens)
    assert authorized("api-key k1", tokens)
    for bad in (None, "", "Api-Key k2", "Basic k1", "k1", "Bearer"):
        assert not authorized(bad, tokens)


# ----------------------------------------------------------------------------- the route


class RecordingEngine:
    """``EngineClient.generate``: answers valid action tokens, records every request."""

    model_config = None

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Any, str | None]] = []

    async def generate(self, prompt, params, request_id, session_id=None):
        self.calls.append((prompt, params, session_id))
        yield SimpleNamespace(
            request_id=request_id,
            outputs=[SimpleNamespace(token_ids=[1000] * params.max_tokens)],
            metrics=None,
            kv_transfer_params=None,
        )


@pytest.fixture
def route(tiny_ckpt: Path):
    engine = RecordingEngine()
    service = ActionService(engine, str(tiny_ckpt), served_model_names=["tiny"])
    app = FastAPI()
    app.include_router(build_openpi_router())
    import hashlib

    settings = OpenpiSettings(unnorm_key="tiny_robot")
    server = OpenpiServer(service, settings, [hashlib.sha256(b"secret").digest()])
    setattr(app.state, STATE_KEY, server)
    with TestClient(app) as client:
        yield SimpleNamespace(client=client, engine=engine, service=service)


AUTH = {"Authorization": "Api-Key secret"}


def _obs(**kw: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    d = {"observation/image": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "prompt": "go"}
    d.update(kw)
    return d


def test_metadata_then_actions_then_reset(route):
    svc = route.service
    key = "tiny_robot"
    with route.client.websocket_connect("/", headers=AUTH) as ws:
        meta = ours.unpackb(ws.receive_bytes())
        assert meta["preset"]["name"] == "libero" and meta["model"] == "tiny"
        assert meta["action"] == {"horizon": 1, "dim": svc.action_dims[key], "unnorm_key": key}
        assert "observation/wrist_image" in meta["ignored"]
        sid = meta["session_id"]
        for _ in range(2):
            ws.send_bytes(openpi_msgpack.packb(_obs()))
            reply = openpi_msgpack.unpackb(ws.receive_bytes())
            assert reply["actions"].shape == (1, svc.action_dims[key])
            assert reply["actions"].dtype == np.float64
            assert set(reply) >= {"actions", "server_timing", "policy_timing", "pruning"}
        assert "prev_total_ms" in reply["server_timing"]
        ws.send_bytes(openpi_msgpack.packb({"endpoint": "reset"}))
        assert openpi_msgpack.unpackb(ws.receive_bytes())["new_episode"] is True
        ws.send_bytes(
            openpi_msgpack.packb(_obs(pruning={"method": "vlapruner", "keep_ratio": 0.25}))
        )
        openpi_msgpack.unpackb(ws.receive_bytes())
    flags = [(p.extra_args["vla_new_episode"], s) for _, p, s in route.engine.calls]
    assert flags == [(True, sid), (False, sid), (True, sid)]
    last = route.engine.calls[-1][1].extra_args
    assert last["vla_pruner"] == "vlapruner" and last["vla_keep_ratio"] == 0.25
    # The engine got the request /v1/actions' builder makes for the same frame.
    built = svc.builder.build("go", _obs()["observation/image"], svc.action_dims[key])
    prompt = route.engine.calls[0][0]
    assert prompt["prompt_token_ids"] == built.prompt["prompt_token_ids"]
    assert np.array_equal(
        np.asarray(prompt["multi_modal_data"]["image"]),
        np.asarray(built.prompt["multi_modal_data"]["image"]),
    )


def test_query_string_settings_and_named_session(route):
    url = "/openpi?preset=metaworld&session_id=arm-7&method=fastv&keep_ratio=0.5"
    with route.client.websocket_connect(url, headers={"Authorization": "Bearer secret"}) as ws:
        meta = ours.unpackb(ws.receive_bytes())
        assert meta["preset"]["name"] == "metaworld" and meta["session_id"] == "arm-7"
        ws.send_bytes(openpi_msgpack.packb(_obs(pruning={"keep_ratio": 0.75})))
        reply = openpi_msgpack.unpackb(ws.receive_bytes())
        assert reply["session_id"] == "arm-7"
    xargs = route.engine.calls[0][1].extra_args
    # A named session may be a reconnect: its history is kept unless the robot resets.
    assert xargs["vla_new_episode"] is False and xargs["vla_session_id"] == "arm-7"
    assert xargs["vla_pruner"] == "fastv" and xargs["vla_keep_ratio"] == 0.75


def _expect_error(ws, needle: str) -> None:
    text = ws.receive_text()
    assert needle in text, text
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_bytes()
    assert info.value.code == ERROR_CLOSE_CODE


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (openpi_msgpack.packb({"prompt": "go"}), "observation/image: missing"),
        (
            openpi_msgpack.packb(_obs(**{"observation/image": np.zeros((24, 24, 3), np.int32)})),
            "observation/image: dtype int32 not accepted",
        ),
        (
            openpi_msgpack.packb(_obs(**{"observation/image": np.zeros((24, 24), np.uint8)})),
            "observation/image: shape (24, 24) is not an image",
        ),
        (_raw_array("|O", [1], b"\0" * 8), "observation/image: dtype '|O' is refused"),
        (b"\x00\xc1garbage", "not a msgpack frame"),
        (openpi_msgpack.packb(_obs(pruning={"keep_ratio": 7})), "pruning.keep_ratio"),
        (openpi_msgpack.packb(_obs(pruning={"method": "magic"})), "pruning.method"),
        (openpi_msgpack.packb({"endpoint": "teleport"}), "endpoint: unknown 'teleport'"),
        (openpi_msgpack.packb(_obs(session_id="")), "session_id"),
    ],
)
def test_bad_frames_get_the_error_frame(route, frame: bytes, needle: str):
    with route.client.websocket_connect("/", headers=AUTH) as ws:
        ws.receive_bytes()
        ws.send_bytes(frame)
        _expect_error(ws, needle)
    assert route.engine.calls == []


def test_text_frame_and_bad_query(route):
    with route.client.websocket_connect("/", headers=AUTH) as ws:
        ws.receive_bytes()
        ws.send_text("hello")
        _expect_error(ws, "got a text frame")
    with route.client.websocket_connect("/?preset=nope", headers=AUTH) as ws:
        _expect_error(ws, "query.preset: unknown preset 'nope'")
    with route.client.websocket_connect("/?keep_ratio=2", headers=AUTH) as ws:
        _expect_error(ws, "query.keep_ratio")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Api-Key wrong"}, {"X": "y"}])
def test_refused_before_metadata(route, headers):
    with pytest.raises(WebSocketDisconnect) as info:
        with route.client.websocket_connect("/", headers=headers) as ws:
            ws.receive_bytes()
    assert info.value.code == 1008


def test_model_with_several_unnorm_keys(route):
    route.client.app.state.vla_openpi_server.settings = OpenpiSettings()
    with route.client.websocket_connect("/", headers=AUTH) as ws:
        meta = ours.unpackb(ws.receive_bytes())
        assert meta["action"]["unnorm_key"] is None
        assert set(meta["action"]["dims"]) == {"other_robot", "tiny_robot"}
        ws.send_bytes(openpi_msgpack.packb(_obs()))
        _expect_error(ws, "unnorm_key: required")
    with route.client.websocket_connect("/?unnorm_key=other_robot", headers=AUTH) as ws:
        assert ours.unpackb(ws.receive_bytes())["action"]["unnorm_key"] == "other_robot"
        ws.send_bytes(openpi_msgpack.packb(_obs()))
        assert openpi_msgpack.unpackb(ws.receive_bytes())["actions"].shape[0] == 1
        ws.send_bytes(openpi_msgpack.packb(_obs(unnorm_key="nope")))
        _expect_error(ws, "unnorm_key: unknown key 'nope'")


def test_healthz(route):
    r = route.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# ----------------------------------------------------------------------------- fleet backend


class FakeForwarder:
    """``serve.forward.ReplicaForwarder.predict``: records the body, answers like a replica."""

    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[dict[str, Any], str | None, int | None]] = []
        self.status, self.body = status, body

    async def predict(self, data, header, sid, seq):
        from vllm_vla_pruner.serve.forward import Forwarded

        self.calls.append((data, sid, seq))
        body = self.body or {
            "id": "r",
            "model": "tiny",
            "action": [0.5] * 7,
            "action_token_ids": [1000] * 7,
            "unnorm_key": data.get("unnorm_key") or "tiny_robot",
            "session_id": sid,
            "pruning": {
                "method": "none",
                "keep_ratio": 1.0,
                "visual_tokens_total": 16,
                "visual_tokens_kept": 16,
                "source": "worker",
            },
            "timing": {"total_ms": 1.0},
        }
        return Forwarded({"status": self.status, "body": body, "replica": "rep-a"}, None, 1)


def _fleet_backend(forwarder: FakeForwarder):
    from vllm_vla_pruner.serve.openpi import FleetBackend
    from vllm_vla_pruner.serve.sessions import SessionTable

    info = {
        "served_model_names": ["tiny"],
        "action_dims": {"tiny_robot": 7, "other_robot": 3},
        "default_unnorm_key": None,
        "pruners": ["none", "vlapruner"],
        "image_size": 32,
        "defaults": {"method": "none"},
    }
    return FleetBackend(info, forwarder, SessionTable(60.0))


def test_fleet_backend_sends_the_http_body_to_the_sessions_replica():
    import asyncio
    import base64
    import io

    from PIL import Image

    from vllm_vla_pruner.api.protocol import ApiError, PruningSettings, parse_action_request

    fwd = FakeForwarder()
    backend = _fleet_backend(fwd)
    assert backend.resolve_unnorm_key("tiny_robot") == "tiny_robot"
    with pytest.raises(ApiError, match="unnorm_key: required"):
        backend.resolve_unnorm_key(None)
    frame = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    for new_episode in (True, False):
        resp = asyncio.run(
            backend.predict_image(
                Image.fromarray(frame),
                "go",
                unnorm_key="tiny_robot",
                pruning=PruningSettings(keep_ratio=0.5),
                session_id="arm-1",
                new_episode=new_episode,
            )
        )
        assert resp.action == [0.5] * 7 and resp.session_id == "arm-1"
    (first, sid, seq1), (_, _, seq2) = fwd.calls
    assert (sid, seq1, seq2) == ("arm-1", 1, 2)  # frames numbered as HTTP ones are
    req = parse_action_request(first)  # the body is a valid /v1/actions request
    assert req.new_episode is True and req.pruning.keep_ratio == 0.5 and req.pruning.method is None
    png = Image.open(io.BytesIO(base64.b64decode(req.image)))
    assert np.array_equal(np.asarray(png), frame)  # lossless
    assert backend.sessions.sessions["arm-1"].replica == "rep-a"

    refused = FakeForwarder(
        422, {"error": {"field": "instruction", "message": "instruction: too long", "type": "x"}}
    )
    with pytest.raises(ApiError, match="instruction: too long") as info:
        asyncio.run(_fleet_backend(refused).predict_image(Image.fromarray(frame), "go"))
    assert info.value.status == 422


# ----------------------------------------------------------------------------- pi0


class ChunkEngine(RecordingEngine):
    """Answers every request with a pi0 chunk (horizon x action_dim) in kv_transfer_params."""

    def __init__(self, horizon: int, dim: int) -> None:
        super().__init__()
        self.horizon, self.dim = horizon, dim

    async def generate(self, prompt, params, request_id, session_id=None):
        from vllm_vla_pruner.engine.plan import ActionChunk

        self.calls.append((prompt, params, session_id))
        values = tuple(float(i) for i in range(self.horizon * self.dim))
        chunk = ActionChunk(self.horizon, self.dim, values).to_public()
        yield SimpleNamespace(
            request_id=request_id,
            outputs=[SimpleNamespace(token_ids=[0])],
            metrics=None,
            kv_transfer_params={"vla_actions": chunk},
        )


def test_pi0_over_openpi_masks_the_cameras_a_preset_lacks(tmp_path):
    """A LIBERO robot (2 cameras + 8-dim state) on a 3-slot pi0 checkpoint: both cameras and
    the state reach the engine (the third slot is a masked camera), the reply is the chunk."""
    import hashlib

    from vllm_vla_pruner.engine.plan import KEY_STATE
    from vllm_vla_pruner.pi0_spec import pi0_prompt_token_ids
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    model = build_checkpoint("tiny-pi0", tmp_path / "pi0", seed=0)
    engine = ChunkEngine(5, 7)
    service = ActionService(engine, str(model), served_model_names=["pi0"])
    app = FastAPI()
    app.include_router(build_openpi_router())
    server = OpenpiServer(service, OpenpiSettings(), [hashlib.sha256(b"secret").digest()])
    setattr(app.state, STATE_KEY, server)
    rng = np.random.default_rng(1)
    obs = {
        "observation/image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "pick up the red block",
    }
    with TestClient(app) as client, client.websocket_connect("/", headers=AUTH) as ws:
        meta = ours.unpackb(ws.receive_bytes())
        assert meta["action"]["horizon"] == 5 and meta["action"]["dim"] == 7
        ws.send_bytes(openpi_msgpack.packb(obs))
        reply = openpi_msgpack.unpackb(ws.receive_bytes())
    assert reply["actions"].shape == (5, 7)
    prompt, params, _ = engine.calls[0]
    assert len(prompt["multi_modal_data"]["image"]) == 2
    assert prompt["prompt_token_ids"] == pi0_prompt_token_ids(service.tokenizer, obs["prompt"], 48)
    assert np.allclose(params.extra_args[KEY_STATE], obs["observation/state"], atol=1e-6)


def test_pi05_over_openpi_bins_the_state_into_the_prompt(tmp_path):
    """pi0.5: the robot's raw state reaches the engine inside the prompt (openpi's pi0.5
    format from the checkpoint's q01/q99), not as a state input; a state of the wrong length
    is refused before the engine, naming the observation key."""
    import hashlib

    from vllm_vla_pruner.engine.plan import KEY_STATE
    from vllm_vla_pruner.pi0_spec import pi0_normalizer, pi0_prompt_token_ids
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    model = build_checkpoint("tiny-pi05", tmp_path / "pi05", seed=0)
    engine = ChunkEngine(5, 7)
    service = ActionService(engine, str(model), served_model_names=["pi05"])
    app = FastAPI()
    app.include_router(build_openpi_router())
    server = OpenpiServer(service, OpenpiSettings(), [hashlib.sha256(b"secret").digest()])
    setattr(app.state, STATE_KEY, server)
    rng = np.random.default_rng(1)
    obs = {
        "observation/image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "pick up the red block",
    }
    short = {**obs, "observation/state": obs["observation/state"][:5]}
    with TestClient(app) as client, client.websocket_connect("/", headers=AUTH) as ws:
        ours.unpackb(ws.receive_bytes())
        ws.send_bytes(openpi_msgpack.packb(obs))
        reply = openpi_msgpack.unpackb(ws.receive_bytes())
        ws.send_bytes(openpi_msgpack.packb(short))
        _expect_error(ws, "observation/state: has 5 values, the model takes 8")
    assert reply["actions"].shape == (5, 7)
    assert len(engine.calls) == 1
    prompt, params, _ = engine.calls[0]
    bins = pi0_normalizer(model).state_bins([float(x) for x in obs["observation/state"]])
    want = pi0_prompt_token_ids(service.tokenizer, obs["prompt"], 200, bins)
    assert prompt["prompt_token_ids"] == want
    assert KEY_STATE not in params.extra_args
