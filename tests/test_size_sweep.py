"""The size sweep's arithmetic and report (no engine, no timing): per-control-step time, the
whole-step FLOPs-ideal, micro-batching, the paying-size rule and the trainer's position limit."""

from __future__ import annotations

import pytest

from vllm_vla_pruner.metrics import ModelDims, prefill_flops, vit_flops
from vllm_vla_pruner.research.bench.size_sweep import (
    SIZES,
    Size,
    best_of_ratio,
    conclusion,
    markdown,
    micro_batch,
    ms_per_control_step,
    sizes_by_name,
    smallest_paying,
    spread,
    step_flops,
    trainer_args,
    whole_step_ideal,
)
from vllm_vla_pruner.research.sim.train import max_positions, model_overrides

TOWER = {"width": 128, "mlp_hidden": 512, "depth": 4, "class_token": True, "num_registers": 4}


def test_control_step_time_divides_by_every_executed_action() -> None:
    assert ms_per_control_step(400.0, 1) == 100.0
    assert ms_per_control_step(400.0, 16) == 6.25
    assert ms_per_control_step(400.0, 2, execute=8) == 25.0


def test_best_of_ratio_compares_the_least_disturbed_repeats() -> None:
    assert best_of_ratio([100.0, 400.0, 120.0], [50.0, 55.0, 300.0]) == 2.0
    assert best_of_ratio([10.0], [20.0]) == 0.5  # a slowdown stays a slowdown
    assert spread([100.0, 400.0, 120.0]) == 4.0


def test_whole_step_ideal_is_pulled_towards_one_by_the_unpruned_tower() -> None:
    assert whole_step_ideal(100.0, 50.0, 0.0) == 2.0
    assert whole_step_ideal(100.0, 50.0, 50.0) == 1.5
    assert whole_step_ideal(100.0, 100.0, 30.0) == 1.0


def test_step_flops_counts_both_views_with_class_and_register_tokens() -> None:
    dims = ModelDims(128, 256, 2, 2, 4)
    f = step_flops(dims, rows=184, visual=128, kept=32, layer_k=2, tower=TOWER, views=2)
    assert f["decoder_full"] == prefill_flops(dims, 184, 184, 2)
    assert f["decoder_pruned"] == prefill_flops(dims, 184, 88, 2)
    assert f["vision"] == 2 * vit_flops(128, 512, 4, 64 + 1 + 4)
    assert f["decoder_pruned"] < f["decoder_full"]


def test_micro_batch_is_the_largest_divisor_that_fits() -> None:
    assert micro_batch(32, 10.0, 1000.0) == 32
    assert micro_batch(32, 10.0, 200.0) == 16
    assert micro_batch(32, 10.0, 79.0) == 4
    assert micro_batch(32, 10.0, 1.0) == 1  # never zero: one sample at a time at worst
    assert micro_batch(30, 10.0, 200.0) == 15


def _row(name: str, speed1: float, speed16: float, train_ratio: float) -> dict:
    def eng(s: float) -> dict:
        return {
            "unpruned_ms_per_control_step": 10.0 * s,
            "pruned_ms_per_control_step": 10.0,
            "speedup": s,
            "speedup_median": s - 0.05,
            "flops_ideal_decoder": 2.0,
            "flops_ideal_whole": 1.8,
            "vision_share_of_flops": 0.1,
            "unpruned_chunk_ms_samples": [10.0 * s, 20.0 * s],
            "pruned_chunk_ms_samples": [10.0, 15.0],
        }

    size = next(s for s in SIZES if s.name == name)
    return {
        "size": {"name": name, "axis": size.axis, "tokens_per_view": size.tokens_per_view,
                 "hidden": size.hidden, "layers": size.layers},
        "engine": {"1": eng(speed1), "16": eng(speed16)},
        "train": {"parameters": 1e6, "s_per_step": 1.0, "micro_batch": 32,
                  "ratio_to_shipped": train_ratio, "anchored_schedule_hours": train_ratio},
        "layer_k": 2, "window": 3, "load_before": [3.0, 3.0, 3.0], "engine_seconds": 60.0,
        "train_seconds": 60.0,
    }  # fmt: skip


def test_smallest_paying_size_is_the_cheapest_to_train_above_the_bar() -> None:
    rows = [
        _row("shipped", 0.9, 1.0, 1.0),
        _row("depth-32", 1.5, 1.2, 6.0),
        _row("width-512", 1.4, 1.6, 4.0),
    ]
    assert smallest_paying(rows, 1) == "width-512"
    assert smallest_paying(rows, 16) == "width-512"
    assert smallest_paying(rows, 1, threshold=1.45) == "depth-32"
    assert smallest_paying(rows, 16, threshold=2.0) is None
    assert smallest_paying(rows, 8) is None  # a batch that was not measured


def test_report_states_a_missed_bar_and_names_the_paying_size() -> None:
    rows = [_row("shipped", 0.9, 1.0, 1.0), _row("depth-32", 1.1, 1.5, 6.0)]
    text = conclusion(rows, (1, 16))
    assert text[0].startswith("- Batch 1: no size reached 1.3x")
    assert "shipped 0.90x" in text[0] and "**depth-32**" in text[1]
    result = {
        "rows": rows, "batches": [1, 16], "keep": 0.25, "repeats": 2, "train_threads": 1,
        "mem_budget_gb": 2.0, "shipped_recorded_s_per_step": 0.83, "load_before": [1, 1, 1],
        "load_after": [1, 1, 1], "minutes": 3.0, "conclusion": text,
    }  # fmt: skip
    md = markdown(result)
    assert (
        md.count("| shipped |") == 1
        and "**1.50x**" in md
        and "6.0 h" in md
        and "| 2.0 / 1.5 |" in md
    )


def test_sizes_by_name_keeps_sweep_order_and_names_the_valid_ones() -> None:
    assert [s.name for s in sizes_by_name(["bench-oft", "shipped"])] == ["shipped", "bench-oft"]
    assert len(sizes_by_name(None)) == len(SIZES)
    with pytest.raises(ValueError, match="depth-8"):
        sizes_by_name(["depth-9"])


def test_sweep_starts_from_the_shipped_layout_and_moves_one_axis_at_a_time() -> None:
    base = SIZES[0]
    assert (base.tokens_per_view, base.hidden, base.layers) == (64, 128, 4)
    for s in SIZES[1:]:
        changed = [
            a
            for a, v in (("tokens", s.tokens_per_view), ("width", s.hidden), ("depth", s.layers))
            if v != getattr(base, {"tokens": "tokens_per_view", "width": "hidden",
                                   "depth": "layers"}[a])
        ]  # fmt: skip
        assert len(changed) == (3 if s.axis == "combined" else 1), s


def test_trainer_position_limit_fits_two_views_of_256_tokens() -> None:
    assert max_positions(64) == 256  # the shipped policies' value, unchanged
    assert max_positions(256) == 1024
    assert max_positions(256, views=1) == 512
    args = trainer_args(Size("t", "visual tokens", image_size=128))
    over = model_overrides(args, {"metaworld": {}})
    assert over["max_position_embeddings"] >= 2 * 256 + 1 + 1 + 32 + 1 + 16
    assert (over["hidden_size"], over["num_hidden_layers"], over["image_size"]) == (128, 4, 128)


def test_first_size_is_the_shipped_checkpoints_shape() -> None:
    from vllm_vla_pruner.config import load_config_json
    from vllm_vla_pruner.research.bench.size_sweep import SHIPPED

    cfg = load_config_json(SHIPPED)
    base, tower = SIZES[0], cfg["vision_towers"][0]
    assert (cfg["image_sizes"][0], tower["patch_size"]) == (base.image_size, base.patch_size)
    text = cfg["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (base.hidden, base.layers)
    assert text["max_position_embeddings"] == max_positions(base.tokens_per_view)
