"""Closed-loop evaluation on held-out Meta-World goals.

``evaluate(policy, ...)`` drives any per-step policy -- the vLLM engine with pruning, or the
PyTorch reference through :class:`ReferencePolicy` -- one episode at a time, the way a robot
calls a server:
``policy(image, instruction, session_id, new_episode) -> action``. ``rollout_lockstep`` runs
all episodes in lockstep, one batched policy call per step (training-time evaluation through
``evaluate_batched``, the engine benchmark with its own recording policy). Both report
success per task with 95% Wilson intervals and the policy's wall time per step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .metaworld_env import (
    DEFAULT_MAX_STEPS,
    DEFAULT_TASKS,
    TASK_INSTRUCTIONS,
    eval_seeds,
    lockstep_envs,
    make_task,
)

Policy = Callable[[np.ndarray, str, str, bool], np.ndarray]
# batch_policy(images[B,S,S,3], instructions[B]) -> actions[B,4]
BatchPolicy = Callable[[np.ndarray, Sequence[str]], np.ndarray]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_ratio_ci(
    base: Sequence[Sequence[bool]],
    other: Sequence[Sequence[bool]],
    n_boot: int = 4000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% paired bootstrap interval of ``success(other) / success(base)``.

    ``base[t][e]`` and ``other[t][e]`` are the same held-out episode (task ``t``, goal ``e``)
    under two policies; episodes are resampled within each task and shared by both, so the
    interval reflects how the two differ on the same goals (tighter than two Wilson intervals).
    """
    rng = np.random.default_rng(seed)
    b_sum = np.zeros(n_boot)
    o_sum = np.zeros(n_boot)
    for b_eps, o_eps in zip(base, other, strict=True):
        b, o = np.asarray(b_eps, float), np.asarray(o_eps, float)
        if len(b) != len(o):
            raise ValueError("paired episodes differ in number")
        if len(b) == 0:
            continue
        idx = rng.integers(0, len(b), (n_boot, len(b)))
        b_sum += b[idx].mean(1)
        o_sum += o[idx].mean(1)
    ratio = o_sum / np.where(b_sum > 0, b_sum, np.nan)
    ratio = ratio[np.isfinite(ratio)]
    if not len(ratio):
        return 0.0, float("inf")
    lo, hi = np.quantile(ratio, [0.025, 0.975])
    return float(lo), float(hi)


@dataclass
class TaskResult:
    task: str
    instruction: str
    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_steps: float
    per_episode: list[bool] = field(default_factory=list)


@dataclass
class EvalResult:
    tasks: dict[str, TaskResult]
    mean_success: float
    ci95: tuple[float, float]
    policy_seconds_per_step: float
    env_seconds_per_step: float
    total_steps: int
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A markdown table of the per-task results."""
        lines = ["| task | instruction | success | 95% CI | episodes |", "|---|---|---|---|---|"]
        for r in self.tasks.values():
            lines.append(
                f"| {r.task} | {r.instruction} | {r.success_rate:.0%} | "
                f"{r.ci95[0]:.0%}-{r.ci95[1]:.0%} | {r.episodes} |"
            )
        lo, hi = self.ci95
        n = sum(r.episodes for r in self.tasks.values())
        lines.append(f"| **mean** | | **{self.mean_success:.0%}** | {lo:.0%}-{hi:.0%} | {n} |")
        return "\n".join(lines)


def _result(
    outcomes: dict[str, list[tuple[bool, int]]],
    policy_time: float,
    env_time: float,
    steps: int,
    wall: float,
    instructions: dict[str, str] | None = None,
) -> EvalResult:
    tasks = {}
    for task, eps in outcomes.items():
        k = sum(s for s, _ in eps)
        tasks[task] = TaskResult(
            task=task,
            instruction=(instructions or {}).get(task, TASK_INSTRUCTIONS[task]),
            episodes=len(eps),
            successes=k,
            success_rate=k / max(1, len(eps)),
            ci95=wilson_interval(k, len(eps)),
            mean_steps=float(np.mean([n for _, n in eps])) if eps else 0.0,
            per_episode=[bool(s) for s, _ in eps],
        )
    k = sum(r.successes for r in tasks.values())
    n = sum(r.episodes for r in tasks.values())
    return EvalResult(
        tasks=tasks,
        mean_success=float(np.mean([r.success_rate for r in tasks.values()])) if tasks else 0.0,
        ci95=wilson_interval(k, n),
        policy_seconds_per_step=policy_time / max(1, steps),
        env_seconds_per_step=env_time / max(1, steps),
        total_steps=steps,
        wall_seconds=wall,
    )


def evaluate(
    policy: Policy,
    tasks: Sequence[str] = DEFAULT_TASKS,
    episodes_per_task: int = 10,
    image_size: int = 64,
    max_steps: int | None = None,
    seeds: Sequence[int] | None = None,
    instructions: dict[str, str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run ``episodes_per_task`` episodes per task on held-out goals, one step at a time.

    ``seeds`` defaults to :func:`eval_seeds` (held out from training); ``instructions`` can
    override a task's instruction (e.g. to swap the instructions of a pair).
    """
    seeds = list(seeds) if seeds is not None else eval_seeds(episodes_per_task)
    outcomes: dict[str, list[tuple[bool, int]]] = {t: [] for t in tasks}
    policy_time = env_time = 0.0
    steps = 0
    start = time.perf_counter()
    jobs = [(t, s) for s in seeds for t in tasks]
    for task, seed in tqdm(jobs, desc="closed-loop eval", disable=not progress):
        env = make_task(task, image_size)
        env.max_steps = max_steps or DEFAULT_MAX_STEPS
        instruction = (instructions or {}).get(task, TASK_INSTRUCTIONS[task])
        env.reset(seed)
        session = f"{task}/{seed}"
        done = success = False
        first = True
        while not done:
            t0 = time.perf_counter()
            image = env.render()
            t1 = time.perf_counter()
            action = np.asarray(policy(image, instruction, session, first), np.float32)
            t2 = time.perf_counter()
            _, success, done = env.step(action)
            env_time += (t1 - t0) + (time.perf_counter() - t2)
            policy_time += t2 - t1
            steps += 1
            first = False
        outcomes[task].append((success, env.steps))
    wall = time.perf_counter() - start
    return _result(outcomes, policy_time, env_time, steps, wall, instructions)


@dataclass
class StepBatch:
    """One lockstep step: the frame of every running episode (indices into the pairs)."""

    episodes: list[int]
    images: np.ndarray  # uint8 [B, S, S, 3]
    instructions: list[str]
    first: list[bool]  # the episode's first frame (a robot's new episode)
    # The running envs themselves, for policies that observe more than the fixed camera
    # (the OFT-style policy renders both views and reads the proprio state when it asks).
    envs: list[Any] = field(default_factory=list)


# lockstep_policy(batch) -> actions[B, 4]
LockstepPolicy = Callable[[StepBatch], np.ndarray]


def rollout_lockstep(
    policy: LockstepPolicy,
    pairs: Sequence[tuple[str, int]],
    image_size: int = 64,
    max_steps: int | None = None,
    instructions: dict[str, str] | None = None,
    progress: bool = True,
    max_parallel: int = 50,
    desc: str = "closed-loop eval (batched)",
    render: bool = True,
    pair_results: list[tuple[bool, int]] | None = None,
) -> EvalResult:
    """Run one episode per ``(task, seed)`` pair, all running ones in one policy call per
    step, at most ``max_parallel`` per call. ``StepBatch.episodes`` holds each episode's
    index in ``pairs``. ``render=False``: no fixed-camera frames in ``StepBatch.images``
    (the policy observes ``StepBatch.envs`` itself, e.g. only when it asks for a chunk).
    ``pair_results``: filled with ``(success, steps)`` per pair, in ``pairs`` order.

    Chunks interleave the tasks (round-robin), so each holds about ``max_parallel / T``
    episodes of each of the T tasks; as ``lockstep_envs`` pools envs per task (~100-170 MB
    of GL context each), the pool stays near ``max_parallel + T`` envs however many episodes
    run."""
    results: list[tuple[bool, int]] = [(False, 0)] * len(pairs)  # (success, steps) per pair
    policy_time = env_time = 0.0
    steps = 0
    start = time.perf_counter()
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress)
    order = _round_robin_by_task(pairs)
    for lo in range(0, len(order), max_parallel):
        ids = order[lo : lo + max_parallel]
        chunk = [pairs[e] for e in ids]
        envs = lockstep_envs(chunk, image_size, max_steps)
        for env, (_, seed) in zip(envs, chunk, strict=True):
            env.reset(seed)
        success = [False] * len(envs)
        active = list(range(len(envs)))
        while active:
            t0 = time.perf_counter()
            images = (
                np.stack([envs[i].render() for i in active])
                if render
                else np.zeros((len(active), 0), np.uint8)
            )
            t1 = time.perf_counter()
            batch = StepBatch(
                episodes=[ids[i] for i in active],
                images=images,
                instructions=[
                    (instructions or {}).get(envs[i].task, envs[i].instruction) for i in active
                ],
                first=[envs[i].steps == 0 for i in active],
                envs=[envs[i] for i in active],
            )
            actions = np.asarray(policy(batch), np.float32)
            t2 = time.perf_counter()
            still = []
            for j, i in enumerate(active):
                _, ok, done = envs[i].step(actions[j])
                success[i] |= ok
                if done:
                    bar.update(1)
                else:
                    still.append(i)
            env_time += (t1 - t0) + (time.perf_counter() - t2)
            policy_time += t2 - t1
            steps += len(active)
            active = still
        for i, e in enumerate(ids):
            results[e] = (success[i], envs[i].steps)
    bar.close()
    wall = time.perf_counter() - start
    if pair_results is not None:
        pair_results[:] = results
    outcomes: dict[str, list[tuple[bool, int]]] = {t: [] for t, _ in pairs}
    for (task, _), r in zip(pairs, results):
        outcomes[task].append(r)
    return _result(outcomes, policy_time, env_time, steps, wall, instructions)


def _round_robin_by_task(pairs: Sequence[tuple[str, int]]) -> list[int]:
    """Indices of ``pairs`` with the tasks taking turns, each task's own order kept."""
    queues: dict[str, list[int]] = {}
    for e, (task, _) in enumerate(pairs):
        queues.setdefault(task, []).append(e)
    order: list[int] = []
    for k in range(max((len(q) for q in queues.values()), default=0)):
        order += [q[k] for q in queues.values() if k < len(q)]
    return order


def evaluate_batched(
    policy: BatchPolicy,
    tasks: Sequence[str] = DEFAULT_TASKS,
    episodes_per_task: int = 10,
    image_size: int = 64,
    max_steps: int | None = None,
    seeds: Sequence[int] | None = None,
    instructions: dict[str, str] | None = None,
    progress: bool = True,
    max_parallel: int = 50,
) -> EvalResult:
    """Like :func:`evaluate`, episodes in lockstep with a batched policy."""
    seeds = list(seeds) if seeds is not None else eval_seeds(episodes_per_task)
    return rollout_lockstep(
        lambda b: policy(b.images, b.instructions),
        [(t, s) for t in tasks for s in seeds],
        image_size,
        max_steps,
        instructions,
        progress,
        max_parallel,
    )


class ReferencePolicy:
    """Greedy OpenVLA decoding with the plain-PyTorch :class:`ReferenceOpenVLA`.

    Callable per step as a :data:`Policy`; :meth:`batch` decodes many frames at once (rows
    grouped by instruction so that prompts share a length; one prefill with the HF KV cache,
    then one single-token step per further action dimension). The argmax runs over the whole
    vocabulary, like the engine's greedy sampling.
    """

    def __init__(self, model: Any, unnorm_key: str | None = None) -> None:
        import torch

        self.model = model
        self.decoder = model.action_decoder
        self.unnorm_key = self.decoder.resolve_unnorm_key(unnorm_key)
        self.action_dim = self.decoder.action_dim(self.unnorm_key)
        self._prompts: dict[str, list[int]] = {}
        self._torch = torch
        stats = self.decoder._stats[self.unnorm_key]
        self._q01, self._q99, self._mask = stats["q01"], stats["q99"], stats["mask"]

    def __call__(
        self, image: np.ndarray, instruction: str, session_id: str = "", new_episode: bool = False
    ) -> np.ndarray:
        return self.batch(np.asarray(image)[None], [instruction])[0]

    def prompt_ids(self, instruction: str) -> list[int]:
        if instruction not in self._prompts:
            self._prompts[instruction] = self.model.prompt_token_ids(instruction)
        return self._prompts[instruction]

    def token_ids(self, images: np.ndarray, instructions: Sequence[str]) -> np.ndarray:
        """Greedy action token ids ``[B, action_dim]`` for uint8 images ``[B, S, S, 3]``."""
        torch = self._torch
        model = self.model
        was_training = model.training
        model.eval()
        out = np.zeros((len(images), self.action_dim), np.int64)
        groups: dict[str, list[int]] = {}
        for i, instr in enumerate(instructions):
            groups.setdefault(instr, []).append(i)
        lm = model.language_model
        embed = lm.get_input_embeddings()
        with torch.inference_mode():
            for instr, rows in groups.items():
                ids = torch.tensor(self.prompt_ids(instr), dtype=torch.long)
                ids = ids[None].repeat(len(rows), 1)
                ids, _, _ = model.expand_image_tokens(ids)
                is_img = ids == model.image_token_id
                vis = model.embed_images(pixel_values_from_uint8(images[rows], model.dtype))
                emb = embed(ids.masked_fill(is_img, 0))
                emb = emb.masked_scatter(is_img[..., None], vis.to(emb.dtype))
                res = lm(inputs_embeds=emb, use_cache=True)
                tok = res.logits[:, -1].argmax(-1)
                toks = [tok]
                cache = res.past_key_values
                for _ in range(1, self.action_dim):
                    res = lm(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
                    cache = res.past_key_values
                    tok = res.logits[:, -1].argmax(-1)
                    toks.append(tok)
                out[rows] = torch.stack(toks, 1).numpy()
        model.train(was_training)
        return out

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`ActionDecoder.decode` over rows of token ids."""
        d = self.decoder
        bins = np.clip(d.vocab_size - token_ids - 1, 0, d.bin_centers.shape[0] - 1)
        norm = d.bin_centers[bins]
        q01, q99 = self._q01, self._q99
        return np.where(self._mask, 0.5 * (norm + 1) * (q99 - q01) + q01, norm).astype(np.float32)

    def batch(self, images: np.ndarray, instructions: Sequence[str]) -> np.ndarray:
        return self.decode(self.token_ids(images, instructions))


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def pixel_values_from_uint8(images: np.ndarray, dtype: Any = None) -> Any:
    """uint8 ``[B, S, S, 3]`` at the model's size -> ``[B, 6, S, S]`` exactly as vLLM's
    ``preprocess_openvla_image`` (ImageNet-normalised for DINOv2, 0.5/0.5 for SigLIP)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)  # B,S,S,3
    dino = (x - torch.from_numpy(_IMAGENET_MEAN)) / torch.from_numpy(_IMAGENET_STD)
    sig = (x - 0.5) / 0.5
    out = torch.cat([dino, sig], dim=-1).permute(0, 3, 1, 2).contiguous()
    return out if dtype is None else out.to(dtype)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vllm_vla_pruner.research.sim.evaluate --model DIR``: reference evaluation."""
    import argparse
    import json

    from ..reference import ReferenceOpenVLA

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True, help="OpenVLA-format checkpoint directory")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per task")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    p.add_argument("--per-step", action="store_true", help="one frame per call, like a robot")
    p.add_argument("--swap", help="evaluate task A with task B's instruction: A=B[,C=D]")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    model = ReferenceOpenVLA.from_pretrained(a.model)
    policy = ReferencePolicy(model)
    tasks = a.tasks.split(",")
    swap = dict(kv.split("=") for kv in a.swap.split(",")) if a.swap else {}
    instructions = {t: TASK_INSTRUCTIONS[o] for t, o in swap.items()}
    if a.per_step:
        res = evaluate(
            policy, tasks, a.episodes, model.image_size, a.max_steps, instructions=instructions
        )
    else:
        res = evaluate_batched(
            policy.batch,
            tasks,
            a.episodes,
            model.image_size,
            a.max_steps,
            instructions=instructions,
        )
    print(res.table())
    print(
        f"policy {res.policy_seconds_per_step * 1e3:.1f} ms/step, "
        f"env {res.env_seconds_per_step * 1e3:.1f} ms/step, {res.wall_seconds:.0f} s"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res.to_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
