"""The pi0 expert's attention-with-probabilities against the textbook formula (pure tensors).

The engine reads the action layer's attention probabilities from ``attention_with_probs``
(grouped heads folded into rows, scores softmaxed in place); these tests pin it to
``softmax(q k^T * scale)`` with repeated K/V heads, masked and unmasked, MQA and GQA.
"""

from __future__ import annotations

import pytest
import torch

from vllm_vla_pruner.pi0 import attention_with_probs


def _textbook(q, keys, vals, mask, scale):
    g = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, 1)
    v = vals.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return probs @ v, probs.mean(1)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_the_textbook_attention(kv_heads, masked):
    torch.manual_seed(0)
    b, hq, r, n, d = 3, 8, 7, 29, 16
    q = torch.randn(b, hq, r, d)
    keys, vals = torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    mask = None
    if masked:  # padded prefixes differ per request; row 0 (pi0's state row) sees less
        mask = torch.ones(b, 1, r, n, dtype=torch.bool)
        mask[1, :, :, 20:25] = False
        mask[:, :, 0, 26:] = False
    o, probs = attention_with_probs(q, keys, vals, mask, d**-0.5)
    want_o, want_probs = _textbook(q, keys, vals, mask, d**-0.5)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-7)
    assert probs.shape == (b, r, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, r))
    if masked:
        assert probs[1, :, 20:25].abs().max() == 0
        assert probs[:, 0, 26:].abs().max() == 0


def test_output_matches_sdpa_the_other_layers_run():
    torch.manual_seed(1)
    q, keys, vals = torch.randn(2, 8, 50, 32), torch.randn(2, 1, 90, 32), torch.randn(2, 1, 90, 32)
    o, _ = attention_with_probs(q, keys, vals, None, 32**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, keys, vals, scale=32**-0.5, enable_gqa=True
    )
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


def _norm(dim=128):
    import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels, as the engine has)

    from vllm_vla_pruner.pi0 import GemmaNorm

    norm = GemmaNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.normal_(std=0.5)
    return norm


def test_gemma_norm_refuses_to_run_before_its_weights_are_in():
    with pytest.raises(RuntimeError, match="weights_loaded"):
        _norm()(torch.randn(4, 128))


def test_gemma_norm_kernels_match_gemmas_float32_formula():
    norm = _norm()
    norm.weights_loaded()
    x, res = torch.randn(50, 128) * 3, torch.randn(50, 128)
    want = torch.nn.functional.rms_norm(x, (128,), 1.0 + norm.weight.detach(), 1e-6)
    torch.testing.assert_close(norm(x)[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x.view(2, 25, 128))[0], want.view(2, 25, 128))
    summed = x + res
    want = torch.nn.functional.rms_norm(summed, (128,), 1.0 + norm.weight.detach(), 1e-6)
    normed, new_res = norm.add_and_norm(x.clone(), res.clone())
    torch.testing.assert_close(new_res, summed)
    torch.testing.assert_close(normed, want, rtol=1e-5, atol=1e-5)
    # A non-contiguous or non-float32 input takes PyTorch's path: the same numbers.
    wide = torch.randn(50, 256)[:, :128]
    torch.testing.assert_close(norm(wide)[0], norm(wide.contiguous())[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x.double())[0], norm(x)[0].double(), rtol=1e-5, atol=1e-5)
