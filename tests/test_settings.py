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
