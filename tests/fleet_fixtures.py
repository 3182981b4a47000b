"""One two-replica Ray Serve fleet on the ``tiny`` checkpoint per test module (and, for the
chunk form, a one-replica fleet on ``tiny-oft``).

Imported by ``tests/conftest.py``. Ray is imported only when a test asks for the fleet, so
the rest of the suite does not pay for it. The pytest process is the Ray driver (a private,
loopback-only local Ray), which lets tests find and ``ray.kill`` replica actors.

The fleet runs with an API key (from a test-only variable, handed to ``start_fleet`` rather
than set in this process's environment), so every fleet test also exercises the guard;
clients send :data:`AUTH`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vllm_vla_pruner.research.ports import free_port

__all__ = ["AUTH", "FLEET_KEY", "FLEET_KEY_ENV", "fleet_test_config", "ray_fleet", "ray_fleet_oft"]

FLEET_KEY_ENV = "VLA_TEST_FLEET_API_KEY"
FLEET_KEY = "test-fleet-key-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {FLEET_KEY}"}


@pytest.fixture(scope="module")
def ray_fleet(tiny_ckpt: Path) -> Iterator[object]:
    """A started ``Fleet``: 2 engine replicas, fast health checks, API key :data:`FLEET_KEY`."""
    pytest.importorskip("ray.serve")
    with _running_fleet("test-fleet", tiny_ckpt, replicas=2) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def ray_fleet_oft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A one-replica fleet on a ``tiny-oft`` checkpoint (seed 7), same settings and key as
    ``ray_fleet``. Its own Ray: deployed beside ``ray_fleet`` (three engines at once) it had
    Ray's memory monitor kill the Serve controller on a 23 GB machine shared with other work."""
    pytest.importorskip("ray.serve")
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    ckpt = build_checkpoint("tiny-oft", tmp_path_factory.mktemp("tiny_oft_fleet"), seed=7)
    with _running_fleet("test-fleet-oft", ckpt, replicas=1) as fleet:
        yield fleet


@contextmanager
def _running_fleet(name: str, ckpt: Path, replicas: int) -> Iterator[object]:
    """A fleet started with the test config and key, stopped on exit."""
    from vllm_vla_pruner.serve.fleet import start_fleet, stop_fleet

    cfg = fleet_test_config(name, ckpt, replicas=replicas, http={"port": free_port()})
    t0 = time.perf_counter()
    fleet = start_fleet(cfg, timeout_s=900.0, environ={FLEET_KEY_ENV: FLEET_KEY})
    print(f"\n[{name}] {replicas}-replica fleet ready in {time.perf_counter() - t0:.1f} s")
    try:
        yield fleet
    finally:
        stop_fleet(fleet)


def fleet_test_config(name: str, ckpt: Path, replicas: int, http: dict) -> object:
    """The test fleets' config: fast health checks, bounded requests, the test key."""
    from vllm_vla_pruner.serve.config import parse_config

    return parse_config(
        {
            "name": name,
            "model": {"path": str(ckpt)},
            "replicas": replicas,
            "replica": {
                "num_cpus": 1,
                "max_ongoing_requests": 16,
                "health_check_period_s": 1.0,
                "graceful_shutdown_timeout_s": 2.0,
            },
            "routing": {"num_fallback_replicas": 1},
            "ingress": {"request_timeout_s": 30.0, "max_attempts": 3},
            "http": http,
            "metrics": {"report_interval_s": 0.5},
            "ray": {"num_cpus": 4},
            "auth": {"api_key_env": FLEET_KEY_ENV},
        }
    )
