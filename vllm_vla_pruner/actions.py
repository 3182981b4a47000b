"""Action tokens <-> continuous robot actions, exactly as OpenVLA does it.

OpenVLA discretises each normalised action dimension into ``n_action_bins`` uniform bins
over [-1, 1] and emits one token per dimension from the top of the tokenizer vocabulary
(token ``V - k`` for digitized bin ``k``). ``decode`` inverts that (bin centres, then
un-normalisation with the dataset's q01/q99 where ``mask`` is true); ``encode`` is the
training-side direction (OpenVLA's ``ActionTokenizer``). vLLM returns token ids only, so the
endpoint, the reference and the trainer all go through this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import OPENVLA_PROMPT, action_vocab_size

__all__ = [
    "ActionDecoder",
    "ActionDecodingError",
    "EmptyInstruction",
    "InvalidActionTokens",
    "InvalidActions",
    "InvalidNormStats",
    "UnknownUnnormKey",
    "SPIECE_UNDERLINE",
]

SPIECE_UNDERLINE = "▁"


class ActionDecodingError(ValueError):
    """Base class: the request (not the server) is wrong."""


class UnknownUnnormKey(ActionDecodingError):
    """``unnorm_key`` missing (several datasets) or not in the checkpoint's norm_stats."""

    def __init__(self, key: str | None, valid: Sequence[str]) -> None:
        self.key = key
        self.valid = list(valid)
        if key is None:
            msg = f"unnorm_key is required: this model has several datasets {self.valid}"
        else:
            msg = f"unknown unnorm_key {key!r}; valid keys: {self.valid}"
        super().__init__(msg)


class InvalidActionTokens(ActionDecodingError):
    """Token ids that cannot be decoded (wrong count, not integers, negative)."""


class InvalidActions(ActionDecodingError):
    """Continuous actions that cannot be encoded (wrong shape, not finite)."""


class InvalidNormStats(ActionDecodingError):
    """A checkpoint whose norm_stats do not follow OpenVLA's layout."""


class EmptyInstruction(ActionDecodingError):
    """An instruction that is not a non-empty string."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


class ActionDecoder:
    """Decodes/encodes the action tokens of one OpenVLA-format checkpoint.

    ``vocab_size`` is OpenVLA's ``config.text_config.vocab_size - config.pad_to_multiple_of``
    (32000 for openvla-7b): the tokenizer's vocabulary, whose top ids are the action tokens.
    """

    def __init__(
        self,
        norm_stats: Mapping[str, Any],
        vocab_size: int,
        n_action_bins: int = 256,
        suffix_token_id: int | None = None,
    ) -> None:
        if n_action_bins < 2:
            raise InvalidNormStats(f"n_action_bins must be >= 2, got {n_action_bins}")
        if vocab_size <= n_action_bins:
            raise InvalidNormStats(f"vocab_size {vocab_size} <= n_action_bins {n_action_bins}")
        self.vocab_size = int(vocab_size)
        self.n_action_bins = int(n_action_bins)
        self.suffix_token_id = suffix_token_id
        self.bins = np.linspace(-1.0, 1.0, self.n_action_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self._stats: dict[str, dict[str, np.ndarray]] = {}
        if not isinstance(norm_stats, Mapping) or not norm_stats:
            raise InvalidNormStats("norm_stats must be a non-empty mapping of dataset keys")
        for key, entry in norm_stats.items():
            self._stats[key] = self._parse_action_stats(key, entry)
        self.norm_stats = norm_stats

    @staticmethod
    def _parse_action_stats(key: str, entry: Any) -> dict[str, np.ndarray]:
        action = entry.get("action") if isinstance(entry, Mapping) else None
        if not isinstance(action, Mapping) or "q01" not in action or "q99" not in action:
            raise InvalidNormStats(f"norm_stats[{key!r}]['action'] needs q01 and q99")
        q01 = np.asarray(action["q01"], dtype=np.float64)
        q99 = np.asarray(action["q99"], dtype=np.float64)
        mask = np.asarray(action.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        if q01.ndim != 1 or q01.shape != q99.shape or mask.shape != q01.shape or not q01.size:
            raise InvalidNormStats(
                f"norm_stats[{key!r}]['action']: q01 {q01.shape}, q99 {q99.shape} and mask "
                f"{mask.shape} must be equal-length non-empty lists"
            )
        return {"q01": q01, "q99": q99, "mask": mask}

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any) -> ActionDecoder:
        """From a config.json dict or an HF/vLLM config object."""
        norm_stats = _get(config, "norm_stats")
        if norm_stats is None:
            raise InvalidNormStats("the checkpoint config has no norm_stats")
        return cls(
            norm_stats,
            vocab_size=action_vocab_size(config),
            n_action_bins=int(_get(config, "n_action_bins", 256) or 256),
            suffix_token_id=_get(config, "action_prompt_suffix_token_id"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ActionDecoder:
        with open(Path(model_dir) / "config.json") as f:
            return cls.from_config(json.load(f))

    # ---- keys ----------------------------------------------------------------------

    @property
    def unnorm_keys(self) -> list[str]:
        return list(self._stats)

    @property
    def default_unnorm_key(self) -> str | None:
        """The only dataset key, or None when there are several (then callers must name one)."""
        return self.unnorm_keys[0] if len(self._stats) == 1 else None

    def resolve_unnorm_key(self, unnorm_key: str | None = None) -> str:
        if unnorm_key is None:
            if len(self._stats) == 1:
                return self.unnorm_keys[0]
            raise UnknownUnnormKey(None, self.unnorm_keys)
        if not isinstance(unnorm_key, str) or unnorm_key not in self._stats:
            raise UnknownUnnormKey(unnorm_key, self.unnorm_keys)
        return unnorm_key

    def action_dim(self, unnorm_key: str | None = None) -> int:
        return int(self._stats[self.resolve_unnorm_key(unnorm_key)]["q01"].size)

    @property
    def action_token_ids(self) -> range:
        """Ids ``encode`` can produce: the top ``n_action_bins`` of the tokenizer vocabulary."""
        return range(self.vocab_size - self.n_action_bins, self.vocab_size)

    # ---- decode / encode ---------------------------------------------------------

    def token_bins(self, token_ids: Any) -> np.ndarray:
        """Bin index per token: ``clip(V - id - 1, 0, n_bins - 2)`` (OpenVLA's rule)."""
        ids = self._as_token_array(token_ids)
        return np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)

    def normalized_actions(self, token_ids: Any) -> np.ndarray:
        """Token ids -> bin centres in [-1, 1]."""
        return self.bin_centers[self.token_bins(token_ids)]

    def decode(self, token_ids: Any, unnorm_key: str | None = None) -> list[float]:
        """``action_dim`` token ids -> un-normalised action (one float per dimension)."""
        key = self.resolve_unnorm_key(unnorm_key)
        stats = self._stats[key]
        ids = self._as_token_array(token_ids)
        if ids.shape != stats["q01"].shape:
            raise InvalidActionTokens(
                f"expected {stats['q01'].size} action token ids for {key!r}, got {ids.size}"
            )
        normalized = self.bin_centers[
            np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        ]
        q01, q99 = stats["q01"], stats["q99"]
        actions = np.where(stats["mask"], 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)
        return [float(a) for a in actions]

    def normalize(self, actions: Any, unnorm_key: str | None = None) -> np.ndarray:
        """Raw actions -> [-1, 1] (OpenVLA's BOUNDS_Q99 normalisation; mask-False dims clipped)."""
        key = self.resolve_unnorm_key(unnorm_key)
        stats = self._stats[key]
        a = self._as_action_array(actions, stats["q01"].size)
        q01, q99 = stats["q01"], stats["q99"]
        scaled = np.clip(2 * (a - q01) / (q99 - q01 + 1e-8) - 1, -1.0, 1.0)
        return np.clip(np.where(stats["mask"], scaled, a), -1.0, 1.0)

    def encode(self, actions: Any, unnorm_key: str | None = None) -> list[int]:
        """Raw action -> token ids (OpenVLA's ActionTokenizer: ``V - digitize(x, bins)``)."""
        normalized = self.normalize(actions, unnorm_key)
        return [int(t) for t in self.vocab_size - np.digitize(normalized, self.bins)]

    # ---- prompt ----------------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        return OPENVLA_PROMPT.format(instruction=_check_instruction(instruction))

    def prompt_token_ids(self, tokenizer: Any, instruction: str) -> list[int]:
        """OpenVLA's prompt ids: BOS + prompt + the lone "▁" token (as ``predict_action`` adds).

        ``tokenizer`` is an HF tokenizer or vLLM's tokenizer wrapper (``encode`` is used).
        """
        ids = list(tokenizer.encode(self.prompt(instruction), add_special_tokens=True))
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, int(bos))
        suffix = self.suffix_token_id
        if suffix is None:
            suffix = tokenizer.convert_tokens_to_ids(SPIECE_UNDERLINE)
        if ids[-1] != suffix:
            ids.append(int(suffix))
        return ids

    # ---- validation helpers ------------------------------------------------------

    @staticmethod
    def _as_token_array(token_ids: Any) -> np.ndarray:
        if hasattr(token_ids, "detach"):  # torch tensor, without importing torch
            token_ids = token_ids.detach().cpu().numpy()
        if isinstance(token_ids, (str, bytes)) or np.ndim(token_ids) != 1:
            raise InvalidActionTokens("action token ids must be a flat sequence of integers")
        arr = np.asarray(token_ids)
        if arr.size and (arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer)):
            raise InvalidActionTokens(f"action token ids must be integers, got {arr.dtype}")
        arr = arr.astype(np.int64)
        if (arr < 0).any():
            raise InvalidActionTokens("action token ids must be non-negative")
        return arr

    @staticmethod
    def _as_action_array(actions: Any, dim: int) -> np.ndarray:
        if hasattr(actions, "detach"):
            actions = actions.detach().cpu().numpy()
        try:
            a = np.asarray(actions, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise InvalidActions(f"actions must be numbers: {e}") from None
        if a.shape != (dim,):
            raise InvalidActions(f"expected an action of shape ({dim},), got {a.shape}")
        if not np.isfinite(a).all():
            raise InvalidActions("actions must be finite")
        return a


def _check_instruction(instruction: Any) -> str:
    if not isinstance(instruction, str):
        raise EmptyInstruction(f"instruction must be a string, got {type(instruction).__name__}")
    text = instruction.strip()
    if not text:
        raise EmptyInstruction("instruction must not be empty")
    return text
