"""Front process: switch off the engine features that in-LLM pruning cannot live with.

Why: scores at layer K-1 need the whole image and prompt in one prefill step (no chunked
prefill), and a pruned request's KV blocks for layers >= K hold a request-specific compacted
layout (no prefix caching). For OpenVLA checkpoints ``EngineArgs.create_engine_config`` is
wrapped to force the rows of ``server_defaults.REQUIRED_FOR_PRUNING`` and to apply the one
``max_num_batched_tokens`` rule (``server_defaults.batched_tokens``: the rule's value when the
user gave none, else the user's value raised to ``max_model_len``), with a log line saying
why. Without a known ``max_model_len`` vLLM's own default applies, which with chunked prefill
off is never below ``max_model_len``. The config then travels unchanged to the engine core and
the workers.
vLLM: 0.32.x. Upstream: no per-model scheduler-constraint hook exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm_vla_pruner.server_defaults import REQUIRED_FOR_PRUNING, batched_tokens

logger = init_logger(__name__)


def is_openvla_checkpoint(model: str) -> bool:
    config = Path(model) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "openvla"
    except (OSError, ValueError):
        return False


def constrain(args: Any) -> list[str]:
    """Adjust EngineArgs in place for pruning; return what was changed (for the log)."""
    changed = []
    for row in REQUIRED_FOR_PRUNING:
        if getattr(args, row.name) != row.value:
            setattr(args, row.name, row.value)
            changed.append(f"{row.name}={row.value} ({row.why})")
    if args.max_model_len:
        given = args.max_num_batched_tokens
        tokens = batched_tokens(args.max_model_len, args.max_num_seqs, given)
        if tokens != given:
            args.max_num_batched_tokens = tokens
            changed.append(f"max_num_batched_tokens={tokens} (was {given})")
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
                    "vla_pruner: set for this OpenVLA model, for visual token pruning: %s",
                    "; ".join(changed),
                )
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._vla_hooked = True
