"""Per-run speedup / FLOPs-ideal of the repeated bench-pi0 runs (the batch-1 and batch-8 dirs of
``benchmarks/results/engine-pi0/``), with the 90% target: run from that folder,
``python ../../plot_pi0_runs.py``; writes ``runs-vs-target.png``."""

import glob
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = (
    ("batch1-seven-runs", "batch 1, 7 runs x 15-21 repeats"),
    ("batch8-three-runs", "batch 8, 3 runs x 7 repeats"),
)


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, (name, title) in zip(axes, PANELS):
        for x, m, color in ((0, "vlapruner", "tab:blue"), (1, "fastv", "tab:orange")):
            wall, cpu = [], []
            for f in sorted(glob.glob(f"{name}/run*/engine-pi0.json")):
                rs = {r["method"]: r for r in json.load(open(f))["results"]}
                r = rs[m]
                wall.append(100 * r["ratio_to_ideal"])
                base = rs["none"]["cpu_ms"]["chunk"]
                cpu.append(100 * base / r["cpu_ms"]["chunk"] / r["flops_ideal_speedup"])
            first = ax is axes[0]
            ax.scatter(
                [x - 0.08] * len(wall), wall, color=color, label=f"{m} wall" if first else None
            )
            ax.scatter(
                [x + 0.08] * len(cpu),
                cpu,
                color=color,
                marker="x",
                label=f"{m} worker CPU" if first else None,
            )
        ax.axhline(90, color="k", ls="--", lw=1)
        ax.set_xticks([0, 1], ["VLA-Pruner", "FastV"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("speedup / FLOPs-ideal (%) at keep 0.25")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "bench-pi0, whole chunk: each point one interleaved run (dashed: the 90% target)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig("runs-vs-target.png", dpi=110)


if __name__ == "__main__":
    main()
