"""Where the engine's pruning settings come from: paper defaults < checkpoint < operator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_vla_pruner.engine.settings import PruningSettings


def test_checkpoint_recommendation_then_operator_override() -> None:
    paper = PruningSettings()
    assert (paper.layer, paper.action_layer, paper.window) == (3, None, 3)
    ckpt = PruningSettings.resolve({"layer": 2, "action_layer": 1})
    assert (ckpt.layer, ckpt.action_layer, ckpt.action_layer_for(4)) == (2, 1, 1)
    both = PruningSettings.resolve({"layer": 2, "action_layer": 1}, {"layer": 1, "window": 5})
    assert (both.layer, both.action_layer, both.window) == (1, 1, 5)


def test_from_vllm_config_reads_the_hf_config_and_additional_config() -> None:
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(vla_pruner={"layer": 2})),
        additional_config={"vla_pruner": {"method": "vlapruner"}},
    )
    s = PruningSettings.from_vllm_config(vllm_config)
    assert (s.layer, s.method) == (2, "vlapruner")
    bare = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace()))
    assert PruningSettings.from_vllm_config(bare) == PruningSettings()


@pytest.mark.parametrize("source", ["checkpoint", "operator"])
def test_unknown_setting_names_its_source(source: str) -> None:
    bad = {"layers": 2}
    args = (bad, None) if source == "checkpoint" else (None, bad)
    with pytest.raises(ValueError, match=rf"\['layers'\] from the {source}"):
        PruningSettings.resolve(*args)


def test_benchmark_runs_the_layers_a_deployment_would() -> None:
    """``bench metaworld`` resolves K and the action layer as the engine does: flags over the
    checkpoint's recommendation over the paper's defaults, checked against the depth."""
    from vllm_vla_pruner.research.sim.benchmark import pruning_layers_for

    def cfg(layers: int, recommended: dict | None = None) -> dict:
        out = {"text_config": {"num_hidden_layers": layers}}
        return out if recommended is None else {**out, "vla_pruner": recommended}

    assert pruning_layers_for(cfg(4, {"layer": 2, "action_layer": 2})) == (2, 2)
    assert pruning_layers_for(cfg(32)) == (3, 16)  # the paper's K and the middle layer
    assert pruning_layers_for(cfg(4)) == (3, 2)  # what `vllm serve` would run, not a rescale
    assert pruning_layers_for(cfg(4, {"layer": 2}), layer=1) == (1, 2)
    assert pruning_layers_for(cfg(4, {"layer": 2}), action_layer=0) == (2, 0)
    with pytest.raises(ValueError, match=r"vla_pruner.layer must be in \[1, 1\]"):
        pruning_layers_for(cfg(2))
    with pytest.raises(ValueError, match="vla_pruner.action_layer"):
        pruning_layers_for(cfg(4), action_layer=4)
    with pytest.raises(ValueError, match="unknown vla_pruner settings"):
        pruning_layers_for(cfg(4, {"layers": 2}))


BAD_REQUEST_VALUES = [
    ("vla_pruner", "magic", "pruning", {"method": "magic"}),
    ("vla_pruner", "", "pruning", {"method": ""}),
    ("vla_keep_ratio", 0, "pruning", {"keep_ratio": 0}),
    ("vla_keep_ratio", 1.5, "pruning", {"keep_ratio": 1.5}),
    ("vla_keep_ratio", float("nan"), "pruning", {"keep_ratio": float("nan")}),
    ("vla_keep_ratio", "0.5", "pruning", {"keep_ratio": "0.5"}),
    ("vla_keep_ratio", True, "pruning", {"keep_ratio": True}),
    ("vla_new_episode", 1, "new_episode", 1),
    ("vla_new_episode", "yes", "new_episode", "yes"),
    ("vla_session_id", "", "session_id", ""),
    ("vla_session_id", "x" * 257, "session_id", "x" * 257),
    ("vla_session_id", "a\nb", "session_id", "a\nb"),
]


@pytest.mark.parametrize(("key", "value", "field", "body_value"), BAD_REQUEST_VALUES)
def test_every_route_refuses_the_same_values(key, value, field, body_value) -> None:
    """The /v1/actions body and the extra_args of vLLM's own routes share one set of checks:
    what one refuses, the other refuses too, each naming its own field."""
    from vllm_vla_pruner.api.protocol import ApiError, parse_action_request
    from vllm_vla_pruner.engine.settings import InvalidPruningSetting, validate_request_args

    with pytest.raises(InvalidPruningSetting) as engine_err:
        validate_request_args({key: value})
    assert engine_err.value.field == key
    body = {"image": "aGVsbG8=", "instruction": "go", field: body_value}
    with pytest.raises(ApiError) as api_err:
        parse_action_request(body)
    assert api_err.value.field.startswith(field)
    assert engine_err.value.reason in api_err.value.message


def test_good_values_pass_everywhere() -> None:
    from vllm_vla_pruner.api.protocol import parse_action_request
    from vllm_vla_pruner.engine.settings import validate_request_args

    validate_request_args(
        {
            "vla_pruner": "vlapruner",
            "vla_keep_ratio": 1,
            "vla_new_episode": True,
            "vla_session_id": "robot-7",
        }
    )
    req = parse_action_request(
        {
            "image": "aGVsbG8=",
            "instruction": "go",
            "session_id": "robot-7",
            "new_episode": True,
            "pruning": {"method": "vlapruner", "keep_ratio": 1},
        }
    )
    assert req.pruning.keep_ratio == 1.0 and req.new_episode is True


def test_flow_settings_checked():
    from vllm_vla_pruner.engine.settings import (
        MAX_FLOW_STEPS,
        InvalidPruningSetting,
        validate_request_args,
    )

    validate_request_args({"vla_noise_seed": 0, "vla_num_steps": 10})
    for bad in (
        {"vla_noise_seed": -1},
        {"vla_noise_seed": "7"},
        {"vla_noise_seed": True},
        {"vla_num_steps": 0},
        {"vla_num_steps": MAX_FLOW_STEPS + 1},
        {"vla_num_steps": 2.0},
    ):
        with pytest.raises(InvalidPruningSetting):
            validate_request_args(bad)
