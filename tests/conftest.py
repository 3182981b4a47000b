"""Shared pytest fixtures. Nothing here may download anything: the machines are offline.

Fixture modules of other areas are star-imported at the bottom (their ``__all__`` lists the
fixtures and hooks they export).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede any mujoco import


def pytest_configure(config: pytest.Config) -> None:
    # In-process reference models are tiny: one thread avoids oversubscribing the (shared,
    # 2-core) CI machines, where extra threads made them ~10x slower. Engines started by
    # tests run in their own processes and are not affected.
    import torch

    torch.set_num_threads(int(os.environ.get("VLA_TEST_TORCH_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``tiny`` preset checkpoint (seed 0), built once per test session."""
    from vllm_vla_pruner.research.checkpoint import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("tiny_ckpt"), seed=0)


from tests.engine_fixtures import *  # noqa: E402,F401,F403
from tests.fleet_fixtures import *  # noqa: E402,F401,F403
from tests.serve_fixtures import *  # noqa: E402,F401,F403
