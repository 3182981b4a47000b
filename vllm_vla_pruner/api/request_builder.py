"""One robot frame -> one engine request: prompt ids, image, ``SamplingParams``, ``extra_args``.

``POST /v1/actions`` (``ActionService``), the closed-loop Meta-World benchmark and
``vla-pruner bench engine`` all build their requests here, so a benchmark table measures the
request a robot sends: greedy, exactly ``action_dim`` tokens (OpenVLA's EOS is not an action),
token ids only (no detokenizing), and the pruning settings under the engine's ``extra_args``
keys, with the settings nobody gave left to the engine's server-wide defaults.
"""

from __future__ import annotations

import math
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
    KEY_NOISE_SEED,
    KEY_NUM_STEPS,
    KEY_SESSION,
)

if TYPE_CHECKING:
    from vllm import SamplingParams

__all__ = [
    "EXTRA_ARG_FIELDS",
    "OFT_CAMERAS",
    "EngineRequest",
    "RequestBuilder",
    "action_sampling_params",
    "chunk_sampling_params",
    "oft_camera_names",
    "pruning_extra_args",
]

#: Engine ``extra_args`` key -> the ``/v1/actions`` field a client sets it with, so an error
#: the engine raises about a key names the field the client sent.
EXTRA_ARG_FIELDS = {
    KEY_METHOD: "pruning.method",
    KEY_KEEP_RATIO: "pruning.keep_ratio",
    KEY_NEW_EPISODE: "new_episode",
    KEY_SESSION: "session_id",
    KEY_NOISE_SEED: "noise_seed",
    KEY_NUM_STEPS: "num_steps",
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


def chunk_sampling_params(extra_args: dict[str, Any]) -> SamplingParams:
    """One token: an OFT chunk is computed by the prefill forward; the token is discarded."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=0.0,
        max_tokens=1,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args=extra_args,
    )


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

    prompt: dict[str, Any]  # prompt_token_ids + multi_modal_data {"image": RGB PIL image(s)}
    params: SamplingParams
    session_id: str | None  # also passed as vLLM's own per-request session_id where supported


#: Camera names of an OFT checkpoint by its number of views, in the model's view order
#: (OFT's own server: the full third-person image first, then the wrist camera(s)). A
#: checkpoint may name its own in config.json's ``oft.camera_names``.
OFT_CAMERAS: dict[int, tuple[str, ...]] = {
    1: ("primary",),
    2: ("primary", "wrist"),
    3: ("primary", "left_wrist", "right_wrist"),
}


def oft_camera_names(num_images: int, config: Any = None) -> tuple[str, ...]:
    """The ``images`` keys an OFT model takes, in view order."""
    declared = None
    if isinstance(config, dict):
        declared = (config.get("oft") or {}).get("camera_names")
    if declared:
        names = tuple(str(n) for n in declared)
        if len(names) != num_images or len(set(names)) != num_images:
            raise ValueError(f"oft.camera_names {list(names)} must name {num_images} views")
        return names
    if num_images in OFT_CAMERAS:
        return OFT_CAMERAS[num_images]
    return tuple(f"view{i}" for i in range(num_images))


def _rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


class RequestBuilder:
    """Builds :class:`EngineRequest` s for one checkpoint (its tokenizer and action decoder).

    ``oft``: the checkpoint's OFT contract (``config.OftSpec``) when it is an OpenVLA-OFT
    checkpoint, ``pi0``: its ``pi0_spec.Pi0Spec`` when it is a pi0-style checkpoint; then
    :meth:`build_chunk` builds its requests. ``pi0_norm``: the checkpoint's
    ``pi0_spec.Pi0Normalizer``, which pi0.5 prompts need (the state is binned into the text).
    """

    def __init__(
        self,
        decoder: Any,
        tokenizer: Any,
        num_visual: int,
        max_model_len: int | None = None,
        oft: Any = None,
        pi0: Any = None,
        pi0_norm: Any = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.num_visual = int(num_visual)
        self.max_model_len = max_model_len
        self.oft = oft
        self.pi0 = pi0
        if pi0 is not None and pi0.pi05 and pi0_norm is None:
            raise ValueError("a pi0.5 checkpoint's requests need its Pi0Normalizer (pi0_norm)")
        self.pi0_norm = pi0_norm

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, max_model_len: int | None = None
    ) -> RequestBuilder:
        """From a checkpoint directory: its tokenizer, action decoder and visual token count."""
        from transformers import AutoTokenizer

        from vllm_vla_pruner.actions import ActionDecoder
        from vllm_vla_pruner.config import load_config_json, num_visual_tokens
        from vllm_vla_pruner.pi0_spec import is_pi0_checkpoint, pi0_normalizer, pi0_spec
        from vllm_vla_pruner.server_defaults import oft_checkpoint_spec

        pi0 = pi0_spec(model_dir) if is_pi0_checkpoint(model_dir) else None
        return cls(
            None if pi0 is not None else ActionDecoder.from_pretrained(model_dir),
            AutoTokenizer.from_pretrained(str(model_dir)),
            num_visual_tokens(load_config_json(model_dir)),
            max_model_len,
            oft_checkpoint_spec(model_dir),
            pi0,
            pi0_normalizer(model_dir) if pi0 is not None else None,
        )

    def prompt_token_ids(self, instruction: str) -> list[int]:
        """OpenVLA's prompt ids for ``instruction`` (BOS, prompt, the trailing space token)."""
        return [int(t) for t in self.decoder.prompt_token_ids(self.tokenizer, instruction)]

    def _check_fits(self, ids: list[int], action_dim: int, images: int = 1) -> None:
        """422 naming ``instruction`` when prompt + image(s) + action exceed ``max_model_len``."""
        need = len(ids) + images * self.num_visual + action_dim
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
        xargs = pruning_extra_args(method, keep_ratio, session_id, new_episode)
        return EngineRequest(
            prompt={"prompt_token_ids": ids, "multi_modal_data": {"image": _rgb(image)}},
            params=action_sampling_params(action_dim, xargs),
            session_id=session_id,
        )

    def build_chunk(
        self,
        instruction: str,
        images: list[Image.Image | np.ndarray],
        state: list[float] | None,
        *,
        method: str | None = None,
        keep_ratio: float | None = None,
        session_id: str | None = None,
        new_episode: bool = False,
        noise_seed: int | None = None,
        num_steps: int | None = None,
    ) -> EngineRequest:
        """The request for one chunk frame: its camera views (model order) and raw state.

        OFT: the prompt is OpenVLA's with OFT's proprio slot, placeholders and stop token
        (``oft.oft_prompt_token_ids``). pi0: openpi's ``BOS + text + "\\n"``
        (``pi0_spec.pi0_prompt_token_ids``), the present cameras only (a camera left out is
        a masked one), ``noise_seed`` / ``num_steps`` in ``extra_args``. The state travels
        un-normalised in ``extra_args`` (the model normalises it with the checkpoint's
        statistics); one token is asked for. pi0.5: the state is quantile-normalised and
        binned into the prompt's text instead (``Pi0Normalizer.state_bins``), so it is
        required here (ApiError 422 naming ``state``).
        """
        from vllm_vla_pruner.engine.plan import KEY_STATE
        from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED, KEY_NUM_STEPS

        if self.pi0 is not None:
            from vllm_vla_pruner.pi0_spec import pi0_prompt_token_ids

            bins = None
            if self.pi0.pi05:
                bins = self.pi0_norm.state_bins(self._pi05_state(state))
                state = None  # in the prompt; the model takes none
            ids = pi0_prompt_token_ids(self.tokenizer, instruction, self.pi0.max_token_len, bins)
        elif self.oft is not None:
            from vllm_vla_pruner.oft import oft_prompt_token_ids

            ids = oft_prompt_token_ids(self.prompt_token_ids(instruction), self.oft)
        else:
            raise ValueError("build_chunk needs an OpenVLA-OFT or pi0 checkpoint")
        self._check_fits(ids, 1, images=len(images))
        xargs = pruning_extra_args(method, keep_ratio, session_id, new_episode)
        if state is not None:
            xargs[KEY_STATE] = [float(x) for x in state]
        if noise_seed is not None:
            xargs[KEY_NOISE_SEED] = int(noise_seed)
        if num_steps is not None:
            xargs[KEY_NUM_STEPS] = int(num_steps)
        return EngineRequest(
            prompt={
                "prompt_token_ids": ids,
                "multi_modal_data": {"image": [_rgb(im) for im in images]},
            },
            params=chunk_sampling_params(xargs),
            session_id=session_id,
        )

    def _pi05_state(self, state: list[float] | None) -> list[float]:
        """pi0.5's raw state, checked: ``state_dim`` finite numbers (ApiError 422 naming
        ``state``; the API checks the same earlier, direct callers get it here)."""
        dim = self.pi0.state_dim
        if state is None:
            raise ApiError(422, f"field required: state ({dim} numbers)", field="state")
        if len(state) != dim:
            raise ApiError(422, f"state: must be {dim} numbers, got {len(state)}", field="state")
        values = [float(x) for x in state]
        if not all(math.isfinite(x) for x in values):
            raise ApiError(422, "state: must be finite numbers", field="state")
        return values
