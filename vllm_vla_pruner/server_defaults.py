"""Engine arguments and environment that make a VLA checkpoint start and prune on a CPU box.

The defaults are one typed table, :func:`engine_defaults` (engine argument, value, why),
computed from the checkpoint's config.json. Every launcher derives its form from it:
``vla-pruner serve`` the CLI flags (:func:`cpu_safe_engine_args`), the in-process engine of
the tests, benchmarks, closed-loop evaluation and Ray replicas the ``vllm.LLM`` keywords
(``engine/local.py``), and the ``EngineArgs`` hook for OpenVLA checkpoints
(``patches/engine_args.py``) the rows pruning cannot run without plus the one
``max_num_batched_tokens`` rule (:func:`batched_tokens`). Every default yields to the same
setting given by the user (``--flag``, ``--flag=value``, ``--no-flag``, the underscore
spelling, or a keyword), except the ``REQUIRED_FOR_PRUNING`` rows under an OpenVLA checkpoint.

``VLLM_CPU_KVCACHE_SPACE=1`` (GiB, :func:`cpu_safe_env`): the CPU backend otherwise reserves a
large fraction of RAM, and start-up fails on a shared machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_vla_pruner.config import OftSpec

__all__ = [
    "PLUGIN_NAME",
    "REQUIRED_FOR_PRUNING",
    "EngineDefault",
    "batched_tokens",
    "checkpoint_dtype",
    "cpu_safe_engine_args",
    "cpu_safe_env",
    "default_max_model_len",
    "engine_defaults",
    "flag_value",
    "has_flag",
    "oft_checkpoint_spec",
    "prompt_budget",
]

PLUGIN_NAME = "vla_pruner"
BLOCK_SIZE = 32
#: Token room reserved for the instruction text (OpenVLA prompts are ~20-40 tokens).
TEXT_TOKENS = 256
#: Whole prompts one prefill step holds: a burst of robot frames is one forward pass.
PREFILL_PROMPTS = 8


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


def prompt_budget(config: Mapping[str, Any], oft: OftSpec | None = None) -> int:
    """Tokens one request needs at most: BOS + visual tokens + instruction + action.

    OFT (``oft`` given): every camera view's visual tokens, the proprio token, and the
    ACTION_DIM x CHUNK placeholders + stop token instead of the action tokens.
    """
    from vllm_vla_pruner.config import num_visual_tokens
    from vllm_vla_pruner.pi0_spec import is_pi0_config, spec_from_config

    if is_pi0_config(config):  # pi0: every camera's tokens and the language slots, no action
        pi0 = spec_from_config(config)
        return pi0.num_cameras * num_visual_tokens(config) + pi0.max_token_len
    if oft is not None:
        proprio = 1 if oft.proprio_dim else 0
        views = oft.num_images * num_visual_tokens(config)
        return 1 + views + proprio + TEXT_TOKENS + oft.num_action_rows
    stats = config.get("norm_stats") or {}
    dims = [len(s.get("action", {}).get("q01", [])) for s in stats.values() if isinstance(s, dict)]
    action_dim = max(dims, default=0) or 7
    return 1 + num_visual_tokens(config) + TEXT_TOKENS + action_dim


def default_max_model_len(config: Mapping[str, Any], oft: OftSpec | None = None) -> int | None:
    """The prompt budget rounded up to 128, within the model's positions (None: unknown)."""
    try:
        need = prompt_budget(config, oft)
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


@dataclass(frozen=True)
class EngineDefault:
    """One engine argument the plugin sets unless the user did, and why."""

    name: str  # EngineArgs field = vllm.LLM keyword; the CLI flag is --name-with-dashes
    value: Any
    why: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def argv(self) -> list[str]:
        """The CLI form: ``--flag``/``--no-flag`` for booleans, JSON for mappings."""
        if isinstance(self.value, bool):
            return [self.flag if self.value else "--no-" + self.flag[2:]]
        value = json.dumps(self.value) if isinstance(self.value, Mapping) else str(self.value)
        return [self.flag, value]


#: The rows pruning cannot run without: forced for OpenVLA checkpoints even under plain
#: ``vllm serve`` (patches/engine_args.py), with a log line.
REQUIRED_FOR_PRUNING = (
    EngineDefault(
        "enable_prefix_caching",
        False,
        "a pruned request's KV blocks for layers >= K hold its own compacted layout, which "
        "no other request may share",
    ),
    EngineDefault(
        "enable_chunked_prefill",
        False,
        "the scores at layer K-1 need the whole image and prompt in one prefill step",
    ),
    EngineDefault(
        "enforce_eager",
        True,
        "the pruned decoder loop is Python between layers: a captured CUDA graph would replay "
        "an unpruned forward",
    ),
)


def batched_tokens(
    max_model_len: int, max_num_seqs: int | None = None, given: int | None = None
) -> int:
    """The one ``max_num_batched_tokens`` rule.

    Not given: room for ``PREFILL_PROMPTS`` whole prompts (fewer if ``max_num_seqs`` is
    smaller; never below ``max_num_seqs``, which vLLM requires), so a burst of robot frames
    prefills in one step. Given: the user's value, raised to ``max_model_len`` if below it,
    since without chunked prefill a prompt must fit one step.
    """
    if given is not None:
        return max(given, max_model_len)
    prompts = (
        PREFILL_PROMPTS if max_num_seqs is None else max(1, min(PREFILL_PROMPTS, max_num_seqs))
    )
    return max(max_model_len * prompts, max_num_seqs or 0)


def oft_checkpoint_spec(model_dir: str | Path | None) -> OftSpec | None:
    """The OFT contract of ``model_dir`` if it is an OpenVLA-OFT checkpoint, else None."""
    from vllm_vla_pruner.config import is_oft_checkpoint, oft_spec

    if model_dir is None or not Path(model_dir).is_dir() or not is_oft_checkpoint(model_dir):
        return None
    return oft_spec(model_dir)


def engine_defaults(
    config: Mapping[str, Any] | None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    oft: OftSpec | None = None,
) -> list[EngineDefault]:
    """The plugin's engine defaults for a checkpoint (``config`` None: not readable).

    ``max_model_len`` / ``max_num_seqs``: the user's values, which the batched-token rule
    follows; the max_model_len row then carries the user's value (callers drop rows the user
    set, so it is never applied twice). ``oft``: the checkpoint's OFT contract
    (:func:`oft_checkpoint_spec`) when it is an OpenVLA-OFT checkpoint.
    """
    rows: list[EngineDefault] = []
    if config is not None and checkpoint_dtype(config) == "float32":
        rows.append(
            EngineDefault(
                "dtype",
                "float32",
                "the checkpoint is float32; vLLM's auto may pick half precision for it",
            )
        )
    if max_model_len is None and config is not None:
        max_model_len = default_max_model_len(config, oft)
    if max_model_len is not None:
        rows.append(
            EngineDefault(
                "max_model_len",
                max_model_len,
                "BOS + visual tokens + a long instruction + the action; the Llama's 2k-4k "
                "context wastes KV memory on a CPU",
            )
        )
    rows.extend(REQUIRED_FOR_PRUNING)
    if max_model_len is not None:
        rows.append(
            EngineDefault(
                "max_num_batched_tokens",
                batched_tokens(max_model_len, max_num_seqs),
                f"{PREFILL_PROMPTS} whole prompts per prefill step (batched_tokens)",
            )
        )
    rows.append(
        EngineDefault(
            "block_size",
            BLOCK_SIZE,
            "the CPU default of 128 hides per-request KV savings on short prompts",
        )
    )
    from vllm_vla_pruner.pi0_spec import is_pi0_config, spec_from_config

    if config is not None and is_pi0_config(config):
        cameras = spec_from_config(config).num_cameras
        rows.append(
            EngineDefault(
                "limit_mm_per_prompt",
                {"image": cameras},
                f"one image per present camera: this pi0 checkpoint has {cameras} slots",
            )
        )
        return rows
    if oft is None:
        rows.append(
            EngineDefault(
                "limit_mm_per_prompt",
                {"image": 1},
                "one camera frame per request (OpenVLA's format)",
            )
        )
        return rows
    from vllm_vla_pruner import OFT_ARCH

    rows.append(
        EngineDefault(
            "hf_overrides",
            {"architectures": [OFT_ARCH]},
            "published OFT configs name the AR OpenVLA architecture; the action head and "
            "proprio projector beside them select the parallel-decoding model",
        )
    )
    rows.append(
        EngineDefault(
            "limit_mm_per_prompt",
            {"image": oft.num_images},
            f"one image per camera view: this OFT checkpoint takes {oft.num_images}",
        )
    )
    return rows


def _parse_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def cpu_safe_engine_args(model_dir: str | Path, user_args: Sequence[str] = ()) -> list[str]:
    """``user_args`` plus the CLI form of the defaults the user did not set (defaults first)."""
    user = list(user_args)
    rows = engine_defaults(
        _read_config(model_dir),
        max_model_len=_parse_tokens(flag_value(user, "--max-model-len")),
        max_num_seqs=_parse_int(flag_value(user, "--max-num-seqs")),
        oft=oft_checkpoint_spec(model_dir),
    )
    out = [arg for row in rows if not has_flag(user, row.flag) for arg in row.argv()]
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
