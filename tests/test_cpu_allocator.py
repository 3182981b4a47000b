"""The plugin keeps glibc from page-faulting the CPU engine's activation buffers in anew on
every forward (``vllm_vla_pruner.cpu_allocator``), checked through ``register()`` in a fresh
process as vLLM runs it, with the switch that turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

# Activations of a growing batch: each step frees an 8 MB-and-a-bit block and asks for one
# 64 KB larger. Untuned, glibc maps each block (its dynamic mmap threshold only rises to the
# size last freed) and faults all of it in; tuned, the block comes from the heap, where the
# freed one is reused and only the extra 64 KB is new. Prints the minor page faults of 20
# steps.
_PROBE = """
import resource, torch, vllm_vla_pruner
vllm_vla_pruner.register()
def step(i):
    x = torch.ones((8 << 20) // 4 + i * (16 << 10))
    del x
step(0)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(1, 21):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(**env: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_register_stops_per_forward_page_faults_on_cpu():
    untuned = _faults(VLA_PRUNER_MALLOC_TUNING="0")
    tuned = _faults(VLA_PRUNER_MALLOC_TUNING="1")
    # Untuned: ~2,000 faults per 8 MB step; tuned: ~16 a step (the new 64 KB),
    # now and then one block moved elsewhere in the heap.
    assert untuned > 20 * 1500, untuned
    assert tuned < untuned // 10, (tuned, untuned)
