"""How a fleet start fails: a taken HTTP port is refused by name before Ray starts, and a
start that fails after Ray started takes that Ray down again (a CI run once lost Serve's
proxy port, left its Ray running, and the next fleet in the process joined it and waited
15 minutes on a port nobody served)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.fleet_fixtures import FLEET_KEY, FLEET_KEY_ENV, fleet_test_config
from vllm_vla_pruner.research.ports import free_port
from vllm_vla_pruner.serve.config import FleetConfigError


def test_taken_http_port_is_refused_before_ray_starts(tiny_ckpt: Path) -> None:
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import start_fleet

    assert not ray.is_initialized()
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        cfg = fleet_test_config("taken-port", tiny_ckpt, replicas=1, http={"port": port})
        with pytest.raises(
            FleetConfigError, match=rf"http\.port: cannot listen on 127\.0\.0\.1:{port}"
        ):
            start_fleet(cfg, environ={FLEET_KEY_ENV: FLEET_KEY})
    assert not ray.is_initialized()


@pytest.mark.ray
def test_failed_start_takes_down_the_ray_it_started(tiny_ckpt: Path) -> None:
    ray = pytest.importorskip("ray")
    from vllm_vla_pruner.serve.fleet import start_fleet

    assert not ray.is_initialized()
    cfg = fleet_test_config("no-time", tiny_ckpt, replicas=1, http={"port": free_port()})
    with pytest.raises(TimeoutError, match="not healthy"):
        start_fleet(cfg, timeout_s=0.0, environ={FLEET_KEY_ENV: FLEET_KEY})
    assert not ray.is_initialized()
