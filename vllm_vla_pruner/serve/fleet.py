"""``vla-pruner fleet up|down|status CONFIG``: run the fleet on Ray Serve.

``up`` with no ``ray.address`` in the config starts a private local Ray (loopback only, no
dashboard), deploys, prints the URL and stays in the foreground (Ctrl-C takes everything
down: the local Ray belongs to this process). With ``ray.address`` (``auto`` after
``ray start --head`` / ``ray start --address``) it deploys onto that cluster; ``--detach``
then returns at once and ``fleet down CONFIG`` removes the application later.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_vla_pruner.listen_check import listen_error
from vllm_vla_pruner.serve.config import FleetConfig, FleetConfigError, load_config

__all__ = [
    "START_TIMEOUT_S",
    "Fleet",
    "FleetStartError",
    "configure_cli",
    "ensure_checkpoint",
    "main",
    "run_cli",
    "start_fleet",
    "stop_fleet",
]


@dataclass
class Fleet:
    """A deployed fleet: where it answers and whether this process owns the Ray instance."""

    config: FleetConfig
    url: str
    model_dir: Path
    owns_ray: bool
    start_s: float


def ensure_checkpoint(cfg: FleetConfig) -> Path:
    """The checkpoint directory, which must exist: presets are built by the CLI (``fleet up``)
    or ``vllm_vla_pruner.research.checkpoint.build_fleet_preset`` before deploying."""
    path = cfg.model.checkpoint_dir()
    if (path / "config.json").is_file():
        return path
    hint = (
        f"; build the preset first: vla-pruner checkpoint --preset {cfg.model.preset} --out {path}"
        if cfg.model.preset
        else ""
    )
    raise FleetConfigError(f"model.path: {path} has no config.json{hint}")


def connect_ray(cfg: FleetConfig) -> bool:
    """Join ``ray.address`` or start a loopback-only local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace, log_to_driver=False)
        return False
    # A private single-node Ray on loopback: Ray resolves 127.0.0.1 to the host's outward IP
    # unless it runs in its single-node mode (the default on macOS/Windows), switched by this
    # env var, read at import time (hence also the module attribute) and by every child.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=cfg.local_num_cpus(),
        namespace=cfg.ray.namespace,
        log_to_driver=False,
    )
    return True


def fleet_url(cfg: FleetConfig) -> str:
    host = cfg.http.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{shown}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"


class FleetStartError(RuntimeError):
    """The fleet's application failed to deploy (e.g. a replica's engine cannot start)."""


START_TIMEOUT_S = 1800.0


def _deploy(app: Any, cfg: FleetConfig, deadline: float) -> None:
    """Deploy and wait, until ``deadline`` (``time.monotonic``), for the application to run.

    ``serve.run`` would wait for the replicas' engines without a bound and report a failed
    one as a traceback; this asks Serve's public status instead."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    target = serve.RunTarget(target=app, name=cfg.name, route_prefix=cfg.http.route_prefix)
    serve.run_many([target], wait_for_applications_running=False)
    while True:
        app_status = serve.status().applications.get(cfg.name)
        if app_status is not None and app_status.status == ApplicationStatus.RUNNING:
            return
        if app_status is not None and app_status.status == ApplicationStatus.DEPLOY_FAILED:
            raise FleetStartError(f"{cfg.name}: deploying failed: {_failure(app_status)}")
        if time.monotonic() >= deadline:
            state = app_status.status.value if app_status is not None else "not created"
            raise TimeoutError(f"{cfg.name}: replicas not running (still {state})")
        time.sleep(0.5)


def _failure(app_status: Any) -> str:
    """One line for a failed deployment: the last line of its error (a replica constructor's
    traceback) and where the whole error is (an engine's own: its replica's worker log)."""
    from ray.serve.schema import DeploymentStatus

    failed = [
        (name, d.message)
        for name, d in app_status.deployments.items()
        if d.status == DeploymentStatus.DEPLOY_FAILED
    ]
    name, message = failed[0] if failed else ("application", app_status.message)
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return (
        f"{name}: {lines[-1] if lines else 'no message'} (the whole error: Ray's worker logs, "
        "/tmp/ray/session_latest/logs/worker-*.err on the replica's node)"
    )


def _wait_healthy(url: str, deadline: float) -> None:
    import httpx

    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"fleet at {url} not healthy")
        time.sleep(0.5)


def start_fleet(
    cfg: FleetConfig, timeout_s: float = START_TIMEOUT_S, environ: Mapping[str, str] | None = None
) -> Fleet:
    """Deploy (starting Ray if needed) and return once every replica's engine is up.

    Raises ``FleetConfigError`` before Ray starts for a config that cannot run here,
    ``FleetStartError`` if a replica cannot start and ``TimeoutError`` after ``timeout_s``
    seconds; a Ray this call started is taken down again on any failure. ``environ``
    (default ``os.environ``) is where the API key is looked up.
    """
    from ray import serve

    from vllm_vla_pruner.serve.app import build_app

    t0 = time.perf_counter()
    model_dir = ensure_checkpoint(cfg)
    app = build_app(cfg, model_dir, environ)  # refuses an unguarded public fleet before Ray
    if not cfg.ray.address:
        _check_port_free(cfg.http.host, cfg.http.port)
    owns = connect_ray(cfg)
    deadline = time.monotonic() + timeout_s
    try:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        _deploy(app, cfg, deadline)  # every replica's constructor (the engine start) finished
        url = fleet_url(cfg)
        _wait_healthy(url, deadline)
    except BaseException as exc:
        # A failed start must not leave a Ray it started behind: the next start_fleet in this
        # process would join it, keep its broken Serve and wait on a port nobody serves.
        if owns:
            _shutdown_serve_and_ray()
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{exc} (waited {timeout_s:g} s)") from None
        raise
    return Fleet(cfg, url, model_dir, owns, time.perf_counter() - t0)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a local fleet whose HTTP port is taken, before Ray starts: otherwise Serve's
    proxy fails to bind inside an actor and the error arrives a minute later as a traceback."""
    why = listen_error(host, port)
    if why:
        raise FleetConfigError(
            f"http.port: cannot listen on {host}:{port} ({why}); choose another port (--port)"
        )


def _shutdown_serve_and_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def stop_fleet(fleet: Fleet | FleetConfig, shutdown_ray: bool | None = None) -> None:
    """Delete the application; also stop Serve and Ray when this process started them."""
    import ray
    from ray import serve

    cfg = fleet.config if isinstance(fleet, Fleet) else fleet
    owns = fleet.owns_ray if isinstance(fleet, Fleet) else False
    if shutdown_ray is None:
        shutdown_ray = owns
    if not ray.is_initialized():
        connect_ray(cfg)
    try:
        serve.delete(cfg.name)
    except Exception:  # noqa: BLE001 - already gone
        pass
    if shutdown_ray:
        _shutdown_serve_and_ray()


# ----------------------------------------------------------------------------- CLI


def configure_cli(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("up", "down", "status"), help="what to do")
    p.add_argument("config", help="fleet config file (YAML or JSON)")
    p.add_argument("--port", type=int, default=None, help="override http.port")
    p.add_argument("--replicas", type=int, default=None, help="override replicas")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=START_TIMEOUT_S,
        help=f"seconds for every replica's engine to start (default {START_TIMEOUT_S:.0f}); "
        "then exit 1",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return after deploying (only with ray.address: a cluster keeps the fleet)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if args.port is not None:
        over["http"] = {"port": args.port}
    if args.replicas is not None:
        over["replicas"] = args.replicas
    return over


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_cli(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        cfg = load_config(args.config, _overrides(args))
    except FleetConfigError as exc:
        print(f"vla-pruner fleet: {exc}")
        return 2
    if args.action == "status":
        import httpx

        from vllm_vla_pruner.serve.auth import client_headers

        url = fleet_url(cfg)
        try:
            r = httpx.get(f"{url}/v1/fleet/replicas", headers=client_headers(cfg), timeout=10.0)
            print(json.dumps(r.json(), indent=2))
        except (httpx.HTTPError, ValueError) as exc:
            print(f"vla-pruner fleet: {url} not reachable: {exc}")
            return 1
        return 0 if r.status_code == 200 else 1
    if args.action == "down":
        if not cfg.ray.address:
            print(
                "vla-pruner fleet: a local fleet (no ray.address) belongs to its `fleet up` "
                "process; stop that with Ctrl-C"
            )
            return 2
        stop_fleet(cfg, shutdown_ray=False)
        print(f"vla-pruner fleet: deleted application {cfg.name!r}")
        return 0
    if args.detach and not cfg.ray.address:
        print("vla-pruner fleet: --detach needs ray.address (a local Ray ends with this process)")
        return 2
    try:
        fleet = start_fleet(cfg, timeout_s=args.start_timeout)
    except FleetConfigError as exc:
        print(f"vla-pruner fleet: {exc}")
        return 2
    except (FleetStartError, TimeoutError, KeyboardInterrupt) as exc:  # local Ray: taken down
        interrupted = isinstance(exc, KeyboardInterrupt)
        what = "interrupted while starting" if interrupted else str(exc)
        left = f"; `fleet down {args.config}` removes the application" if cfg.ray.address else ""
        print(f"vla-pruner fleet: {what}{left}")
        return 130 if interrupted else 1
    n = cfg.replica_count()
    from vllm_vla_pruner.serve.auth import resolve_api_key

    guard = (
        f"API key required (${cfg.auth.api_key_env})"
        if resolve_api_key(cfg)
        else "no API key (open to whoever reaches the port)"
    )
    print(
        f"vla-pruner fleet: {cfg.name} ({n} replica{'s' * (n != 1)}, {fleet.model_dir}) ready "
        f"at {fleet.url} in {fleet.start_s:.1f} s; {guard}\n"
        f"  POST {fleet.url}/v1/actions   GET {fleet.url}/v1/actions/info   "
        f"GET {fleet.url}/metrics   GET {fleet.url}/v1/fleet/replicas",
        flush=True,
    )
    if args.detach:
        return 0
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) take the fleet down
    # through stop_fleet, not through Ray's own handler, which leaves agents behind.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("vla-pruner fleet: shutting down", flush=True)
    finally:
        stop_fleet(fleet)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_vla_pruner.serve.fleet up CONFIG`` (= ``vla-pruner fleet up``)."""
    p = argparse.ArgumentParser(prog="vla-pruner fleet", description=__doc__.split("\n")[0])
    configure_cli(p)
    return run_cli(p.parse_args(argv), [])


if __name__ == "__main__":
    raise SystemExit(main())
