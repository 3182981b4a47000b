"""Pure parts of OFT serving: the action block's attention, the chunk report and its path."""

from __future__ import annotations

import pytest
import torch

from vllm_vla_pruner.engine.action_block import ActionBlock, block_attention
from vllm_vla_pruner.engine.plan import ACTIONS_KEY, ActionChunk
from vllm_vla_pruner.engine.scheduler_state import SchedulerPruning
from vllm_vla_pruner.engine.settings import PruningSettings
from vllm_vla_pruner.engine.step import StepChannel


def test_block_attention_is_unmasked_attention_over_its_request_rows():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 4, 2, 8
    t = 11
    q = torch.randn(t, heads * d, generator=g)
    k = torch.randn(t, kv_heads * d, generator=g)
    v = torch.randn(t, kv_heads * d, generator=g)
    block = ActionBlock(start=2, block_start=7, end=10)  # rows 2..9 are one request
    got = block_attention(q, k, v, block, heads, kv_heads, d, scale=d**-0.5)
    # By hand: each block row, each head, softmax over keys 2..9 (none masked).
    want = torch.empty(3, heads, d)
    for i, row in enumerate(range(7, 10)):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            qi = q[row].view(heads, d)[h]
            keys = k[2:10].view(8, kv_heads, d)[:, kh]
            vals = v[2:10].view(8, kv_heads, d)[:, kh]
            p = torch.softmax(keys @ qi * d**-0.5, dim=0)
            want[i, h] = p @ vals
    torch.testing.assert_close(got, want.reshape(3, heads * d))
    with pytest.raises(ValueError):
        ActionBlock(5, 4, 9)
    with pytest.raises(ValueError):
        ActionBlock(2, 9, 9)


def test_action_chunk_wire_form():
    chunk = ActionChunk(2, 3, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0))
    assert chunk.rows() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    public = {ACTIONS_KEY: chunk.to_public(), "other": 1}
    assert ActionChunk.from_public(public) == chunk
    assert ActionChunk.from_public({"other": 1}) is None and ActionChunk.from_public(None) is None
    failed = ActionChunk(2, 3, (), error="state must be 8 numbers")
    assert ActionChunk.from_public({ACTIONS_KEY: failed.to_public()}) == failed
    with pytest.raises(ValueError, match="values"):
        ActionChunk(2, 3, (1.0,))


def test_chunks_travel_worker_to_scheduler_to_release():
    channel = StepChannel()
    chunk = ActionChunk(1, 2, (0.5, -0.5))
    channel.report_chunk("r1", chunk)
    taken = channel.take_chunks()
    assert taken == {"r1": chunk} and channel.take_chunks() == {}
    state = SchedulerPruning(PruningSettings())
    state.take_chunks(taken)
    state.take_chunks(None)
    assert state.release_chunk("r1") == chunk
    assert state.release_chunk("r1") is None  # released once


def test_refused_request_fails_at_its_first_step_with_full_kv():
    state = SchedulerPruning(PruningSettings())
    state.refuse("r", "no pruning for this model")
    assert state.pruned_slots("r") == 0
    assert state.take_outcomes(["r"], None) == ["r"]
    assert state.release("r") is None


def test_robot_state_from_extra_args():
    from vllm_vla_pruner.patches.runner_hooks import _robot_state

    assert _robot_state([1, 2.5]) == (1.0, 2.5)
    assert _robot_state(None) is None
    assert _robot_state("1,2") is None
    assert _robot_state([1, "x"]) is None


def test_visual_span_covers_every_view_once():
    from vllm_vla_pruner.patches.scheduler_plan import visual_span

    assert visual_span([]) is None
    assert visual_span([(1, 64)]) == (1, 64)  # AR OpenVLA: one image after BOS
    assert visual_span([(65, 64), (1, 64)]) == (1, 128)  # OFT: views back to back
    assert visual_span([(1, 64), (70, 64)]) is False  # a gap: not one candidate set
