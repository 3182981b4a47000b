"""``vla-pruner bench openpi``: N concurrent openpi robots against one engine, batched vs serial.

openpi's own policy server runs one inference at a time. This benchmark drives a real
``vla-pruner serve`` with N = 1, 2, 4, 8, 16 concurrent ``openpi-client`` robots
(``WebsocketClientPolicy``, each its own connection and robot episode) and measures the
throughput (actions per second, all robots) and the p95 latency of one ``infer`` call, for
the server as it runs (the engine batches the robots' requests) and for the same engine
limited to one request at a time (``--max-num-seqs 1``: what openpi's server does), each
pruned and unpruned (per connection, ``?method=...&keep_ratio=...``). The two servers run one
after the other (never both: they would share the CPU). Writes ``openpi.json``,
``openpi.md`` and ``openpi.png``.

Frames are random images of the model's input size; clients run on the same machine as the
server, so on a small CPU box they take some of its time (stated in the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vllm_vla_pruner.research.ports import free_port

PROMPT = "press the handle down"


class Server:
    """``vla-pruner serve`` in its own process group, waited for and stopped."""

    def __init__(self, model: str, extra: Sequence[str], log: Path) -> None:
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm_vla_pruner.cli", "serve", model]
        cmd += ["--port", str(self.port), "--host", "127.0.0.1", *extra]
        self.log = open(log, "wb")  # noqa: SIM115 - open for the server's lifetime
        env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_PLUGINS="vla_pruner")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 900:
                self.stop()
                raise RuntimeError(f"server not healthy after 900 s; see {log}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.log.close()


def _frames(n: int, side: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def run_clients(
    port: int, n_clients: int, requests: int, query: str, side: int, warmup: int = 3
) -> dict[str, Any]:
    """N robots in threads, each ``warmup`` untimed then ``requests`` timed infer calls (3:
    VLA-Pruner's warm-up window, so every timed frame of a pruned robot is pruned)."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policies = [
        WebsocketClientPolicy(f"ws://127.0.0.1:{port}/openpi?{query}") for _ in range(n_clients)
    ]
    frames = _frames(8, side, seed=n_clients)
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    kept: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_clients + 1)

    def robot(i: int) -> None:
        try:
            policy = policies[i]
            for k in range(warmup):
                policy.infer({"observation/image": frames[k % 8], "prompt": PROMPT})
            barrier.wait()
            for k in range(requests):
                t0 = time.perf_counter()
                out = policy.infer({"observation/image": frames[(i + k) % 8], "prompt": PROMPT})
                latencies[i].append(time.perf_counter() - t0)
                kept.append(int(out["pruning"]["visual_tokens_kept"] or 0))
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for p in policies:
        p._ws.close()
    if errors:
        raise RuntimeError(f"a robot failed: {errors[0]!r}")
    flat = np.array([x for lat in latencies for x in lat]) * 1e3
    return {
        "clients": n_clients,
        "actions": int(flat.size),
        "wall_s": round(wall, 3),
        "actions_per_s": round(flat.size / wall, 2),
        "p50_ms": round(float(np.percentile(flat, 50)), 1),
        "p95_ms": round(float(np.percentile(flat, 95)), 1),
        "mean_kept_tokens": round(float(np.mean(kept)), 1),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| server | pruning | N robots | actions/s | p50 ms | p95 ms | kept tokens | load1 |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['server']} | {r['pruning']} | {r['clients']} | {r['actions_per_s']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_kept_tokens']:.0f} | {r['load1']} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for server in ("batched", "serial"):
        for pruning in sorted({r["pruning"] for r in rows}):
            sel = [r for r in rows if r["server"] == server and r["pruning"] == pruning]
            if not sel:
                continue
            xs = [r["clients"] for r in sel]
            style = "-" if server == "batched" else "--"
            label = f"{server}, {pruning}"
            ax1.plot(xs, [r["actions_per_s"] for r in sel], style, marker="o", label=label)
            ax2.plot(xs, [r["p95_ms"] for r in sel], style, marker="o", label=label)
    for ax, title in ((ax1, "throughput (actions/s)"), (ax2, "p95 latency of infer (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent openpi robots")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_vla_pruner.config import image_size, load_config_json
    from vllm_vla_pruner.research.sim.benchmark import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="vla-pruner bench openpi", description=__doc__)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--requests", type=int, default=20, help="timed infer calls per robot")
    p.add_argument("--method", default="vlapruner")
    p.add_argument("--keep-ratio", type=float, default=0.25)
    p.add_argument("--out", default="benchmarks/results/openpi")
    a = p.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    side = image_size(load_config_json(a.model))
    settings = {
        "unpruned": "method=none",
        f"{a.method}@{a.keep_ratio:g}": f"method={a.method}&keep_ratio={a.keep_ratio}",
    }
    logs = Path(tempfile.mkdtemp(prefix="vla-bench-openpi-"))  # not results: machine-specific
    print(f"server logs in {logs}", flush=True)
    rows: list[dict[str, Any]] = []
    starts = {}
    for server, extra in (("batched", []), ("serial", ["--max-num-seqs", "1"])):
        srv = Server(a.model, extra, logs / f"server-{server}.log")
        starts[server] = round(srv.start_s, 1)
        try:
            for pruning, query in settings.items():
                for n in clients:
                    row = run_clients(srv.port, n, a.requests, query, side)
                    row.update(server=server, pruning=pruning, load1=round(os.getloadavg()[0], 2))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            srv.stop()
    try:  # results name the model by its repository path, not this machine's
        model_name = str(Path(a.model).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        model_name = Path(a.model).name
    result = {
        "model": model_name,
        "requests_per_robot": a.requests,
        "servers": {
            "batched": "vla-pruner serve (defaults: the engine batches concurrent robots)",
            "serial": "the same with --max-num-seqs 1 (one request at a time, as openpi's server)",
        },
        "server_start_s": starts,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (clients on the same machine)",
        "note": "load1 per row: the 1-minute load average after it (other work shares the CPU)",
        "rows": rows,
    }
    (out / "openpi.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"# openpi robots against one engine\n\n`vla-pruner bench openpi` on {result['machine']};"
        f" model `{model_name}`, {a.requests} timed `infer` calls per robot after 3 untimed"
        " ones (VLA-Pruner's warm-up window).\n"
        "batched: `vla-pruner serve` as shipped; serial: the same engine with `--max-num-seqs 1`"
        " (what openpi's server does). load1: the machine's 1-minute load average after the"
        " row (other processes share the CPU; on a 2-core box above 2 means contention).\n\n"
        + _table(rows)
        + "\n"
    )
    (out / "openpi.md").write_text(md)
    _plot(rows, out / "openpi.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
