"""A vLLM worker extension for tests (``worker_extension_cls``): runs in the worker process."""

from __future__ import annotations

import types


class PruningHookSwitch:
    """Make the runner call the model without the plugin's step hook, as a model runner the
    hooks do not cover would (vLLM's V2 runner on a CUDA machine)."""

    def vla_test_bypass_hooks(self, bypass: bool) -> None:
        runner = self.model_runner
        if bypass:
            unhooked = type(runner)._vla_unhooked_model_forward
            runner._model_forward = types.MethodType(unhooked, runner)
        else:
            runner.__dict__.pop("_model_forward", None)
