"""An in-process vLLM engine (``vllm.LLM``) with the plugin and CPU-safe defaults.

Tests, benchmarks and the closed-loop evaluation drive the real engine through this, with the
same settings ``vla-pruner serve`` uses (see ``server_defaults``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_vla_pruner.config import load_config_json
from vllm_vla_pruner.server_defaults import (
    BLOCK_SIZE,
    checkpoint_dtype,
    cpu_safe_env,
    default_max_model_len,
)


def engine_kwargs(model_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """``vla-pruner serve``'s CPU-safe defaults as ``vllm.LLM`` keyword arguments."""
    cfg = load_config_json(model_dir)
    dtype = checkpoint_dtype(cfg) or "auto"
    max_len = default_max_model_len(cfg)
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "auto",
        enforce_eager=True,
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max((max_len or 0) * 8, 2048),
        block_size=BLOCK_SIZE,
        limit_mm_per_prompt={"image": 1},
        disable_log_stats=True,
        seed=0,
    )
    if max_len is not None:
        kwargs["max_model_len"] = max_len
    pruning = overrides.pop("pruning", None)
    if pruning is not None:
        kwargs["additional_config"] = {"vla_pruner": dict(pruning)}
    kwargs.update(overrides)
    return kwargs


def make_llm(model_dir: str | Path, **overrides: Any):
    """Start the engine (call under ``if __name__ == "__main__"`` in scripts: workers spawn)."""
    cpu_safe_env()
    from vllm import LLM

    return LLM(**engine_kwargs(model_dir, **overrides))


def shutdown_llm(llm: Any) -> None:
    """Stop the engine core and its worker now (tests and benchmarks run engines in turn)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - already gone
        pass


def decoder_report(llm: Any) -> dict[str, Any]:
    """The worker's pruning counters (``PrunedDecoder.report``), via vLLM's collective RPC."""
    return llm.collective_rpc("vla_pruner_report")[0]


def kv_layout(llm: Any) -> list[dict[str, Any]]:
    """Per KV cache group: layers, page bytes per layer, and the pool's block count."""
    return llm.collective_rpc("vla_pruner_kv_layout")[0]
