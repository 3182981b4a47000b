"""``vla-pruner bench WHAT``: every benchmark behind one command.

Each entry names a ``module:function`` taking the remaining argv, so a benchmark's own
options live next to its code.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": (
        "vllm_vla_pruner.research.bench.engine_bench:main",
        "pruned vs unpruned on the real engine",
    ),
    "size-sweep": (
        "vllm_vla_pruner.research.bench.size_sweep:main",
        "OFT policy sizes: where pruning pays on this machine, and what training costs",
    ),
    "pruning": (
        "vllm_vla_pruner.research.bench.pruning_bench:main",
        "scoring + selection cost alone",
    ),
    "metaworld": ("vllm_vla_pruner.research.sim.benchmark:main", "closed-loop success per pruner"),
    "metaworld-oft": (
        "vllm_vla_pruner.research.sim.chunk_benchmark:main",
        "closed-loop success and engine time per control step of OFT (and AR) policies",
    ),
    "metaworld-layers": (
        "vllm_vla_pruner.research.sim.layer_sweep:main",
        "choose pruning / action layers on validation goals",
    ),
    "fleet": (
        "vllm_vla_pruner.research.bench.fleet_simulator:main",
        "simulated robot fleet on Ray Serve",
    ),
    "openpi": (
        "vllm_vla_pruner.research.bench.openpi_bench:main",
        "N openpi-client robots, batched engine vs one request at a time",
    ),
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=sorted(BENCHMARKS),
        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(BENCHMARKS.items())),
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")


def run(what: str, argv: list[str]) -> int:
    """Run benchmark ``what`` with its own options ``argv``; its exit code."""
    target, _ = BENCHMARKS[what]
    module, func = target.split(":")
    result = getattr(importlib.import_module(module), func)(argv)
    return int(result or 0)
