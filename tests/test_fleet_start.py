"""How ``vla-pruner fleet up`` fails to start: a taken HTTP port is refused by name before
Ray starts, and a start that fails after Ray started (no replica running within
``--start-timeout``; a replica whose engine cannot start) says so in one line and takes that
Ray down again. (A CI run once lost Serve's proxy port, left its Ray running, and the next
fleet in the process joined it and waited 15 minutes on a port nobody served.) The tests run
the CLI in this process, so they can see whether Ray is left initialized."""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fleet_fixtures import FLEET_KEY, FLEET_KEY_ENV, fleet_test_config
from vllm_vla_pruner.research.ports import free_port


@pytest.fixture
def fleet_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Callable[..., tuple]:
    """``vla-pruner fleet up`` in this process on a one-replica test config of a checkpoint
    and port, with the test key: (exit code, printed output). Ray must not be running before
    the command nor after it, whatever its outcome."""
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import main

    monkeypatch.setenv(FLEET_KEY_ENV, FLEET_KEY)

    def run(ckpt: Path, port: int, *flags: str) -> tuple[int, str]:
        assert not ray.is_initialized()
        cfg = fleet_test_config("start-test", ckpt, replicas=1, http={"port": port})
        path = tmp_path / "fleet.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json")))
        code = main(["up", str(path), *flags])
        out = capsys.readouterr().out
        assert not ray.is_initialized()
        return code, out

    return run


def test_taken_http_port_is_refused_before_ray_starts(tiny_ckpt: Path, fleet_up) -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        code, out = fleet_up(tiny_ckpt, port)
    assert code == 2
    assert f"http.port: cannot listen on 127.0.0.1:{port}" in out and "in use" in out


@pytest.mark.ray
def test_failed_start_says_so_and_takes_down_the_ray_it_started(tiny_ckpt: Path, fleet_up) -> None:
    code, out = fleet_up(tiny_ckpt, free_port(), "--start-timeout", "0")
    assert code == 1
    assert "vla-pruner fleet: start-test: replicas not running (still DEPLOYING)" in out
    assert "(waited 0 s)" in out


@pytest.mark.ray
def test_replica_that_cannot_start_fails_the_start_in_one_line(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fleet_up
) -> None:
    """A checkpoint whose weights file is cut short: Serve gives up on the replica after its
    constructor retries, and the command names the error instead of printing a traceback."""
    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    # One constructor attempt instead of Serve's three (read by the controller, which the
    # Ray started here inherits this environment into).
    monkeypatch.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    code, out = fleet_up(broken, free_port(), "--start-timeout", "600")
    assert code == 1
    assert "vla-pruner fleet: start-test: deploying failed: VLAEngine: " in out, out[-2000:]
    assert "worker-*.err" in out
    assert "Traceback" not in out
