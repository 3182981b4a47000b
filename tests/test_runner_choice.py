"""The engine always builds a model runner the pruning hooks cover.

vLLM 0.32 builds Model Runner V2 wherever Triton is usable (every CUDA install), and the hooks
cover V1 only. This CPU stack's Triton has no CPU backend, so the tests reproduce a CUDA
machine's choice in a fresh process: ``HAS_TRITON`` true, nothing set by hand, the plugin
loaded the way vLLM loads it, the engine config built for a plugin-served checkpoint, and the
GPU worker's own ``_make_model_runner`` deciding which runner class to build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CUDA_WORKER_CHOICE = r"""
import json, sys, types
import vllm.config.vllm as vllm_config_module
vllm_config_module.HAS_TRITON = True  # what every CUDA install of vLLM has
from vllm.engine.arg_utils import EngineArgs
from vllm_vla_pruner.engine.local import engine_kwargs

fields = set(EngineArgs.__dataclass_fields__)
kwargs = {k: v for k, v in engine_kwargs(sys.argv[1]).items() if k in fields}
try:
    config = EngineArgs(**kwargs).create_engine_config()
except Exception as exc:  # the plugin refusing a V2 configuration
    print(json.dumps({"refused": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit(0)

# gpu_worker.Worker._make_model_runner, with the runner classes swapped for recorders: the
# real classes need a GPU to construct; which one the worker picks is what is tested.
import vllm.v1.worker.gpu_model_runner as v1
import vllm.v1.worker.gpu_worker as gpu_worker
built = []
v1_cls = v1.GPUModelRunner
v1.GPUModelRunner = lambda cfg, device: built.append(("v1", v1_cls))
v2 = types.ModuleType("vllm.v1.worker.gpu.model_runner")
v2.GPUModelRunner = lambda cfg, device: built.append(("v2", None))
sys.modules["vllm.v1.worker.gpu.model_runner"] = v2
worker = types.SimpleNamespace(
    use_v2_model_runner=config.use_v2_model_runner, vllm_config=config, device="cuda:0"
)
gpu_worker.Worker._make_model_runner(worker)
kind, cls = built[0]
print(json.dumps({
    "use_v2_model_runner": config.use_v2_model_runner,
    "built": kind,
    "hooked": bool(cls is not None and getattr(cls, "_vla_hooked", False)),
}))
"""


def _cuda_choice(model_dir: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    base.update(VLLM_PLUGINS="vla_pruner", HF_HUB_OFFLINE="1", **env)
    out = subprocess.run(
        [sys.executable, "-c", CUDA_WORKER_CHOICE, str(model_dir)],
        capture_output=True,
        text=True,
        env=base,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cuda_worker_builds_a_runner_the_hooks_cover(tiny_ckpt):
    from vllm_vla_pruner import SUPPORTED_RUNNERS

    choice = _cuda_choice(tiny_ckpt)
    assert choice["use_v2_model_runner"] is False
    assert choice["built"] in SUPPORTED_RUNNERS and choice["hooked"] is True


def test_a_configuration_forcing_v2_is_refused_with_what_to_set(tiny_ckpt):
    choice = _cuda_choice(tiny_ckpt, VLLM_USE_V2_MODEL_RUNNER="1")
    assert "UnsupportedRunnerError" in choice["refused"]
    assert "VLLM_USE_V2_MODEL_RUNNER" in choice["refused"] and "set it to 0" in choice["refused"]


def test_pin_keeps_a_users_explicit_choice():
    from vllm_vla_pruner.patches.runner_choice import pin_v1_runner

    env: dict[str, str] = {}
    assert pin_v1_runner(env) is True and env == {"VLLM_USE_V2_MODEL_RUNNER": "0"}
    env = {"VLLM_USE_V2_MODEL_RUNNER": "1"}
    assert pin_v1_runner(env) is False and env["VLLM_USE_V2_MODEL_RUNNER"] == "1"


def test_a_worker_on_an_unhooked_runner_refuses_to_load_the_model():
    from vllm_vla_pruner.patches.runner_hooks import UnsupportedRunnerError, check_runner

    class V2LikeRunner:  # what vllm.v1.worker.gpu.model_runner.GPUModelRunner looks like here
        def get_model(self):
            return type("Model", (), {"pruned_decoder": object()})()

    with pytest.raises(UnsupportedRunnerError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(V2LikeRunner())
    check_runner(type("Plain", (), {"get_model": lambda self: object()})())  # not our model


@pytest.mark.engine
def test_the_runner_the_worker_built_is_hooked(tiny_engine):
    from vllm_vla_pruner import SUPPORTED_RUNNERS

    [info] = tiny_engine.llm.collective_rpc("vla_pruner_runner")
    assert info["kind"] in SUPPORTED_RUNNERS
    assert info["hooked"] and info["forward_hooked"], info
