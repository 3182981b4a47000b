"""Other checkpoint shapes through the engine: one tower, another image/patch size, a deeper
Llama whose pruned layers span several KV cache groups, and another pruning layer K (the
checkpoint's recommendation in its config.json)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.engine_fixtures import pruning_trace

pytestmark = pytest.mark.engine

K = 2


@pytest.fixture(scope="module")
def deep_single_tower(tmp_path_factory):
    from vllm_vla_pruner.engine.local import make_llm
    from vllm_vla_pruner.research.checkpoint import build_checkpoint
    from vllm_vla_pruner.research.reference import ReferenceOpenVLA

    tmp = tmp_path_factory.mktemp("deep")
    ckpt = build_checkpoint(
        "tiny",
        tmp / "ckpt",
        seed=3,
        num_hidden_layers=8,
        use_fused_vision_backbone=False,
        image_size=48,
        patch_size=6,
    )
    # K comes from the checkpoint's own recommendation, not from the operator.
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "vla_pruner": {"layer": K}}, indent=2))
    trace = tmp / "trace.jsonl"
    with pruning_trace(trace):  # read by the worker at model init
        llm = make_llm(ckpt, max_num_seqs=8)
    yield llm, ReferenceOpenVLA.from_pretrained(ckpt), trace
    from vllm_vla_pruner.engine.local import shutdown_llm

    shutdown_llm(llm)


def test_kv_groups_and_pruned_forward_match_reference(deep_single_tower):
    from vllm import SamplingParams

    from vllm_vla_pruner.engine.local import decoder_report, kv_layout

    llm, ref, trace = deep_single_tower
    groups = kv_layout(llm)
    # 8 layers, K=2: the full group holds 2 layers, the 6 pruned layers split into groups of 2.
    assert [g["spec"] for g in groups] == ["FullAttentionSpec"] + ["PrunedAttentionSpec"] * 3
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    ids = ref.prompt_token_ids("stack the cups")
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
    outs = llm.generate(
        [prompt, prompt],
        [
            SamplingParams(temperature=0, max_tokens=7, logprobs=0),
            SamplingParams(
                temperature=0,
                max_tokens=7,
                logprobs=0,
                extra_args={"vla_pruner": "fastv", "vla_keep_ratio": 0.25},
            ),
        ],
        use_tqdm=False,
    )
    outcome = outs[1].kv_transfer_params["vla_pruner"]["outcome"]
    assert outcome["visual_tokens_kept"] == 16  # 64 patches of 6 px
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    kept = next(r["kept"] for r in records if r["req_id"].startswith(outs[1].request_id))
    for out, keep in ((outs[0], None), (outs[1], torch.tensor(kept))):
        expect = ref.generate(image, ids, max_new_tokens=7, keep_visual=keep, prune_layer=K)
        assert list(out.outputs[0].token_ids) == expect.token_ids
        lp = torch.log_softmax(expect.logits.float(), -1)
        for i, (tok, got) in enumerate(zip(expect.token_ids, out.outputs[0].logprobs)):
            assert math.isclose(got[tok].logprob, float(lp[i, tok]), abs_tol=2e-3)
    blocks = dict(decoder_report(llm)["kv_blocks"])
    full = next(v for k, v in blocks.items() if k.startswith(outs[0].request_id))
    pruned = next(v for k, v in blocks.items() if k.startswith(outs[1].request_id))
    assert pruned[0] == full[0] and all(p < f for p, f in zip(pruned[1:], full[1:]))
