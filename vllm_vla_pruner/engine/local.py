"""An in-process vLLM engine (``vllm.LLM``) with the plugin and CPU-safe defaults.

Tests, benchmarks, the closed-loop evaluation and the Ray replicas drive the real engine
through this, with the defaults ``vla-pruner serve`` uses: both are forms of one table,
``server_defaults.engine_defaults``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_vla_pruner.config import load_config_json
from vllm_vla_pruner.server_defaults import cpu_safe_env, engine_defaults, oft_checkpoint_spec


def engine_kwargs(model_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The engine defaults as ``vllm.LLM`` / ``EngineArgs`` keywords; ``overrides`` win.

    ``pruning``: the operator's pruning settings (``--additional-config``'s ``vla_pruner``).
    Stats logging is off and the seed fixed: runs in turn must be comparable.
    """
    pruning = overrides.pop("pruning", None)
    rows = engine_defaults(
        load_config_json(model_dir),
        max_model_len=overrides.get("max_model_len"),
        max_num_seqs=overrides.get("max_num_seqs"),
        oft=oft_checkpoint_spec(model_dir),
    )
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        **{row.name: row.value for row in rows},
        "disable_log_stats": True,
        "seed": 0,
    }
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
