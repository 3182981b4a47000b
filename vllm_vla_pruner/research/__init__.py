"""Research tools beside the serving path: the PyTorch reference model, checkpoint factories,
Meta-World training and closed-loop evaluation, and the benchmarks.

The dependency runs one way: these modules import the runtime package (``vllm_vla_pruner``),
the runtime never imports them (``tests/test_layout.py`` checks it). Only the CLI dispatcher
reaches into both.
"""
