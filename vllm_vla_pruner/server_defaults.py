"""Engine arguments and environment that make a VLA checkpoint start and prune on a CPU box.

One place for them, so ``vla-pruner serve``, the tests, the benchmarks and the Ray replicas
launch identically configured engines. Every default yields to the same flag given by the
user (``--flag``, ``--flag=value``, ``--no-flag`` or the underscore spelling).

Why each default:
- ``--dtype float32`` only when the checkpoint says float32 (vLLM's ``auto`` would pick
  bfloat16/float16 for some configs; the tiny test checkpoints are float32 on purpose).
- ``--max-model-len``: just enough for BOS + visual tokens + a long instruction + the action;
  the default (the Llama's 2k-4k context) wastes KV memory on a CPU.
- ``--enforce-eager``: the pruned decoder loop is Python between layers; no graph capture.
- no prefix caching, no chunked prefill, and ``--max-num-batched-tokens >= max-model-len``:
  pruning scores need the whole image and prompt in one prefill step, and pruned KV blocks
  are request specific (not shareable).
- ``--block-size 32``: the CPU default of 128 hides per-request KV savings on short prompts.
- ``--limit-mm-per-prompt {"image": 1}``: one camera frame per request (OpenVLA's format).
- ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB): the CPU backend otherwise reserves a large fraction of
  RAM, and start-up fails on a shared machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PLUGIN_NAME",
    "cpu_safe_engine_args",
    "checkpoint_dtype",
    "cpu_safe_env",
    "default_max_model_len",
    "flag_value",
    "has_flag",
    "prompt_budget",
]

PLUGIN_NAME = "vla_pruner"
BLOCK_SIZE = 32
#: Token room reserved for the instruction text (OpenVLA prompts are ~20-40 tokens).
TEXT_TOKENS = 256


def _norm(flag: str) -> str:
    """``--max_model_len=5`` -> ``--max-model-len``: how vLLM's parser matches options."""
    name = flag.split("=", 1)[0]
    if not name.startswith("--"):
        return name
    return "--" + name[2:].replace("_", "-")


def has_flag(args: Sequence[str], *names: str) -> bool:
    """Whether any of ``names`` (or its ``--no-`` twin) appears among ``args``."""
    wanted = set()
    for n in names:
        wanted.add(n)
        wanted.add("--no-" + n[2:] if not n.startswith("--no-") else "--" + n[5:])
    return any(_norm(a) in wanted for a in args if a.startswith("--"))


def flag_value(args: Sequence[str], name: str) -> str | None:
    """The last value given for ``name`` (``--name v`` or ``--name=v``), else None."""
    value = None
    for i, a in enumerate(args):
        if not a.startswith("--") or _norm(a) != name:
            continue
        if "=" in a:
            value = a.split("=", 1)[1]
        elif i + 1 < len(args):
            value = args[i + 1]
    return value


def _parse_tokens(value: str | None) -> int | None:
    """vLLM's human-readable sizes ('1024', '1k', '2K', '1m') -> int; None if unparsable."""
    if value is None:
        return None
    v = value.strip().lower()
    mult = {"k": 1000, "m": 1000 * 1000}.get(v[-1:], 1)
    if mult != 1:
        v = v[:-1]
    try:
        return int(float(v) * mult)
    except ValueError:
        return None


def _read_config(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def prompt_budget(config: Mapping[str, Any]) -> int:
    """Tokens one request needs at most: BOS + visual tokens + instruction + action."""
    from vllm_vla_pruner.config import num_visual_tokens

    stats = config.get("norm_stats") or {}
    dims = [len(s.get("action", {}).get("q01", [])) for s in stats.values() if isinstance(s, dict)]
    action_dim = max(dims, default=0) or 7
    return 1 + num_visual_tokens(config) + TEXT_TOKENS + action_dim


def default_max_model_len(config: Mapping[str, Any]) -> int | None:
    """The prompt budget rounded up to 128, within the model's positions (None: unknown)."""
    try:
        need = prompt_budget(config)
    except (ValueError, KeyError, TypeError):
        return None
    max_len = _round_up(need, 128)
    limit = (config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(limit, int) and limit > 0:
        max_len = min(max_len, limit)
    return max_len


def checkpoint_dtype(config: Mapping[str, Any]) -> str | None:
    text = config.get("text_config") or {}
    for holder in (config, text):
        dt = holder.get("torch_dtype") or holder.get("dtype")
        if dt:
            return str(dt).replace("torch.", "")
    return None


def cpu_safe_engine_args(model_dir: str | Path, user_args: Sequence[str] = ()) -> list[str]:
    """``user_args`` plus the CPU-safe defaults the user did not set (defaults first)."""
    user = list(user_args)
    config = _read_config(model_dir)
    out: list[str] = []

    if config is not None and not has_flag(user, "--dtype"):
        if checkpoint_dtype(config) == "float32":
            out += ["--dtype", "float32"]

    max_len = _parse_tokens(flag_value(user, "--max-model-len"))
    if max_len is None and config is not None:
        max_len = default_max_model_len(config)
        if max_len is not None:
            out += ["--max-model-len", str(max_len)]

    if not has_flag(user, "--enforce-eager"):
        out.append("--enforce-eager")
    if not has_flag(user, "--enable-prefix-caching"):
        out.append("--no-enable-prefix-caching")
    if not has_flag(user, "--enable-chunked-prefill"):
        out.append("--no-enable-chunked-prefill")
    if not has_flag(user, "--max-num-batched-tokens"):
        out += ["--max-num-batched-tokens", str(max(max_len or 0, 2048))]
    if not has_flag(user, "--block-size"):
        out += ["--block-size", str(BLOCK_SIZE)]
    if not has_flag(user, "--limit-mm-per-prompt"):
        out += ["--limit-mm-per-prompt", json.dumps({"image": 1})]
    return out + user


def cpu_safe_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set (in ``env``, default ``os.environ``) what must hold before vLLM loads plugins.

    ``VLLM_PLUGINS`` gets ``vla_pruner`` added (keeping other named plugins): the one name
    enables both the model registration and the ``/v1/actions`` routes. Values the user set
    are kept.
    """
    env = os.environ if env is None else env
    plugins = [p.strip() for p in env.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    env["VLLM_PLUGINS"] = ",".join(plugins)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env
