"""vllm-vla-pruner: serve VLA robot policies on vLLM with VLA-Pruner visual token pruning.

``register`` is the ``vllm.general_plugins`` entry point. vLLM runs it in every process it
starts (API server, engine core, workers, the model-inspection subprocess), so it must be
idempotent and cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: vLLM model runners whose forward the pruning hooks cover. The plugin makes the engine use
#: one of them (``patches.runner_choice``) and refuses to start otherwise.
SUPPORTED_RUNNERS: tuple[str, ...] = ("v1",)
MODEL_ARCH = "OpenVLAForActionPrediction"
OFT_ARCH = "OpenVLAOFTForActionPrediction"
PI0_ARCH = "Pi0ForActionPrediction"
_registered = False


def register() -> None:
    """Take over vLLM's OpenVLA architecture and install the engine-side pruning hooks."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm_vla_pruner.cpu_allocator import tune_glibc_malloc

        tune_glibc_malloc()

    ModelRegistry.register_model(MODEL_ARCH, "vllm_vla_pruner.openvla:OpenVLAForActionPrediction")
    # OpenVLA-OFT (published configs name MODEL_ARCH: select it with hf_overrides).
    ModelRegistry.register_model(OFT_ARCH, "vllm_vla_pruner.oft:OpenVLAOFTForActionPrediction")
    # pi0-style flow matching (its config.json names this architecture).
    ModelRegistry.register_model(PI0_ARCH, "vllm_vla_pruner.pi0:Pi0ForActionPrediction")
    from vllm_vla_pruner.patches import apply_all

    apply_all()
    from vllm_vla_pruner.engine.kv_spec import register_spec

    register_spec()
    _registered = True
