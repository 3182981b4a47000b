"""Every vLLM process: make the engine build a model runner the plugin's hooks cover.

Why: vLLM 0.32 builds its Model Runner V2 whenever Triton is importable and no V2-unsupported
feature is configured (``VllmConfig.use_v2_model_runner``; ``gpu_worker._make_model_runner``),
i.e. on every CUDA install. The pruning hooks (``runner_hooks``) cover the V1 runner only; on
V2 the forward would run unpruned while the scheduler still plans pruned KV.

* ``pin_v1_runner`` runs from the plugin's ``register`` in every process vLLM starts (API
  server, engine core, workers, Ray replicas), before any ``VllmConfig`` is built there: it
  sets ``VLLM_USE_V2_MODEL_RUNNER=0`` unless the user set the variable, with one log line.
  Child processes inherit it, so the line appears once.
* ``EngineArgs.create_engine_config`` is wrapped to refuse, with what to set, a configuration
  that still selects V2 for the plugin's model (the variable set to 1, HiSparse, watermarking).
* The worker refuses to load the model on a runner that is not hooked
  (``runner_hooks.check_runner``), and the scheduler fails any request planned to be pruned
  whose forward reported no pruning: no path answers unpruned as if pruned.

vLLM: 0.32.x. Upstream: the V1 runner is deprecated; hooking V2 is the follow-up.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from vllm_vla_pruner.patches.runner_hooks import UnsupportedRunnerError

RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
MODEL_TYPE = "openvla"


def pin_v1_runner(env: MutableMapping[str, str] | None = None) -> bool:
    """Select the V1 runner unless the user chose; True if this call set it."""
    env = os.environ if env is None else env
    if RUNNER_ENV in env:
        return False
    env[RUNNER_ENV] = "0"
    from vllm.logger import init_logger

    init_logger(__name__).info(
        "vla_pruner: %s=0 (vLLM's V1 model runner): the plugin's pruning hooks cover the V1 "
        "runner only; vLLM would pick V2 wherever Triton is present",
        RUNNER_ENV,
    )
    return True


def check_config(vllm_config: Any) -> None:
    """Refuse a configuration whose workers would build a runner the hooks do not cover."""
    from vllm_vla_pruner import SUPPORTED_RUNNERS

    hf = getattr(vllm_config.model_config, "hf_config", None)
    if getattr(hf, "model_type", None) != MODEL_TYPE:
        return
    if vllm_config.use_v2_model_runner and "v2" not in SUPPORTED_RUNNERS:
        raise UnsupportedRunnerError(
            f"vla_pruner: this configuration selects vLLM's Model Runner V2 "
            f"({RUNNER_ENV}={os.environ.get(RUNNER_ENV, 'unset')}, or HiSparse / watermarking, "
            f"which force V2); the plugin's pruning hooks cover {SUPPORTED_RUNNERS} only. "
            f"Unset {RUNNER_ENV} or set it to 0, and drop the features that need V2."
        )
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise UnsupportedRunnerError(
            "vla_pruner: pipeline parallelism splits the decoder layers over processes; the "
            "pruned decoder needs layers K-1 and K in one process. Use tensor parallelism."
        )


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_vla_runner_checked", False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        check_config(config)
        return config

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._vla_runner_checked = True
