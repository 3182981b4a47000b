"""One robot frame -> one engine request: prompt ids, image, ``SamplingParams``, ``extra_args``.

``POST /v1/actions`` (``ActionService``), the closed-loop Meta-World benchmark and
``vla-pruner bench engine`` all build their requests here, so a benchmark table measures the
request a robot sends: greedy, exactly ``action_dim`` tokens (OpenVLA's EOS is not an action),
token ids only (no detokenizing), and the pruning settings under the engine's ``extra_args``
keys, with the settings nobody gave left to the engine's server-wide defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vllm_vla_pruner.api.protocol import ApiError
from vllm_vla_pruner.engine.settings import (
    KEY_KEEP_RATIO,
    KEY_METHOD,
    KEY_NEW_EPISODE,
    KEY_SESSION,
)

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = [
    "EXTRA_ARG_FIELDS",
    "EngineRequest",
    "RequestBuilder",
    "action_sampling_params",
    "pruning_extra_args",
]

#: Engine ``extra_args`` key -> the ``/v1/actions`` field a client sets it with, so an error
#: the engine raises about a key names the field the client sent.
EXTRA_ARG_FIELDS = {
    KEY_METHOD: "pruning.method",
    KEY_KEEP_RATIO: "pruning.keep_ratio",
    KEY_NEW_EPISODE: "new_episode",
    KEY_SESSION: "session_id",
}


def pruning_extra_args(
    method: str | None = None,
    keep_ratio: float | None = None,
    session_id: str | None = None,
    new_episode: bool = False,
) -> dict[str, Any]:
    """The per-request pruning settings as ``SamplingParams.extra_args``.

    Settings not given (None) are left out, so the engine applies its own server-wide
    defaults instead of the caller guessing them.
    """
    xargs: dict[str, Any] = {KEY_NEW_EPISODE: bool(new_episode)}
    if session_id is not None:
        xargs[KEY_SESSION] = session_id
    if method is not None:
        xargs[KEY_METHOD] = method
    if keep_ratio is not None:
        xargs[KEY_KEEP_RATIO] = float(keep_ratio)
    return xargs


def action_sampling_params(action_dim: int, extra_args: dict[str, Any]) -> SamplingParams:
    """Greedy, exactly ``action_dim`` tokens (EOS is not an action), ids only, final output."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=0.0,
        max_tokens=action_dim,
        min_tokens=action_dim,
        ignore_eos=True,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=extra_args,
    )


@dataclass(frozen=True)
class EngineRequest:
    """What the engine is given for one frame (``LLM.generate`` or ``EngineClient.generate``)."""

    prompt: dict[str, Any]  # prompt_token_ids + multi_modal_data {"image": RGB PIL image}
    params: SamplingParams
    session_id: str | None  # also passed as vLLM's own per-request session_id where supported


class RequestBuilder:
    """Builds :class:`EngineRequest` s for one checkpoint (its tokenizer and action decoder)."""

    def __init__(
        self, decoder: Any, tokenizer: Any, num_visual: int, max_model_len: int | None = None
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.num_visual = int(num_visual)
        self.max_model_len = max_model_len

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, max_model_len: int | None = None
    ) -> RequestBuilder:
        """From a checkpoint directory: its tokenizer, action decoder and visual token count."""
        from transformers import AutoTokenizer

        from vllm_vla_pruner.actions import ActionDecoder
        from vllm_vla_pruner.config import load_config_json, num_visual_tokens

        return cls(
            ActionDecoder.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(str(model_dir)),
            num_visual_tokens(load_config_json(model_dir)),
            max_model_len,
        )

    def prompt_token_ids(self, instruction: str) -> list[int]:
        """OpenVLA's prompt ids for ``instruction`` (BOS, prompt, the trailing space token)."""
        return [int(t) for t in self.decoder.prompt_token_ids(self.tokenizer, instruction)]

    def _check_fits(self, ids: list[int], action_dim: int) -> None:
        """422 naming ``instruction`` when prompt + image + action exceed ``max_model_len``."""
        need = len(ids) + self.num_visual + action_dim
        if self.max_model_len is not None and need > self.max_model_len:
            raise ApiError(
                422,
                f"instruction: too long, the prompt needs {need} tokens with the image and "
                f"action, max_model_len is {self.max_model_len}",
                field="instruction",
            )

    def build(
        self,
        instruction: str,
        image: Image.Image | np.ndarray,
        action_dim: int,
        *,
        method: str | None = None,
        keep_ratio: float | None = None,
        session_id: str | None = None,
        new_episode: bool = False,
    ) -> EngineRequest:
        """The request for one camera frame; pruning settings left None use the engine's."""
        ids = self.prompt_token_ids(instruction)
        self._check_fits(ids, action_dim)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if image.mode != "RGB":
            image = image.convert("RGB")
        xargs = pruning_extra_args(method, keep_ratio, session_id, new_episode)
        return EngineRequest(
            prompt={"prompt_token_ids": ids, "multi_modal_data": {"image": image}},
            params=action_sampling_params(action_dim, xargs),
            session_id=session_id,
        )
