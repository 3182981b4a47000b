"""Shared fixtures: a tiny checkpoint built once per session, one engine, one server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_fixtures import *  # noqa: F403
from tests.serve_fixtures import *  # noqa: F403


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_vla_pruner.checkpoint import build_checkpoint

    return build_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
