"""The fleet end to end: a real two-replica Ray Serve fleet on the tiny checkpoint.

The fleet runs with an API key: every route but /health and /metrics refuses requests
without it (401). Several simulated robots (threads, bounded request counts and time) each
stick to one replica; a robot sending garbage (nesting bombs included) gets 4xx without
hurting the others; the Prometheus endpoints of the ingress and of every replica are
scraped; and one replica is killed mid-run
(last test: it changes the fleet): its robots either succeed on retry or fail fast with a
clear error, move to the survivor and warm up again; the other robots see no errors.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fleet_fixtures import AUTH, FLEET_KEY, FLEET_KEY_ENV

pytestmark = pytest.mark.ray

REPLICA = "x-vla-replica"
PRUNED = {"method": "vlapruner", "keep_ratio": 0.25}
#: Client-side bound: above the ingress bound (30 s) so a hang would show as a client timeout.
CLIENT_TIMEOUT_S = 45.0


def _frame(side: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def fleet_info(ray_fleet) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{ray_fleet.url}/v1/actions/info", headers=AUTH, timeout=60.0)
    assert r.status_code == 200, r.text
    assert r.headers.get(REPLICA)
    return r.json()


@pytest.fixture(scope="module")
def frame(fleet_info) -> str:
    return _frame(int(fleet_info["image_size"]), 0)


def _body(frame: str, sid: str | None, first: bool = False, **kw: Any) -> dict[str, Any]:
    body = {
        "image": frame,
        "instruction": "pick up the red block",
        "unnorm_key": "tiny_robot",
        "pruning": PRUNED,
        **kw,
    }
    if sid is not None:
        body["session_id"] = sid
    if first:
        body["new_episode"] = True
    return body


@dataclass
class Robot:
    """A robot's log: (status, replica, warmup flag, seconds, error type) per request."""

    sid: str
    log: list[tuple[int, str | None, bool | None, float, str | None]] = field(default_factory=list)

    def ok(self) -> list[tuple[int, str | None, bool | None, float, str | None]]:
        return [e for e in self.log if e[0] == 200]


def _step(client: Any, url: str, robot: Robot, frame: str, first: bool, header: bool) -> None:
    import httpx

    headers = {"X-Session-ID": robot.sid} if header else {}
    body = _body(frame, None if header else robot.sid, first)
    t0 = time.monotonic()
    try:
        r = client.post(f"{url}/v1/actions", json=body, headers=headers, timeout=CLIENT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        robot.log.append((-1, None, None, time.monotonic() - t0, type(exc).__name__))
        return
    dt = time.monotonic() - t0
    if r.status_code == 200:
        out = r.json()
        assert out["session_id"] == robot.sid
        robot.log.append((200, r.headers.get(REPLICA), out["pruning"]["warmup"], dt, None))
    else:
        err = r.json()["error"]  # every failure has the error shape
        robot.log.append((r.status_code, r.headers.get(REPLICA), None, dt, err["type"]))


def _drive(url: str, robots: list[Robot], frame: str, stop: threading.Event, max_steps: int,
           period_s: float = 0.05) -> list[threading.Thread]:  # fmt: skip
    """One thread per robot, each a sequential control loop until ``stop`` or max_steps."""
    import httpx

    def loop(robot: Robot, header: bool) -> None:
        with httpx.Client(headers=AUTH) as client:
            for i in range(max_steps):
                if stop.is_set():
                    return
                _step(client, url, robot, frame, first=not robot.log and i == 0, header=header)
                time.sleep(period_s)

    threads = [
        threading.Thread(target=loop, args=(r, i % 2 == 0), daemon=True)
        for i, r in enumerate(robots)
    ]
    for t in threads:
        t.start()
    return threads


def _scrape(url: str) -> str:
    import httpx

    r = httpx.get(url, timeout=10.0)
    assert r.status_code == 200
    return r.text


def _value(text: str, name: str, labels: str = "") -> float:
    """Sum of a metric's samples whose label set contains ``labels`` (e.g. 'status="200"')."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def _replicas(url: str) -> dict[str, dict[str, Any]]:
    import httpx

    reps = httpx.get(f"{url}/v1/fleet/replicas", headers=AUTH, timeout=10.0).json()["replicas"]
    return {r["replica"]: r for r in reps}


def _pick_robots(url: str, frame: str, per_replica: int, prefix: str) -> dict[str, list[Robot]]:
    """Probe session ids until ``per_replica`` robots live on each replica (bounded)."""
    import httpx

    by_rep: dict[str, list[Robot]] = defaultdict(list)
    with httpx.Client(headers=AUTH) as client:
        for i in range(60):
            robot = Robot(f"{prefix}-{i}")
            _step(client, url, robot, frame, first=True, header=False)
            status, rep = robot.log[0][0], robot.log[0][1]
            assert status == 200, robot.log
            if len(by_rep[rep]) < per_replica:
                by_rep[rep].append(robot)
            if len(by_rep) >= 2 and all(len(v) >= per_replica for v in by_rep.values()):
                break
    assert len(by_rep) == 2, f"sessions did not spread over both replicas: {dict(by_rep)}"
    return by_rep


# ----------------------------------------------------------------------------- tests


def test_fleet_routes_and_metrics_discovery(ray_fleet, fleet_info) -> None:
    import httpx

    assert httpx.get(f"{ray_fleet.url}/health", timeout=10.0).status_code == 200
    assert fleet_info["visual_tokens"] > 0 and "vlapruner" in fleet_info["pruners"]
    reps = _replicas(ray_fleet.url)
    assert len(reps) == 2
    # Loopback only: the private Ray's node and the replicas' metrics servers.
    assert all(r["node_ip"] == "127.0.0.1" for r in reps.values()), reps
    assert all(r["metrics_url"].startswith("http://127.0.0.1:") for r in reps.values()), reps
    targets = httpx.get(
        f"{ray_fleet.url}/v1/fleet/metrics_targets", headers=AUTH, timeout=10.0
    ).json()
    assert len(targets) == 2 and all(t["targets"] for t in targets)


def test_api_key_guards_all_but_health_and_metrics(ray_fleet, frame) -> None:
    """vLLM's --api-key semantics on the real ingress: Bearer key or 401 in the error shape."""
    import httpx

    url = ray_fleet.url
    guarded = [
        ("POST", "/v1/actions", {"json": _body(frame, "auth-robot")}),
        ("GET", "/v1/actions/info", {}),
        ("GET", "/v1/fleet/replicas", {}),
        ("GET", "/v1/fleet/metrics_targets", {}),
        ("GET", "/v1/fleet/sessions", {}),
        ("GET", "/v1/no/such/route", {}),
    ]
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {FLEET_KEY}"},
             {"Authorization": FLEET_KEY}, {"X-API-Key": FLEET_KEY}]  # fmt: skip
    with httpx.Client(timeout=CLIENT_TIMEOUT_S) as client:
        for method, path, kw in guarded:
            for headers in wrong:
                r = client.request(method, f"{url}{path}", headers=headers, **kw)
                assert r.status_code == 401, (path, headers, r.text[:200])
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.headers.get(REPLICA) == "ingress"
                assert r.json()["error"]["type"] == "unauthorized"
        for path in ("/health", "/metrics"):
            assert client.get(f"{url}{path}").status_code == 200, path
        # The key opens the same routes; the scheme is case-insensitive, as in vLLM.
        r = client.post(f"{url}/v1/actions", json=_body(frame, "auth-robot"), headers=AUTH)
        assert r.status_code == 200, r.text[:300]
        lower = {"Authorization": f"bearer {FLEET_KEY}"}
        assert client.get(f"{url}/v1/fleet/sessions", headers=lower).status_code == 200
    ingress = _scrape(f"{url}/metrics")
    assert _value(ingress, "vla_ingress_errors_total", 'type="unauthorized"') >= 30
    # Unknown paths share one label: a scanner cannot add series.
    assert 'route="/v1/no/such/route"' not in ingress


def test_fleet_status_cli_sends_the_key(ray_fleet, tmp_path, monkeypatch, capsys) -> None:
    """``vla-pruner fleet status`` reads the key from the config's variable."""
    import json

    from vllm_vla_pruner.serve.fleet import main

    cfg = ray_fleet.config.model_dump(mode="json")
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.delenv(FLEET_KEY_ENV, raising=False)
    assert main(["status", str(path)]) == 1
    assert "unauthorized" in capsys.readouterr().out
    monkeypatch.setenv(FLEET_KEY_ENV, FLEET_KEY)
    assert main(["status", str(path)]) == 0
    assert len(json.loads(capsys.readouterr().out)["replicas"]) == 2


def test_robots_stick_to_one_replica_and_warm_up(ray_fleet, frame) -> None:
    url = ray_fleet.url
    by_rep = _pick_robots(url, frame, per_replica=2, prefix="stick")
    robots = [r for rs in by_rep.values() for r in rs]
    stop = threading.Event()
    threads = _drive(url, robots, frame, stop, max_steps=6)
    for t in threads:
        t.join(120.0)
    assert not any(t.is_alive() for t in threads), "a robot hung"
    for rep, rs in by_rep.items():
        for robot in rs:
            assert len(robot.log) == 7, robot.log
            assert all(e[0] == 200 for e in robot.log), robot.log
            assert {e[1] for e in robot.log} == {rep}, f"{robot.sid} changed replica"
            # vlapruner: window (3) warm-up frames from the new episode on, then pruned.
            assert [e[2] for e in robot.log] == [True] * 3 + [False] * 4, robot.log
    sessions = __import__("httpx").get(f"{url}/v1/fleet/sessions", headers=AUTH, timeout=10.0)
    sessions = sessions.json()
    for rep, rs in by_rep.items():
        for robot in rs:
            assert sessions[robot.sid]["replica"] == rep


def test_garbage_robot_gets_4xx_and_others_do_not_suffer(ray_fleet, frame) -> None:
    import httpx

    url = ray_fleet.url
    good = [Robot(f"good-{i}") for i in range(3)]
    stop = threading.Event()
    threads = _drive(url, good, frame, stop, max_steps=8)
    bad_png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    garbage: list[tuple[dict[str, Any], Any]] = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"json": [1, 2, 3]}, 422),
        ({"json": {"instruction": "x"}}, 422),
        ({"json": _body("!!!not-base64!!!", "bad-robot")}, 422),
        ({"json": _body(bad_png, "bad-robot")}, 422),
        ({"json": _body(frame, "bad-robot", pruning={"keep_ratio": 7})}, 422),
        ({"json": _body(frame, "bad-robot", unnorm_key="no_such_robot")}, 422),
        ({"json": {**_body(frame, "bad-robot"), "colour": "red"}}, 422),
        ({"json": _body(frame, None), "headers": {"X-Session-ID": "r" * 300}}, 422),
        ({"content": b"x" * (9 << 20), "headers": {"content-type": "application/json"}}, 413),
        ({"content": b"[" * 100_000 + b"]" * 100_000}, 400),  # nesting bombs: 400, not 500
        ({"content": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}, 400),
        ({"content": b'{"instruction": "x", "pruning": ' + b"[" * 70 + b"]" * 70 + b"}"}, 400),
    ]
    with httpx.Client(headers=AUTH) as client:
        for _ in range(2):
            for kwargs, status in garbage:
                r = client.post(f"{url}/v1/actions", timeout=CLIENT_TIMEOUT_S, **kwargs)
                assert r.status_code == status, (kwargs.get("json", "raw"), r.text[:300])
                assert r.headers.get(REPLICA), "every response names who answered"
                assert "error" in r.json() and r.json()["error"]["message"]
                if status == 400 and b"pruning" in kwargs.get("content", b""):
                    assert r.json()["error"]["field"] == "pruning", r.text[:300]
    for t in threads:
        t.join(120.0)
    assert not any(t.is_alive() for t in threads)
    for robot in good:
        assert robot.log and all(e[0] == 200 for e in robot.log), robot.log
        assert len({e[1] for e in robot.log}) == 1


def test_metrics_endpoints_move(ray_fleet, frame) -> None:
    url = ray_fleet.url
    reps = _replicas(url)
    time.sleep(1.5)  # at least two worker-report polls since the last requests
    ingress = _scrape(f"{url}/metrics")
    ok = 'route="/v1/actions",status="200"'
    assert _value(ingress, "vla_ingress_requests_total", ok) >= 20
    assert _value(ingress, "vla_ingress_requests_total", 'status="422"') >= 2
    assert _value(ingress, "vla_ingress_errors_total", 'status="400"') >= 1
    assert _value(ingress, "vla_ingress_request_latency_seconds_count") >= 20
    assert _value(ingress, "vla_ingress_active_sessions") >= 4
    served = 0.0
    for rep in reps.values():
        text = _scrape(rep["metrics_url"])
        assert f'vla_replica_info{{replica="{rep["replica"]}"}} 1.0' in text
        n = _value(text, "vla_replica_requests_total", 'status="200"')
        assert n > 0, f"replica {rep['replica']} served nothing"
        served += n
        assert _value(text, "vla_visual_tokens_total") > _value(text, "vla_visual_tokens_kept")
        assert _value(text, "vla_flops_saved_total") > 0
        assert _value(text, "vla_warmup_frames_total") > 0
        assert _value(text, "vla_worker_warmup_frames_total") > 0
        assert _value(text, "vla_worker_select_seconds_total") > 0
        assert _value(text, "vla_replica_request_latency_seconds_count") > 0
        assert _value(text, "vla_replica_active_sessions") > 0
    assert served >= _value(ingress, "vla_ingress_requests_total", ok)


def test_replica_kill_reroutes_with_warmup(ray_fleet, frame) -> None:
    import ray

    url = ray_fleet.url
    by_rep = _pick_robots(url, frame, per_replica=2, prefix="kill")
    victim, survivor = sorted(by_rep)
    victim_actor = _replicas(url)[victim]["actor_name"]
    robots = [r for rs in by_rep.values() for r in rs]
    stop = threading.Event()
    # Back-to-back requests: the kill finds requests in flight on the victim.
    threads = _drive(url, robots, frame, stop, max_steps=200, period_s=0.0)
    time.sleep(3.0)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim_actor, namespace="serve"), no_restart=True)
    time.sleep(12.0)
    stop.set()
    for t in threads:
        t.join(CLIENT_TIMEOUT_S + 15.0)
    assert not any(t.is_alive() for t in threads), "a robot hung after the kill"

    for robot in by_rep[survivor]:
        assert robot.log and all(e[0] == 200 for e in robot.log), robot.log
        assert {e[1] for e in robot.log} == {survivor}
    for robot in by_rep[victim]:
        for status, _rep, _, secs, err in robot.log:
            # In flight on the dead replica: retried elsewhere (200) or a fast, clear error.
            assert secs < 31.0, robot.log
            if status != 200:
                assert status in (502, 503, 504) and err, robot.log
        oks = robot.ok()
        moved = [i for i, e in enumerate(oks) if e[1] != victim]
        assert moved, f"{robot.sid} never served after the kill: {robot.log}"
        first = moved[0]
        assert first >= 1 and all(e[1] == victim for e in oks[:first]), robot.log
        # The first frame on the new replica restarts the temporal history: warm-up ...
        assert oks[first][2] is True, robot.log
        # ... and once moved, the robot is never served by the dead replica again.
        assert all(e[1] != victim for e in oks[first:]), robot.log
    assert time.monotonic() - t_kill < 120.0

    ingress = _scrape(f"{url}/metrics")
    assert _value(ingress, "vla_ingress_session_reroutes_total") >= len(by_rep[victim])
    retried = _value(ingress, "vla_ingress_retries_total")
    failed = sum(1 for r in by_rep[victim] for e in r.log if e[0] != 200)
    print(f"\n[kill] victim robots: {failed} failed fast, {retried:g} ingress retries")
    assert victim not in _replicas(url)
