"""vLLM model layers outside an engine, for tools that build parts of a model on their own
(the denoising-loop profiler, the towers' shape test).

vLLM's linear layers read the current vLLM config and need a tensor-parallel group even at
one process; an engine's workers set both up, a standalone tool must do it itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.utils.network_utils import get_open_port


@contextmanager
def one_process_vllm() -> Iterator[VllmConfig]:
    """A one-process (TP = PP = 1) group and an eager vLLM config current inside the block,
    as the plugin's engines run (``enforce_eager``: vLLM's custom ops, e.g. RoPE's C kernel
    on CPU, are on). The group outlives the block: call it once per process."""
    eager = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with set_current_vllm_config(eager):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, "gloo")
        initialize_model_parallel(1, 1)
        yield eager
