"""The engine's pruning step alone (vllm_vla_pruner/research/bench/pruning_bench.py)."""

from vllm_vla_pruner.research.bench.pruning_bench import main

if __name__ == "__main__":
    main()
