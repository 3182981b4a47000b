"""The patches refuse other vLLM versions and are all installed by the plugin entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_vla_pruner.patches import VLLM_VERSION_PINNED, check_vllm_version


def test_installed_vllm_is_the_pinned_version():
    import vllm

    check_vllm_version()  # raises if the installed vLLM is not 0.32.x
    assert vllm.__version__.startswith(VLLM_VERSION_PINNED)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.320.0"])
def test_other_vllm_versions_are_refused(version):
    with pytest.raises(RuntimeError, match="written for vLLM 0.32"):
        check_vllm_version(version)


def test_plugin_installs_every_hook_in_a_fresh_process():
    code = """
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.engine.input_processor import InputProcessor
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm import ModelRegistry
from vllm_vla_pruner.engine.kv_spec import PrunedAttentionSpec, PrunedAttentionManager
import torch
for cls in (Scheduler, GPUModelRunner, InputProcessor, EngineArgs):
    assert getattr(cls, "_vla_hooked", False), cls
spec = PrunedAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32)
assert KVCacheSpecRegistry.get_manager_class(spec) is PrunedAttentionManager
full = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=16, dtype=torch.float32)
assert KVCacheSpecRegistry.get_manager_class(full).__name__ == "FullAttentionManager"
cls = ModelRegistry._try_load_model_cls("OpenVLAForActionPrediction")
assert cls.__module__ == "vllm_vla_pruner.openvla", cls.__module__
print("ok")
"""
    env = {"VLLM_PLUGINS": "vla_pruner", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_engine_args_constraints_for_openvla(tiny_ckpt):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_vla_pruner.patches.engine_args import constrain, is_openvla_checkpoint

    assert is_openvla_checkpoint(str(tiny_ckpt))
    args = EngineArgs(
        model=str(tiny_ckpt),
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_model_len=512,
        max_num_batched_tokens=128,
    )
    changed = constrain(args)
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is False
    assert args.max_num_batched_tokens == 512 and len(changed) == 3
