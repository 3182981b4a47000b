"""openpi robots on the Ray fleet: the real ``openpi-client`` against the fleet's ingress.

The two-replica fleet of ``tests/fleet_fixtures.py`` (tiny checkpoint, API key). Each
connection is one robot episode, kept on its session's replica as HTTP robots are; a robot
whose replica is killed is answered on the survivor (history restarted) or gets the error
frame, never a hung connection.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.fleet_fixtures import AUTH, FLEET_KEY

pytestmark = pytest.mark.ray

QUERY = "unnorm_key=tiny_robot&method=vlapruner&keep_ratio=0.25"


def _ws(url: str, path: str = "/") -> str:
    return url.replace("http://", "ws://") + path + "?" + QUERY


def _obs(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"observation/image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "prompt": "go"}


def _sessions(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/fleet/sessions", headers=AUTH, timeout=10.0).json()


def test_openpi_robots_stick_to_replicas(ray_fleet) -> None:
    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    from websockets.exceptions import InvalidStatus

    url = ray_fleet.url
    assert httpx.get(f"{url}/healthz", timeout=10.0).status_code == 200  # open, as /health
    with pytest.raises(InvalidStatus):
        WebsocketClientPolicy(_ws(url))  # no key: refused before the metadata frame
    robots = [
        WebsocketClientPolicy(_ws(url, "/" if i % 2 else "/openpi"), api_key=FLEET_KEY)
        for i in range(4)
    ]
    sids = [r.get_server_metadata()["session_id"] for r in robots]
    assert len(set(sids)) == 4
    assert robots[0].get_server_metadata()["action"]["unnorm_key"] == "tiny_robot"
    warmups: dict[str, list[bool]] = {s: [] for s in sids}
    for step in range(5):
        for robot, sid in zip(robots, sids):
            out = robot.infer(_obs(step))
            assert out["actions"].shape[0] == 1 and np.all(np.isfinite(out["actions"]))
            assert out["session_id"] == sid
            warmups[sid].append(out["pruning"]["warmup"])
    table = _sessions(url)
    for sid in sids:
        assert table[sid]["requests"] == 5 and table[sid]["replica"], table[sid]
        assert warmups[sid] == [True] * 3 + [False] * 2, warmups[sid]  # one episode, one replica
    with pytest.raises(RuntimeError, match="observation/image: missing"):
        robots[0].infer({"prompt": "go"})
    assert robots[1].infer(_obs(9))["actions"].shape[0] == 1  # the others go on


def test_openpi_robot_survives_replica_kill(ray_fleet) -> None:
    import ray
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    url = ray_fleet.url
    robot = WebsocketClientPolicy(_ws(url), api_key=FLEET_KEY)
    sid = robot.get_server_metadata()["session_id"]
    for step in range(4):
        robot.infer(_obs(step))
    victim = _sessions(url)[sid]["replica"]
    reps = httpx.get(f"{url}/v1/fleet/replicas", headers=AUTH, timeout=10.0).json()["replicas"]
    actor = {r["replica"]: r["actor_name"] for r in reps}[victim]
    ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)

    outcome: dict[str, Any] = {}

    def next_frame() -> None:
        t0 = time.monotonic()
        try:
            outcome["reply"] = robot.infer(_obs(99))
        except Exception as exc:  # noqa: BLE001 - the error frame or a closed connection
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=next_frame)
    t.start()
    t.join(60.0)  # the ingress bound is 30 s: longer means the connection hung
    assert not t.is_alive(), "the openpi connection hung after its replica was killed"
    if "reply" in outcome:
        # Re-routed: the survivor restarts the robot's history (warm-up frame).
        assert outcome["reply"]["pruning"]["warmup"] is True, outcome
        assert _sessions(url)[sid]["replica"] != victim
    else:
        assert isinstance(outcome["error"], RuntimeError), outcome  # the error text frame
    print(f"\n[openpi kill] {sorted(outcome)} after {outcome['seconds']:.1f} s")
