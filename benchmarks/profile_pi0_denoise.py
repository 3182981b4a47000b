"""Where the pi0 denoising loop's time goes: ``Pi0ForActionPrediction._denoise_group`` alone,
one request, one thread, under ``torch.profiler``.

Why: at batch 1 the loop costs about twice as much per GFLOP as the prefix and gains less
than its FLOPs from pruning (``benchmarks/results/engine-pi0/``). This separates "Python /
small-op overhead" (fixable in the loop) from "the CPU's efficiency at these shapes" (50-row
GEMMs, head-dim-32 attention over the cached prefix; not fixable there).

The expert and its heads get random weights of the checkpoint's shapes and the prefix K/V are
random (the loop's cost does not depend on their values); the prefix LM is not built - only its
RoPE, the same vLLM ``RotaryEmbedding`` the engine's Gemma uses.

    python benchmarks/profile_pi0_denoise.py /tmp/bench-pi0                        # unpruned
    python benchmarks/profile_pi0_denoise.py /tmp/bench-pi0 --kept-rows 240 --layer 3  # keep 0.25
"""

from __future__ import annotations

import argparse
import time
import types

import torch
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_vla_pruner import pi0
from vllm_vla_pruner.config import load_config_json
from vllm_vla_pruner.cpu_allocator import tune_glibc_malloc
from vllm_vla_pruner.pi0_spec import Pi0Normalizer, load_norm_stats, pi0_spec
from vllm_vla_pruner.research.outside_engine import one_process_vllm


def build(model_dir: str) -> pi0.Pi0ForActionPrediction:
    """The model object with what ``_denoise_group`` reads: expert, heads, RoPE, normaliser."""
    spec = pi0_spec(model_dir)
    text = load_config_json(model_dir)["text_config"]
    heads, kv, hd = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    m = pi0.Pi0ForActionPrediction.__new__(pi0.Pi0ForActionPrediction)
    torch.nn.Module.__init__(m)
    m.spec, m.num_heads, m.num_kv_heads, m.head_dim = spec, heads, kv, hd
    m.normalizer = Pi0Normalizer(spec, load_norm_stats(model_dir, spec))
    m.expert = pi0.ActionExpert(spec, text["num_hidden_layers"], heads, kv, hd, 1e-6)
    we, a = spec.expert_width, spec.action_dim
    m.action_in_proj, m.state_proj = pi0.replicated_linear(a, we), pi0.replicated_linear(a, we)
    m.action_time_mlp_in = pi0.replicated_linear(2 * we, we)
    m.action_time_mlp_out = pi0.replicated_linear(we, we)
    m.action_out_proj = pi0.replicated_linear(we, a)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    m.expert.weights_loaded()  # what the model's load_weights does after loading
    for module in m.modules():  # what vLLM's loader does after loading (CPU: oneDNN packing)
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    rope = get_rope(
        hd,
        max_position=text["max_position_embeddings"],
        is_neox_style=True,
        rope_parameters={"rope_type": "default", "rope_theta": text["rope_theta"]},
        dtype=torch.float32,
    )
    layer0 = types.SimpleNamespace(self_attn=types.SimpleNamespace(rotary_emb=rope))
    m.language_model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[layer0]))
    channel = types.SimpleNamespace(report_chunk=lambda req_id, chunk: None)
    m.pruned_decoder = types.SimpleNamespace(action_layer=-1, channel=channel)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a pi0 checkpoint dir (vla-pruner checkpoint --preset bench-pi0)")
    ap.add_argument("--prefix-rows", type=int, default=816, help="cached prefix rows")
    ap.add_argument("--kept-rows", type=int, default=None, help="prefix rows at layers >= --layer")
    ap.add_argument("--layer", type=int, default=3, help="the pruning layer K")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    tune_glibc_malloc()  # as in the engine's processes (without it, run-to-run noise)
    torch.set_num_threads(1)
    with one_process_vllm():
        m = build(args.model)
    spec, n, kvw = m.spec, args.prefix_rows, m.num_kv_heads * m.head_dim
    rows = [
        n if args.kept_rows is None or i < args.layer else args.kept_rows
        for i in range(len(m.expert.layers))
    ]
    kv = [(torch.randn(r, kvw), torch.randn(r, kvw)) for r in rows]
    req = types.SimpleNamespace(plan=None, state=[0.0] * spec.state_dim, req_id="r")
    group = [pi0._Prefill(req=req, start=0, end=n, num_steps=spec.num_steps, seed=0, kv=kv)]
    with torch.inference_mode():
        for _ in range(3):
            m._denoise_group(group, spec.num_steps)
        times = []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            m._denoise_group(group, spec.num_steps)
            times.append(time.thread_time() - t0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            m._denoise_group(group, spec.num_steps)
    times.sort()
    print(
        f"{spec.num_steps} Euler steps x {len(rows)} expert layers, prefix rows {rows}: "
        f"median {1e3 * times[len(times) // 2]:.1f} ms thread CPU ({args.repeats} runs)"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
