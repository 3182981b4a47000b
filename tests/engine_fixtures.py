"""One real in-process vLLM engine (``vllm.LLM``) with the plugin, shared by a module's tests.

The worker appends every pruning decision (request, kept visual indices) to a trace file
(``VLA_PRUNER_TRACE``), which the oracle tests replay through the PyTorch reference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["EngineHandle", "pruning_trace", "tiny_engine"]


@contextmanager
def pruning_trace(path: Path | None = None) -> Iterator[Path | None]:
    """``VLA_PRUNER_TRACE`` set to ``path`` (left as it is when None) for what starts inside
    (an engine's or a server's worker reads it at model init), then put back as it was, so
    one module's trace file never leaks into the next module's engine."""
    previous = os.environ.get("VLA_PRUNER_TRACE")
    if path is not None:
        os.environ["VLA_PRUNER_TRACE"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("VLA_PRUNER_TRACE", None)
        else:
            os.environ["VLA_PRUNER_TRACE"] = previous


@dataclass
class EngineHandle:
    llm: Any
    model_dir: Path
    trace_path: Path

    def trace(self) -> dict[str, dict[str, Any]]:
        """Pruning decisions so far, by engine request id."""
        if not self.trace_path.exists():
            return {}
        rows = [json.loads(line) for line in self.trace_path.read_text().splitlines() if line]
        return {r["req_id"]: r for r in rows}

    def generate(self, prompts: list[dict], params: list[Any]) -> list[Any]:
        return self.llm.generate(prompts, params, use_tqdm=False)


@pytest.fixture(scope="module")
def tiny_engine(
    tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineHandle]:
    trace = tmp_path_factory.mktemp("trace") / "pruning.jsonl"
    from vllm_vla_pruner.engine.local import make_llm

    with pruning_trace(trace):
        llm = make_llm(tiny_ckpt, max_num_seqs=16, pruning={"window": 3, "gamma": 0.8, "layer": 3})
    yield EngineHandle(llm, Path(tiny_ckpt), trace)
    from vllm_vla_pruner.engine.local import shutdown_llm

    shutdown_llm(llm)  # one engine at a time: CPU workers are pinned to the same core
