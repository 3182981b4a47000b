"""Choose between pi0 checkpoints on validation goals, with the trainer's own sampler.

``python -m vllm_vla_pruner.research.sim.validate_pi0 CKPT [CKPT ...] --episodes 10``

The trainer keeps the best of its validations, but those see 4 episodes per task; between
candidates that close, 10 or more per task decide. This runs each checkpoint closed loop on the
validation goals (never the held-out ones: those are for the one report through the engine)
with :func:`.train_pi0.sampling_policy` - the plain-PyTorch pi0 the engine equals within
1e-4, 10 Euler steps from noise seeded per call, the first ``--execute`` rows of each chunk
executed - and prints the success per task; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .metaworld_env import DEFAULT_MAX_STEPS, DEFAULT_TASKS, val_seeds
from .oft_data import dagger_rollouts
from .train_pi0 import CHUNK, FlowNet, sampling_policy


def validate(
    checkpoint: Path,
    episodes: int,
    tasks: list[str],
    execute: int = 4,
    num_steps: int = 10,
    max_steps: int = DEFAULT_MAX_STEPS,
    seed: int = 0,
) -> dict[str, float]:
    """Success per task of ``checkpoint`` on the first ``episodes`` validation goals."""
    import torch
    from transformers import AutoTokenizer

    from ..reference_pi0 import ReferencePi0

    model = ReferencePi0.from_pretrained(checkpoint).eval()
    net = FlowNet(model, AutoTokenizer.from_pretrained(str(checkpoint)), tasks)
    policy, _ = sampling_policy(net, CHUNK, num_steps, seed)
    with torch.inference_mode():
        _, per_task = dagger_rollouts(
            policy, tasks, val_seeds(episodes), 0.0, execute, max_steps=max_steps, progress=False
        )
    return per_task


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Validation success of pi0 checkpoints.")
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--episodes", type=int, default=10, help="validation goals per task")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--execute", type=int, default=4, help="chunk rows executed per request")
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="episode cap")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write {checkpoint: {mean, per_task}} here")
    args = p.parse_args(argv)
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    # Third-party notices that are not this tool's news: transformers' config-class notice
    # and Meta-World's experts warning that their gains exceed the action bounds.
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
    results = {}
    for ckpt in args.checkpoints:
        per_task = validate(
            ckpt, args.episodes, args.tasks, args.execute, args.num_steps, args.max_steps
        )
        mean = float(np.mean(list(per_task.values())))
        results[str(ckpt)] = {"mean": mean, "per_task": per_task}
        tasks = ", ".join(f"{t.removesuffix('-v3')} {v:.0%}" for t, v in per_task.items())
        print(f"{ckpt}: {mean:.1%} ({tasks})", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
