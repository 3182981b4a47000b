"""The patches check the vLLM internals they touch by feature and are all installed by the
plugin entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_vla_pruner.patches.requirements import (
    REQUIREMENTS,
    IncompatibleVllmError,
    Requirement,
    check_vllm_internals,
    missing_internals,
)


def test_installed_vllm_has_every_internal_the_patches_touch():
    assert missing_internals() == []
    check_vllm_internals()
    used_by = {r.used_by for r in REQUIREMENTS}
    assert {"runner_hooks", "scheduler_plan", "engine.kv_spec", "runner_choice"} <= used_by


def test_a_missing_internal_is_named_with_what_uses_it():
    runner = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    fake = (
        Requirement(f"{runner}._no_such_hook", "runner_hooks"),
        Requirement(f"{runner}._model_forward", "runner_hooks", ("self", "no_such_param")),
        Requirement("vllm.v1.attention.backend:CommonAttentionMetadata", "x", fields=("nope",)),
        Requirement("vllm.no_such_module:Thing", "y"),
        Requirement("vllm.v1.request:RequestStatus", "scheduler_plan", fields=("FINISHED_ERROR",)),
    )
    with pytest.raises(IncompatibleVllmError) as ei:
        check_vllm_internals(fake)
    msg = str(ei.value)
    assert "GPUModelRunner._no_such_hook not found" in msg
    assert "lacks parameters ['no_such_param']" in msg
    assert "lacks fields ['nope']" in msg and "vllm.no_such_module:Thing not found" in msg
    assert "FINISHED_ERROR" not in msg  # present: not reported
    assert len(missing_internals(fake)) == 4


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
from vllm.v1.worker.gpu_worker import Worker
import os
assert Worker.load_model.__qualname__.startswith("apply."), Worker.load_model.__qualname__
assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
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
    assert args.enforce_eager is True  # a CUDA graph would replay an unpruned forward
    assert args.max_num_batched_tokens == 512 and len(changed) == 4
