"""Whether a server can listen on an address, asked before a slow start.

vLLM's server and Ray Serve's proxy bind their port only after seconds (vLLM) to a minute
(Serve: inside an actor) of start-up, and report a taken port as a traceback from deep
inside. ``serve`` and ``fleet up`` ask here first, so the user gets one line naming the port.
"""

from __future__ import annotations

import socket

__all__ = ["listen_error"]


def listen_error(host: str | None, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else why not (e.g. "Address already in use").

    Binds with ``SO_REUSEADDR`` like the servers do (a port in TIME_WAIT is free for them);
    port 0 (any free port) is always available. ``host`` None or "" means all interfaces.
    """
    if port == 0:
        return None
    host = host or ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
