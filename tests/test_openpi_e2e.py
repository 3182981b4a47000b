"""End-to-end: openpi's own ``WebsocketClientPolicy`` against a real ``vla-pruner serve``.

One server for the module: the embedded Meta-World policy, started as an operator would
with ``--api-key`` and the openpi preset flag. The robot client is the registry's
``openpi-client`` (installed by scripts/setup.sh with --no-deps), used exactly as openpi's
examples use it: ``WebsocketClientPolicy(host, port, api_key=...).infer(obs)["actions"]``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from PIL import Image
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from tests.serve_fixtures import _stop, start_server

pytestmark = pytest.mark.engine

API_KEY = "openpi-test-key"
TASK = "handle-press-v3"  # the embedded policy solves it in ~30 steps
PRUNING = {"method": "vlapruner", "keep_ratio": 0.25}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vllm_vla_pruner.research.sim.benchmark import DEFAULT_MODEL

    log = tmp_path_factory.mktemp("openpi_server") / "server.log"
    srv = start_server(
        Path(DEFAULT_MODEL),
        log,
        [
            "--api-key",
            API_KEY,
            "--additional-config",
            json.dumps({"openpi": {"preset": "metaworld"}}),
        ],
    )
    print(f"\n[openpi server] ready in {srv.start_s:.1f} s ({srv.base_url})")
    try:
        yield srv
    finally:
        _stop(srv.process)


def _hostport(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_metadata_healthz_and_auth(server):
    host, port = _hostport(server)
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    policy = WebsocketClientPolicy(host, port, api_key=API_KEY)
    meta = policy.get_server_metadata()
    assert meta["preset"]["name"] == "metaworld"
    assert meta["preset"]["cameras"] == {"corner": "observation/image"}
    assert meta["action"] == {"horizon": 1, "dim": 4, "unnorm_key": "metaworld"}
    assert meta["model_inputs"]["image_size"] == 64 and meta["model_inputs"]["state_dim"] == 0
    out = policy.infer({"observation/image": _frame(0), "prompt": "press the button"})
    assert out["actions"].shape == (1, 4) and np.all(np.isfinite(out["actions"]))
    assert out["pruning"]["source"] == "worker"
    # LIBERO/ALOHA-style frames: 224x224, CHW, float in [0, 1]; the processor resizes them.
    chw = np.random.default_rng(2).random((3, 224, 224)).astype(np.float32)
    out = policy.infer({"observation/image": chw, "prompt": "press the button"})
    assert out["actions"].shape == (1, 4) and np.all(np.isfinite(out["actions"]))
    # Refused before the metadata frame: no key, a wrong key, a scheme that is neither.
    for key in (None, "wrong"):
        with pytest.raises(InvalidStatus) as info:
            WebsocketClientPolicy(host, port, api_key=key)
        assert info.value.response.status_code == 403
    for scheme, status in (("Bearer", None), ("Basic", 403)):
        headers = {"Authorization": f"{scheme} {API_KEY}"}
        uri = f"ws://{host}:{port}/openpi"
        if status is None:
            with websockets.sync.client.connect(uri, additional_headers=headers) as ws:
                assert msgpack_numpy.unpackb(ws.recv())["session_id"].startswith("openpi-")
        else:
            with pytest.raises(InvalidStatus):
                websockets.sync.client.connect(uri, additional_headers=headers)


class HttpPolicy:
    """The Meta-World policy through ``POST /v1/actions`` (PNG frames, one session/episode)."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(
            base_url=base_url, timeout=120.0, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        self.actions: list[list[float]] = []

    def __call__(self, image: np.ndarray, instruction: str, session: str, first: bool):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        body = {
            "image": base64.b64encode(buf.getvalue()).decode(),
            "instruction": instruction,
            "session_id": f"http/{session}",
            "new_episode": first,
            "pruning": PRUNING,
        }
        r = self.client.post("/v1/actions", json=body)
        assert r.status_code == 200, r.text
        self.actions.append(r.json()["action"])
        return np.asarray(self.actions[-1], np.float32)


class OpenpiPolicy:
    """The same policy as a robot running openpi-client: one connection per episode."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.client: WebsocketClientPolicy | None = None
        self.actions: list[list[float]] = []
        self.kept: list[int | None] = []

    def __call__(self, image: np.ndarray, instruction: str, session: str, first: bool):
        if first:
            q = f"method={PRUNING['method']}&keep_ratio={PRUNING['keep_ratio']}"
            self.client = WebsocketClientPolicy(
                f"ws://{self.host}:{self.port}/?{q}", api_key=API_KEY
            )
        out = self.client.infer({"observation/image": image, "prompt": instruction})
        assert out["actions"].shape == (1, 4)
        self.actions.append([float(a) for a in out["actions"][0]])
        self.kept.append(out["pruning"]["visual_tokens_kept"])
        return out["actions"][0].astype(np.float32)


def test_metaworld_episode_equals_http_path(server):
    pytest.importorskip("metaworld", reason="Meta-World is installed by scripts/setup.sh")
    from vllm_vla_pruner.research.sim.evaluate import evaluate

    host, port = _hostport(server)
    runs = {}
    for name, policy in (
        ("http", HttpPolicy(server.base_url)),
        ("openpi", OpenpiPolicy(host, port)),
    ):
        res = evaluate(policy, [TASK], episodes_per_task=1, max_steps=60, progress=False)
        runs[name] = (res, policy)
    (http_res, http_pol), (ws_res, ws_pol) = runs["http"], runs["openpi"]
    assert ws_pol.actions == http_pol.actions  # frame for frame, the same engine request
    assert ws_res.to_dict()["tasks"] == http_res.to_dict()["tasks"]  # success and steps
    # Pruning ran on the connection's episode: warm-up frames first, then M/4 kept.
    assert ws_pol.kept[0] == 64 and ws_pol.kept[-1] == 16, ws_pol.kept
    print(f"\n[openpi episode] {len(ws_pol.actions)} steps, success {ws_res.to_dict()['tasks']}")


def _raw(host: str, port: int, frame: bytes | str) -> tuple[str, int]:
    """Send one frame on a fresh connection; the error text and the close code."""
    headers = {"Authorization": f"Api-Key {API_KEY}"}
    uri = f"ws://{host}:{port}/"
    with websockets.sync.client.connect(uri, additional_headers=headers, max_size=None) as ws:
        msgpack_numpy.unpackb(ws.recv())
        ws.send(frame)
        text = ws.recv()
        assert isinstance(text, str), "expected the error text frame"
        with pytest.raises(ConnectionClosedError) as info:
            ws.recv()
        return text, info.value.rcvd.code


def test_eight_clients_while_bad_observations_are_refused(server):
    host, port = _hostport(server)
    stop = threading.Event()
    counts = [0] * 8

    def robot(i: int) -> int:
        policy = WebsocketClientPolicy(host, port, api_key=API_KEY)
        n = 0
        while n < 4 or not stop.is_set():
            out = policy.infer({"observation/image": _frame(i * 100 + n), "prompt": "press it"})
            assert out["actions"].shape == (1, 4) and np.all(np.isfinite(out["actions"]))
            n += 1
            counts[i] = n
            if n >= 200:
                break
        return n

    good = {"observation/image": _frame(1), "prompt": "press the button"}
    obj = {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}
    cases = {
        "missing key": (msgpack_numpy.packb({"prompt": "x"}), "observation/image: missing"),
        "wrong dtype": (
            msgpack_numpy.packb({**good, "observation/image": _frame(1).astype(np.int16)}),
            "observation/image: dtype int16 not accepted",
        ),
        "wrong shape": (
            msgpack_numpy.packb({**good, "observation/image": np.zeros((64, 64, 5), np.uint8)}),
            "observation/image: shape (64, 64, 5) is not an image",
        ),
        "object array": (
            msgpack.packb({"observation/image": obj, "prompt": "x"}, use_bin_type=True),
            "observation/image: dtype '|O' is refused",
        ),
        "garbage bytes": (b"\xc1\x00\xff not msgpack", "not a msgpack frame"),
        "text frame": ("hello", "got a text frame"),
    }
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(robot, i) for i in range(8)]
        deadline = time.monotonic() + 300
        while min(counts) < 1 and time.monotonic() < deadline:  # all 8 connected and served
            time.sleep(0.05)
        before = sum(counts)
        for name, (frame, needle) in cases.items():
            text, code = _raw(host, port, frame)
            assert needle in text and code == 1011, (name, text, code)
        # The openpi client surfaces the error frame as RuntimeError, as openpi's does.
        bad = WebsocketClientPolicy(host, port, api_key=API_KEY)
        with pytest.raises(RuntimeError, match="observation/image: missing"):
            bad.infer({"prompt": "x"})
        # Every good robot, connected all along, keeps getting actions (bounded wait).
        after_bad = list(counts)
        deadline = time.monotonic() + 120
        while any(c < a + 2 for c, a in zip(counts, after_bad)) and time.monotonic() < deadline:
            time.sleep(0.05)
        progressed = [c - a for c, a in zip(counts, after_bad)]
        stop.set()
        served = [f.result(timeout=300) for f in futures]
    assert all(p >= 2 for p in progressed), progressed
    assert all(n >= 4 for n in served) and sum(served) > before
    print(f"\n[openpi 8 clients] actions served per client: {served}")
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
