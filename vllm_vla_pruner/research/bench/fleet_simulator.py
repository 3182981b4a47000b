"""``vla-pruner bench fleet``: a fleet of simulated robots against a running (or started) fleet.

Each robot is a closed control loop at C Hz over real HTTP: at every tick it sends its camera
frame and instruction with its own session id and waits for the action (a robot cannot act
on a frame it has no action for). A reply later than the period is a deadline miss; ticks
that pass while a request is out are lost, which is what lowers the achieved control rate.
Robots start at random phases, as real ones do.

For every robot count in the sweep the pruned (``--method``/``--keep-ratio``) and the
unpruned (``method: none``) fleets run back to back on the same replicas, so both see the same
machine. The first ``--skip-frames`` frames of each robot (temporal warm-up frames run
unpruned, and connection set-up) are left out of the statistics: latency and the achieved
rate are steady-state figures. "Robots at the p95 budget" is the largest robot count the
fleet sustains: p95 within the budget, no errors, and every robot still acting at >= 90% of
C (a closed loop slows down under overload, which would otherwise hide it), read off the
sweep and interpolated between sweep points.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PhaseResult", "configure_cli", "main", "robots_at_budget", "run_cli", "run_sweep"]

MODES = ("unpruned", "pruned")


@dataclass
class RobotResult:
    robot: str
    sent: int = 0
    ok: int = 0
    errors: int = 0
    misses: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    replicas: set[str] = field(default_factory=set)
    warmup_frames: int = 0
    pruned_frames: int = 0
    error_samples: list[str] = field(default_factory=list)
    #: Steady state: from the first measured frame's send time to the end of the phase.
    measured_since: float | None = None
    measured_ok: int = 0
    window_end: float = 0.0

    def achieved_hz(self) -> float:
        """Actions per second in steady state (after the skipped warm-up frames)."""
        if self.measured_since is None:
            return 0.0
        return self.measured_ok / max(1e-9, self.window_end - self.measured_since)


@dataclass
class PhaseResult:
    mode: str
    robots: int
    hz: float
    duration_s: float
    requests: int
    ok: int
    errors: int
    deadline_misses: int
    miss_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    achieved_hz_mean: float
    achieved_hz_min: float
    replicas_used: int
    warmup_frames: int
    pruned_frames: int
    error_samples: list[str]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_frames(side: int, count: int, seed: int) -> list[str]:
    """Smooth random camera frames (PNG, base64): realistic size, cheap to encode once."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = (rng.random((8, 8, 3)) * 255).astype("uint8")
        img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def robot_loop(
    client: Any,
    url: str,
    robot: str,
    session: str,
    frames: list[str],
    *,
    hz: float,
    duration_s: float,
    instruction: str,
    pruning: dict[str, Any],
    unnorm_key: str | None,
    skip_frames: int,
    timeout_s: float,
    phase_s: float,
) -> RobotResult:
    import httpx

    res = RobotResult(robot)
    period = 1.0 / hz
    loop = asyncio.get_running_loop()
    t0 = loop.time() + phase_s
    t_end = t0 + duration_s
    res.window_end = t_end
    k = 0
    frame_no = 0
    while True:
        tick = t0 + k * period
        if tick >= t_end:
            break
        now = loop.time()
        if now < tick:
            await asyncio.sleep(tick - now)
        body: dict[str, Any] = {
            "image": frames[frame_no % len(frames)],
            "instruction": instruction,
            "session_id": session,
            "new_episode": frame_no == 0,
            "pruning": pruning,
        }
        if unnorm_key:
            body["unnorm_key"] = unnorm_key
        t_send = loop.time()
        res.sent += 1
        if frame_no == skip_frames:
            res.measured_since = t_send
        try:
            r = await client.post(f"{url}/v1/actions", json=body, timeout=timeout_s)
            lat = loop.time() - t_send
            if r.status_code == 200:
                res.ok += 1
                out = r.json()
                rep = r.headers.get("x-vla-replica")
                if rep:
                    res.replicas.add(rep)
                p = out.get("pruning") or {}
                if p.get("warmup"):
                    res.warmup_frames += 1
                kept, total = p.get("visual_tokens_kept"), p.get("visual_tokens_total")
                if kept is not None and total is not None and kept < total:
                    res.pruned_frames += 1
                if frame_no >= skip_frames:
                    res.measured_ok += 1
                    res.latencies_ms.append(lat * 1000.0)
                    if lat > period:
                        res.misses += 1
            else:
                res.errors += 1
                if len(res.error_samples) < 3:
                    res.error_samples.append(f"{r.status_code}: {r.text[:200]}")
        except httpx.HTTPError as exc:
            lat = loop.time() - t_send
            res.errors += 1
            if len(res.error_samples) < 3:
                res.error_samples.append(f"{type(exc).__name__}: {exc}"[:200])
        frame_no += 1
        # Next tick not yet passed; ticks missed while waiting are lost.
        k = max(k + 1, math.floor((loop.time() - t0) / period) + 1)
    return res


async def run_phase(
    url: str,
    mode: str,
    n: int,
    *,
    hz: float,
    duration_s: float,
    frames: dict[int, list[str]],
    instruction: str,
    pruning: dict[str, Any],
    unnorm_key: str | None,
    skip_frames: int,
    timeout_s: float,
    tag: str,
    headers: dict[str, str] | None = None,
) -> PhaseResult:
    import httpx

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(limits=limits, headers=headers) as client:
        rng = random.Random(n * 7919 + len(mode))
        tasks = [
            robot_loop(
                client,
                url,
                f"robot-{i}",
                f"{tag}-{mode}-n{n}-r{i}",
                frames[i % len(frames)],
                hz=hz,
                duration_s=duration_s,
                instruction=instruction,
                pruning=pruning,
                unnorm_key=unnorm_key,
                skip_frames=skip_frames,
                timeout_s=timeout_s,
                phase_s=rng.random() / hz,
            )
            for i in range(n)
        ]
        robots = await asyncio.gather(*tasks)
    lat = [x for r in robots for x in r.latencies_ms]
    rates = [r.achieved_hz() for r in robots]
    measured = sum(len(r.latencies_ms) for r in robots)
    misses = sum(r.misses for r in robots)
    return PhaseResult(
        mode=mode,
        robots=n,
        hz=hz,
        duration_s=duration_s,
        requests=sum(r.sent for r in robots),
        ok=sum(r.ok for r in robots),
        errors=sum(r.errors for r in robots),
        deadline_misses=misses,
        miss_rate=round(misses / measured, 4) if measured else 0.0,
        p50_ms=_r(percentile(lat, 50)),
        p95_ms=_r(percentile(lat, 95)),
        p99_ms=_r(percentile(lat, 99)),
        mean_ms=_r(sum(lat) / len(lat) if lat else None),
        achieved_hz_mean=round(sum(rates) / len(rates), 3) if rates else 0.0,
        achieved_hz_min=round(min(rates), 3) if rates else 0.0,
        replicas_used=len(set().union(*(r.replicas for r in robots))) if robots else 0,
        warmup_frames=sum(r.warmup_frames for r in robots),
        pruned_frames=sum(r.pruned_frames for r in robots),
        error_samples=[e for r in robots for e in r.error_samples][:5],
    )


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


#: A robot count is sustained when its steady-state rate is at least this share of C.
MIN_RATE_SHARE = 0.9


def load_factor(r: PhaseResult, budget_ms: float) -> float:
    """> 1: the phase breaks the p95 budget or the control rate (closed loops slow down
    under overload, which keeps latency bounded: the rate must be checked too)."""
    if r.p95_ms is None or r.achieved_hz_mean <= 0:
        return math.inf
    return max(r.p95_ms / budget_ms, MIN_RATE_SHARE * r.hz / r.achieved_hz_mean)


def robots_at_budget(results: list[PhaseResult], mode: str, budget_ms: float) -> dict[str, Any]:
    """Largest swept robot count up to which every phase keeps p95 within the budget, the
    steady-state rate at >= 90% of C and no errors; plus the count interpolated where the
    load factor (:func:`load_factor`) crosses 1 towards the next swept count."""
    pts = sorted((r for r in results if r.mode == mode), key=lambda r: r.robots)
    best, nxt, prev = 0, None, None
    for r in pts:
        if r.errors or load_factor(r, budget_ms) > 1.0:
            nxt = r
            break
        best = r.robots
        prev = r
    interp: float | None = float(best) if best else None
    if (
        prev is not None
        and nxt is not None
        and math.isfinite(load_factor(nxt, budget_ms))
        and not nxt.errors
    ):
        a, b = load_factor(prev, budget_ms), load_factor(nxt, budget_ms)
        frac = (1.0 - a) / max(1e-9, b - a)
        interp = best + frac * (nxt.robots - best)
    return {"max_robots": best, "interpolated": _r(interp), "saturated_sweep": nxt is None}


def markdown_table(results: list[PhaseResult]) -> str:
    head = (
        "| robots | mode | p50 ms | p95 ms | p99 ms | steady Hz (mean/min) | deadline misses "
        "| errors | replicas | pruned frames |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in sorted(results, key=lambda r: (r.robots, MODES.index(r.mode))):
        rows.append(
            f"| {r.robots} | {r.mode} | {r.p50_ms} | {r.p95_ms} | {r.p99_ms} | "
            f"{r.achieved_hz_mean:.2f} / {r.achieved_hz_min:.2f} | "
            f"{r.deadline_misses} ({100 * r.miss_rate:.1f}%) | {r.errors} | {r.replicas_used} | "
            f"{r.pruned_frames}/{r.ok} |"
        )
    return head + "\n".join(rows) + "\n"


def plot(results: list[PhaseResult], budget_ms: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, style in (("unpruned", "o-"), ("pruned", "s-")):
        pts = sorted((r for r in results if r.mode == mode), key=lambda r: r.robots)
        ax.plot([r.robots for r in pts], [r.p95_ms or float("nan") for r in pts], style, label=mode)
    ax.axhline(budget_ms, color="gray", ls="--", lw=1, label=f"p95 budget {budget_ms:g} ms")
    ax.set_xlabel("simulated robots")
    ax.set_ylabel("p95 latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run_sweep(
    url: str,
    robot_counts: list[int],
    *,
    hz: float,
    duration_s: float,
    method: str,
    keep_ratio: float,
    instruction: str,
    skip_frames: int,
    timeout_s: float,
    tag: str,
    log: Any = print,
    headers: dict[str, str] | None = None,
) -> tuple[list[PhaseResult], dict[str, Any]]:
    import httpx

    async with httpx.AsyncClient(headers=headers) as c:
        info = (await c.get(f"{url}/v1/actions/info", timeout=60.0)).json()
    side = int(info["image_size"])
    unnorm_key = info.get("default_unnorm_key") or sorted(info["action_dims"])[0]
    frames = {i: make_frames(side, 4, seed=i) for i in range(max(robot_counts))}
    modes = {"unpruned": {"method": "none"}, "pruned": {"method": method, "keep_ratio": keep_ratio}}
    results: list[PhaseResult] = []
    for n in robot_counts:
        for mode in MODES:
            r = await run_phase(
                url,
                mode,
                n,
                hz=hz,
                duration_s=duration_s,
                frames=frames,
                instruction=instruction,
                pruning=modes[mode],
                unnorm_key=unnorm_key,
                skip_frames=skip_frames,
                timeout_s=timeout_s,
                tag=tag,
                headers=headers,
            )
            log(
                f"  {n:3d} robots {mode:8s}: p50 {r.p50_ms} ms, p95 {r.p95_ms} ms, "
                f"{r.achieved_hz_mean:.2f} Hz, misses {r.deadline_misses}, errors {r.errors}"
            )
            results.append(r)
    return results, info


# ----------------------------------------------------------------------------- CLI


def configure_cli(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running fleet (e.g. http://127.0.0.1:8000)")
    src.add_argument("--config", help="fleet config: start it, run, take it down")
    p.add_argument("--robots", default="1,2,4,8", help="robot counts to sweep (default 1,2,4,8)")
    p.add_argument("--hz", type=float, default=5.0, help="control rate per robot (default 5)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase (default 20)")
    p.add_argument("--method", default="vlapruner", help="pruner of the pruned fleet")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="keep ratio (default 0.25)")
    p.add_argument(
        "--p95-budget-ms",
        type=float,
        default=None,
        help="p95 latency budget for the comparison (default: the control period)",
    )
    p.add_argument("--skip-frames", type=int, default=3, help="frames per robot not measured")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    p.add_argument("--instruction", default="pick up the red block and put it in the bowl")
    p.add_argument("--out", default="benchmarks/results/fleet", help="output directory")
    p.add_argument("--replicas", type=int, default=None, help="with --config: override replicas")


def run_cli(args: argparse.Namespace, extra: list[str]) -> int:
    counts = sorted({int(x) for x in str(args.robots).split(",") if x.strip()})
    if not counts or min(counts) < 1:
        print("vla-pruner bench fleet: --robots needs positive integers, e.g. 1,2,4,8")
        return 2
    budget = args.p95_budget_ms or 1000.0 / args.hz
    from vllm_vla_pruner.serve.auth import client_headers
    from vllm_vla_pruner.serve.config import DEFAULT_API_KEY_ENV

    fleet = None
    t_start = time.perf_counter()
    key = os.environ.get(DEFAULT_API_KEY_ENV)  # --url: the fleet's key, if it has one
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if args.config:
        from vllm_vla_pruner.research.checkpoint import build_fleet_preset
        from vllm_vla_pruner.serve.config import load_config
        from vllm_vla_pruner.serve.fleet import start_fleet

        over = {"replicas": args.replicas} if args.replicas else None
        cfg = load_config(args.config, over)
        build_fleet_preset(cfg.model)
        headers = client_headers(cfg)
        print(f"starting fleet {cfg.name} from {args.config} ...", flush=True)
        fleet = start_fleet(cfg)
        url = fleet.url
        print(f"fleet ready at {url} in {fleet.start_s:.1f} s", flush=True)
    else:
        url = args.url.rstrip("/")
    try:
        results, info = asyncio.run(
            run_sweep(
                url,
                counts,
                hz=args.hz,
                duration_s=args.duration,
                method=args.method,
                keep_ratio=args.keep_ratio,
                instruction=args.instruction,
                skip_frames=args.skip_frames,
                timeout_s=args.timeout,
                tag=f"bench{int(time.time())}",
                log=lambda s: print(s, flush=True),
                headers=headers,
            )
        )
        replicas = _replicas(url, headers)
    finally:
        if fleet is not None:
            from vllm_vla_pruner.serve.fleet import stop_fleet

            stop_fleet(fleet)
    summary = {
        m: robots_at_budget(results, m, budget) for m in MODES
    }  # fmt: skip
    u, p = summary["unpruned"]["interpolated"], summary["pruned"]["interpolated"]
    ratio = round(p / u, 2) if u and p else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            "url": url,
            "model": info.get("model"),
            "visual_tokens": info.get("visual_tokens"),
            "replicas": len(replicas) or None,
            "hz": args.hz,
            "duration_s": args.duration,
            "method": args.method,
            "keep_ratio": args.keep_ratio,
            "skip_frames": args.skip_frames,
            "p95_budget_ms": budget,
            "runtime_s": round(time.perf_counter() - t_start, 1),
        },
        "results": [asdict(r) for r in results],
        "robots_at_budget": summary,
        "pruned_over_unpruned": ratio,
    }
    (out / "fleet.json").write_text(json.dumps(doc, indent=2))
    table = markdown_table(results)
    verdict = (
        f"\nRobots sustained (p95 <= {budget:g} ms, >= {MIN_RATE_SHARE:.0%} of {args.hz:g} Hz, "
        f"no errors): unpruned {summary['unpruned']['max_robots']} "
        f"(interpolated {u}), pruned {summary['pruned']['max_robots']} (interpolated {p}); "
        f"pruned/unpruned = {ratio}\n"
    )
    (out / "fleet.md").write_text(table + verdict)
    title = (
        f"{Path(str(info.get('model'))).name}: {len(replicas) or '?'} replicas, "
        f"{args.hz:g} Hz robots, "
        f"{args.method} keep {args.keep_ratio:g} vs none"
    )
    plot(results, budget, out / "fleet_p95.png", title)
    print("\n" + table + verdict)
    print(f"wrote {out / 'fleet.json'}, {out / 'fleet.md'}, {out / 'fleet_p95.png'}")
    return 0


def _replicas(url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    import httpx

    try:
        r = httpx.get(f"{url}/v1/fleet/replicas", headers=headers, timeout=10.0)
        return r.json().get("replicas", [])
    except (httpx.HTTPError, ValueError):
        return []


def main(argv: list[str] | None = None) -> int:
    """Entry of ``vla-pruner bench fleet`` (vllm_vla_pruner.research.bench.cli passes the argv)."""
    p = argparse.ArgumentParser(prog="vla-pruner bench fleet", description=__doc__.split("\n")[0])
    configure_cli(p)
    return run_cli(p.parse_args(argv), [])
