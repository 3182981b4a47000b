"""Front process: switch off the engine features that in-LLM pruning cannot live with.

Why: scores at layer K-1 need the whole image and prompt in one prefill step (no chunked
prefill), and a pruned request's KV blocks for layers >= K hold a request-specific compacted
layout (no prefix caching). For OpenVLA checkpoints ``EngineArgs.create_engine_config`` is
wrapped to turn both off, with a log line saying why, and to raise
``max_num_batched_tokens`` to ``max_model_len`` so every prompt fits one step. The config then
travels unchanged to the engine core and the workers.
vLLM: 0.32.x. Upstream: no per-model scheduler-constraint hook exists.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm.logger import init_logger

logger = init_logger(__name__)


def is_openvla_checkpoint(model: str) -> bool:
    config = Path(model) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "openvla"
    except (OSError, ValueError):
        return False


def constrain(args) -> list[str]:
    """Adjust EngineArgs in place for pruning; return what was changed (for the log)."""
    changed = []
    if args.enable_prefix_caching is not False:
        args.enable_prefix_caching = False
        changed.append("prefix caching off")
    if args.enable_chunked_prefill is not False:
        args.enable_chunked_prefill = False
        changed.append("chunked prefill off")
    if args.max_model_len and args.max_num_batched_tokens:
        if args.max_num_batched_tokens < args.max_model_len:
            args.max_num_batched_tokens = args.max_model_len
            changed.append(f"max_num_batched_tokens raised to {args.max_model_len}")
    return changed


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_vla_hooked", False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        if is_openvla_checkpoint(str(self.model)):
            changed = constrain(self)
            if changed:
                logger.info(
                    "vla_pruner: %s for this OpenVLA model: visual token pruning needs the "
                    "whole image and prompt in one prefill step and request-specific KV blocks",
                    ", ".join(changed),
                )
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._vla_hooked = True
