"""pi0.5 in the real vLLM engine: the flow-matching chunk equals the PyTorch oracle's.

One engine for the module (tiny-pi05, float32; pruning layer K = 2 of 6, action layer 3).
pi0.5 differs from pi0 in the expert only (no state token, the flow time conditions every
RMSNorm: scale, shift and a gate on the residual branch) and in the prompt (the state is
quantile-normalised, binned and written into the text). The prompts here are the oracle's
own (:meth:`ReferencePi0.pi05_prompt`, written from openpi's tokenizer), the engine requests
carry no state. Tolerance: 1e-4 absolute on the normalised (model-scale) chunk for the same
noise; pruned requests are compared with the oracle run on the kept indices the worker
traced.
"""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from PIL import Image

from tests.engine_fixtures import pruning_trace
from tests.pi0_fixtures import camera_images, checkpoint_fixtures, siglip_pixels
from vllm_vla_pruner.engine.plan import ActionChunk, PruningResult
from vllm_vla_pruner.engine.settings import KEY_NOISE_SEED, KEY_NUM_STEPS
from vllm_vla_pruner.pi0_spec import pi0_noise

pytestmark = pytest.mark.engine

TOL = 1e-4
K = 2
STATE = [0.1, -0.2, 0.05, 0.3, -0.1, 0.0, 0.2, -0.3]
INS = "pick up the red block"
ALL = (True, True, True)


model_dir, ref, tokenizer = checkpoint_fixtures("tiny-pi05", seed=3)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    trace = tmp_path_factory.mktemp("pi05_trace") / "pruning.jsonl"
    from vllm_vla_pruner.engine.local import make_llm, shutdown_llm

    with pruning_trace(trace):
        llm = make_llm(model_dir, max_num_seqs=8, pruning={"window": 3, "gamma": 0.8, "layer": K})
    yield llm, trace
    shutdown_llm(llm)


class Case:
    """One request: images from ``seed``, instruction, raw state, noise, cameras, steps."""

    def __init__(self, seed, ins=INS, state=STATE, noise=None, mask=ALL, steps=None, xargs=None):
        self.seed, self.ins, self.state, self.mask = seed, ins, state, mask
        self.noise = seed if noise is None else noise
        self.steps, self.xargs = steps, dict(xargs or {})

    def ids(self, ref, tokenizer) -> list[int]:
        return ref.pi05_prompt(tokenizer, self.ins, self.state)

    def request(self, ref, tokenizer):
        from vllm import SamplingParams

        args = {KEY_NOISE_SEED: self.noise, **self.xargs}  # no state: it is in the prompt
        if self.steps:
            args[KEY_NUM_STEPS] = self.steps
        images = [Image.fromarray(i) for i, m in zip(camera_images(self.seed), self.mask) if m]
        prompt = {
            "prompt_token_ids": self.ids(ref, tokenizer),
            "multi_modal_data": {"image": images},
        }
        return prompt, SamplingParams(max_tokens=1, temperature=0.0, extra_args=args)

    def oracle(self, ref, tokenizer, kept=None, **kw):
        images = [
            siglip_pixels(i) if m else None for i, m in zip(camera_images(self.seed), self.mask)
        ]
        inputs = ref.build_inputs(images, list(self.mask), self.ids(ref, tokenizer), None)
        noise = pi0_noise(self.noise, ref.spec.horizon, ref.spec.action_dim)
        keep = None if kept is None else torch.tensor(kept)
        return ref.sample(inputs, noise, self.steps, keep_visual=keep, prune_layer=K, **kw)


def _run(engine, ref, tokenizer, cases):
    llm, trace = engine
    reqs = [c.request(ref, tokenizer) for c in cases]
    outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
    rows = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    kept = []
    for out in outs:
        recs = [r for r in rows if r["req_id"] == out.request_id]
        recs += [r for r in rows if r["req_id"].startswith(out.request_id + "-")]
        kept.append(recs[-1]["kept"] if recs else None)
    return outs, kept


def _normalized(ref, rows) -> torch.Tensor:
    """The served (un-normalised) chunk back on the model's scale with openpi's quantile
    normalisation, from the checkpoint's q01/q99."""
    st = ref.norm_stats["actions"]
    q01, q99 = (torch.tensor(st[k], dtype=torch.float64) for k in ("q01", "q99"))
    return (torch.tensor(rows, dtype=torch.float64) - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0


def _check(ref, tokenizer, out, case, kept=None, **kw):
    chunk = ActionChunk.from_public(out.kv_transfer_params)
    assert chunk is not None and chunk.error is None, out.kv_transfer_params
    assert (chunk.chunk, chunk.action_dim) == (ref.spec.horizon, ref.spec.robot_action_dim)
    got = _normalized(ref, chunk.rows())
    want = case.oracle(ref, tokenizer, kept, **kw)
    err = (got - want.normalized[:, : ref.spec.robot_action_dim].double()).abs().max()
    assert err < TOL, f"engine vs reference: {err}"
    return got, want


def _result(out) -> PruningResult:
    result = PruningResult.from_public(out.kv_transfer_params)
    assert result is not None, out.kv_transfer_params
    return result


def test_chunk_alone_matches_reference(engine, ref, tokenizer):
    case = Case(0, noise=7)
    (out,), _ = _run(engine, ref, tokenizer, [case])
    got, _ = _check(ref, tokenizer, out, case)
    assert len(out.outputs[0].token_ids) == 1  # one forward, no decode steps
    # Sensitivity: the noise, the state (through the prompt) and the flow time reach the
    # chunk (the time only through the adaptive norms).
    for other in (Case(0, noise=8), Case(0, noise=7, state=[0.0] * 8), Case(0, noise=7, steps=3)):
        diff = got - other.oracle(ref, tokenizer).normalized[:, :7].double()
        assert diff.abs().max() > 100 * TOL


def test_mixed_batch_each_gets_its_own_chunk(engine, ref, tokenizer):
    """Different instructions and states (prompt lengths), masked cameras, step counts."""
    cases = [
        Case(1),
        Case(2, "open the drawer", [0.0] * 8, mask=(True, False, True)),
        Case(3, "put the bowl on the plate", [x * -2 for x in STATE], mask=(True, True, False)),
        Case(1, steps=3),
        Case(4, "open_the_top\ndrawer ", [3.0, -3.0, *STATE[2:]], steps=4),  # bins -1, 255
    ]
    assert len({len(c.ids(ref, tokenizer)) for c in cases}) > 1
    outs, _ = _run(engine, ref, tokenizer, cases)
    for out, case in zip(outs, cases):
        _check(ref, tokenizer, out, case)
    # Equally long prefixes (the unmasked attention path), two requests in one group.
    pair = [Case(5, noise=11), Case(6, noise=12)]
    outs, _ = _run(engine, ref, tokenizer, pair)
    for out, case in zip(outs, pair):
        _check(ref, tokenizer, out, case)


def test_pruned_chunk_matches_reference_with_same_kept(engine, ref, tokenizer):
    cases = [
        Case(10, xargs={"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25}),
        Case(11, "open the drawer", xargs={"vla_pruner": "fastv", "vla_keep_ratio": 0.5}),
        Case(12),
    ]
    outs, kept = _run(engine, ref, tokenizer, cases)
    m = 3 * ref.tokens_per_camera
    assert [len(k) for k in kept[:2]] == [m // 4, m // 2]
    assert _result(outs[0]).outcome.pruned
    for out, case, k in zip(outs, cases, kept):
        _check(ref, tokenizer, out, case, k if case.xargs else None)


def test_history_from_expert_attention_drives_fourth_chunk(engine, ref, tokenizer):
    """The action signal on pi0.5: three warm-up frames push the expert's action rows'
    attention to the visual keys (action layer, mean over the Euler steps) into the robot's
    history; the fourth frame's kept set equals the oracle's selection from the same
    signals (semantic: the prefix's attention at layer K-1)."""
    from vllm_vla_pruner.pruning import ActionHistory, PruneInputs, select_tokens

    session = f"robot-{uuid.uuid4().hex[:8]}"
    xargs = {"vla_pruner": "vlapruner", "vla_keep_ratio": 0.25, "vla_session_id": session}
    layer = len(ref.lm.layers) // 2
    history = ActionHistory(window=3, gamma=0.8)
    m = 3 * ref.tokens_per_camera
    for frame in range(4):
        case = Case(40 + frame, xargs=xargs)
        (out,), (kept,) = _run(engine, ref, tokenizer, [case])
        result = _result(out)
        if frame < 3:
            assert result.warmup and not result.outcome.pruned
            _, want = _check(ref, tokenizer, out, case, return_attn_layers=[layer])
            history.push(session, ref.action_scores(want, layer, m))
            continue
        assert result.outcome.pruned and result.outcome.used_history
        _check(ref, tokenizer, out, case, kept)
        images = [siglip_pixels(i) for i in camera_images(case.seed)]
        inputs = ref.build_inputs(images, list(ALL), case.ids(ref, tokenizer), None)
        attn = {K - 1: None}
        _, _, plen = ref.prefix_pass(inputs, None, K, attn)
        # The engine's rows are [BOS, visual, text]; the oracle's [visual, BOS, text].
        perm = torch.cat([torch.tensor([m]), torch.arange(m), torch.arange(m + 1, plen)])
        pin = dict(
            attn=attn[K - 1][perm][:, perm],
            visual_start=1,
            num_visual=m,
            embeddings=inputs.embeds[inputs.valid][:m].detach().float(),
            grid_shape=(24, 8),
            text_start=1 + m,
        )
        expected = select_tokens(
            PruneInputs(**pin, action_estimate=history.estimate(session)), "vlapruner", m // 4
        ).tolist()
        without = select_tokens(PruneInputs(**pin), "vlapruner", m // 4).tolist()
        assert set(expected) != set(without)  # the action signal changed the choice
        overlap = len(set(expected) & set(kept)) / (m // 4)
        assert overlap >= 0.9, (expected, kept)
