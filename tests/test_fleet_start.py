"""How ``vla-pruner fleet up`` fails to start: a taken HTTP port is refused by name before
Ray starts, and a start that fails after Ray started (here: no replica healthy within
``--start-timeout``) says so in one line and takes that Ray down again. (A CI run once lost
Serve's proxy port, left its Ray running, and the next fleet in the process joined it and
waited 15 minutes on a port nobody served.) Both run the CLI in this process, so the test
can see whether Ray is left initialized."""

from __future__ import annotations

import json
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
    assert "vla-pruner fleet: fleet at http://127.0.0.1:" in out and "not healthy" in out
    assert not ray.is_initialized()
