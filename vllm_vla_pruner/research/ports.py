"""A free loopback port for a server a test or a benchmark starts, chosen where nothing else
will take it.

A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, which is also where
Ray's GCS, raylet and agents and vLLM's helper sockets get theirs while the server under
test is still starting: a port picked that way and bound a minute later can be gone (a CI run
lost Serve's proxy to it: "Failed to bind to address"). Ports below the ephemeral range and
above Ray's worker ports (10002-19999) are only ever taken by someone asking for them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

_RAY_WORKER_PORTS_END = 20000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    """A plain bind, stricter than ``listen_check.listen_error`` (which binds as servers do,
    with SO_REUSEADDR): the port also suits a test's own plain socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port that is free now and outside the ephemeral range when there is one."""
    low, high = _RAY_WORKER_PORTS_END, _ephemeral_start()
    for port in random.sample(range(low, high), min(200, max(high - low, 0))):
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no such range here
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
