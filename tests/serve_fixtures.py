"""One real ``vla-pruner serve`` per test session, shared by every end-to-end test.

Imported by ``tests/conftest.py`` (``from tests.serve_fixtures import *``). The server is a
subprocess started exactly as a user would (``python -m vllm_vla_pruner.cli serve CKPT``) on
a free loopback port; the fixture waits for ``/health`` (bounded), and kills the whole
process group at the end (the engine core and workers are its children). The engine start
time is printed in pytest's terminal summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_vla_pruner.research.ports import free_port

__all__ = ["VlaServer", "pytest_terminal_summary", "traced_server", "vla_server"]

REPO = Path(__file__).resolve().parents[1]
#: Upper bound for engine start on a loaded 2-core machine (a tiny model takes ~15-40 s).
START_TIMEOUT_S = float(os.environ.get("VLA_TEST_SERVER_START_TIMEOUT_S", "600"))
_timings: dict[str, float] = {}


@dataclass(frozen=True)
class VlaServer:
    """A running server: where it listens, what it serves, how long it took to start."""

    base_url: str
    model: str
    model_dir: Path
    log_path: Path
    start_s: float
    process: subprocess.Popen

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL the server's own process group."""
    if proc.poll() is not None:
        return
    pgid = os.getpgid(proc.pid)
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Workers may outlive the parent for a moment; the group is ours alone.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_server(model_dir: Path, log_path: Path, extra_args: list[str] | None = None) -> VlaServer:
    """Start ``vla-pruner serve`` and return once /health answers (or fail with the log)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "vllm_vla_pruner.cli",
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *(extra_args or []),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = VlaServer(url, str(model_dir), Path(model_dir), log_path, 0.0, proc)
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(
                f"server exited with {proc.returncode} before /health; log:\n{server.log_tail()}"
            )
        if _healthy(url):
            break
        if time.perf_counter() - t0 > START_TIMEOUT_S:
            _stop(proc)
            log.close()
            pytest.fail(
                f"server not healthy after {START_TIMEOUT_S:.0f} s; log:\n{server.log_tail()}"
            )
        time.sleep(0.5)
    start_s = time.perf_counter() - t0
    return VlaServer(url, str(model_dir), Path(model_dir), log_path, start_s, proc)


@contextmanager
def traced_server(model_dir: Path, tmp: Path, pruning: dict) -> Iterator[tuple[VlaServer, Path]]:
    """A server on ``model_dir`` with the engine settings ``pruning`` (``--additional-config``
    ``vla_pruner``), its worker tracing every kept set to ``tmp/pruning.jsonl`` (for the
    oracle), stopped on exit; yields (server, trace path)."""
    from tests.engine_fixtures import pruning_trace

    trace = tmp / "pruning.jsonl"
    args = ["--additional-config", json.dumps({"vla_pruner": pruning})]
    with pruning_trace(trace):  # inherited by the server's worker
        srv = start_server(model_dir, tmp / "server.log", args)
    try:
        yield srv, trace
    finally:
        _stop(srv.process)


@pytest.fixture(scope="module")
def vla_server(tiny_ckpt, tmp_path_factory) -> Iterator[VlaServer]:
    """The session's server on the tiny checkpoint (fixture ``tiny_ckpt`` from conftest)."""
    log_path = tmp_path_factory.mktemp("vla_server") / "server.log"
    server = start_server(Path(tiny_ckpt), log_path)
    _timings["engine_start_s"] = server.start_s
    print(f"\n[vla_server] engine + API server ready in {server.start_s:.1f} s ({server.base_url})")
    try:
        yield server
    finally:
        _stop(server.process)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the engine start time (wanted for the closing note) after the test results."""
    if "engine_start_s" in _timings:
        terminalreporter.write_sep("-", "vla-pruner server")
        terminalreporter.write_line(
            f"engine start (spawn to /health 200, tiny preset): {_timings['engine_start_s']:.1f} s"
        )
