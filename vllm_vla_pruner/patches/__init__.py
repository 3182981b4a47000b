"""Changes to vLLM internals (each module changes one thing and says why).

Each module names the vLLM version it was written for and the upstream issue that would make
it unnecessary. ``apply_all`` first checks, by feature, every internal the patches touch
(``requirements.py``) and refuses a vLLM that lacks any of them, naming what is missing.
"""

from __future__ import annotations

_applied = False


def apply_all() -> None:
    """Install every patch once per process (vLLM runs general plugins in each process)."""
    global _applied
    if _applied:
        return
    from . import requirements

    requirements.check_vllm_internals()
    from . import api_validation, engine_args, runner_choice, runner_hooks, scheduler_plan

    runner_choice.pin_v1_runner()
    runner_hooks.apply()
    scheduler_plan.apply()
    api_validation.apply()
    engine_args.apply()
    runner_choice.apply()
    _applied = True
