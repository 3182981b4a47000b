"""API side: reject bad per-request pruning settings before they reach the engine.

Why: settings travel in ``SamplingParams.extra_args`` (``vllm_xargs``), which vLLM passes
through unchecked. ``InputProcessor.process_inputs`` runs in the API process for every route
(OpenAI chat/completions and our /v1/actions); a ``VLLMValidationError`` there becomes an HTTP 400
naming the key, and the engine never sees the request.
vLLM: 0.32.x. Upstream: no validation hook for extra_args exists.
"""

from __future__ import annotations

from vllm_vla_pruner.engine.settings import InvalidPruningSetting, validate_request_args


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor, "_vla_hooked", False):
        return
    original = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        try:
            validate_request_args(getattr(params, "extra_args", None))
        except InvalidPruningSetting as e:
            # vLLM answers its own validation errors with HTTP 400 naming the parameter.
            raise VLLMValidationError(str(e), parameter=e.field) from e
        return original(self, request_id, prompt, params, *args, **kwargs)

    InputProcessor.process_inputs = process_inputs
    InputProcessor._vla_hooked = True
