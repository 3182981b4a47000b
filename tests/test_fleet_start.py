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
from pathlib import Path

import pytest

from tests.fleet_fixtures import FLEET_KEY, FLEET_KEY_ENV, fleet_test_config
from vllm_vla_pruner.research.ports import free_port


def _config_file(tmp_path: Path, ckpt: Path, port: int) -> str:
    cfg = fleet_test_config("start-test", ckpt, replicas=1, http={"port": port})
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return str(path)


def test_taken_http_port_is_refused_before_ray_starts(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import main

    monkeypatch.setenv(FLEET_KEY_ENV, FLEET_KEY)
    assert not ray.is_initialized()
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        assert main(["up", _config_file(tmp_path, tiny_ckpt, port)]) == 2
    out = capsys.readouterr().out
    assert f"http.port: cannot listen on 127.0.0.1:{port}" in out and "in use" in out
    assert not ray.is_initialized()


@pytest.mark.ray
def test_failed_start_says_so_and_takes_down_the_ray_it_started(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import main

    monkeypatch.setenv(FLEET_KEY_ENV, FLEET_KEY)
    assert not ray.is_initialized()
    config = _config_file(tmp_path, tiny_ckpt, free_port())
    assert main(["up", config, "--start-timeout", "0"]) == 1
    out = capsys.readouterr().out
    assert "vla-pruner fleet: start-test: replicas not running (still DEPLOYING)" in out
    assert "(waited 0 s)" in out
    assert not ray.is_initialized()


@pytest.mark.ray
def test_replica_that_cannot_start_fails_the_start_in_one_line(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A checkpoint whose weights file is cut short: Serve gives up on the replica after its
    constructor retries, and the command names the error instead of printing a traceback."""
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import main

    broken = shutil.copytree(tiny_ckpt, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    monkeypatch.setenv(FLEET_KEY_ENV, FLEET_KEY)
    # One constructor attempt instead of Serve's three (read by the controller, which the
    # Ray started here inherits this environment into).
    monkeypatch.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    config = _config_file(tmp_path, broken, free_port())
    assert main(["up", config, "--start-timeout", "600"]) == 1
    out = capsys.readouterr().out
    assert "vla-pruner fleet: start-test: deploying failed: VLAEngine: " in out, out[-2000:]
    assert "worker-*.err" in out
    assert "Traceback" not in out
    assert not ray.is_initialized()
