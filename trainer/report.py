"""Plots of a run, from the files it writes: reward mean and spread (with evaluation), clipped ratio, completion
length, step time split into generation / sync / training, and peak GPU memory of every micro-step.

    python -m trainer.report runs/<run name>          # writes runs/<run name>/report.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the rest of the file still counts
            continue
    return rows


def latest_per_step(rows: list[dict]) -> list[dict]:
    """A resumed run logs the steps after its checkpoint again; the later record of a step wins."""
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def render(run_dir: Path, out: Path) -> Path:
    steps = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    if not steps:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no steps yet")
    memory = read_jsonl(run_dir / "memory.jsonl")
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11))
    fig.suptitle(f"{run_dir.name}: {len(steps)} steps", fontsize=14)

    ax = axes[0, 0]
    mean = [r["reward"] for r in steps]
    std = [r.get("reward_std", 0.0) for r in steps]
    ax.plot(x, mean, label="train reward (mean)")
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                    label="± std within the step")
    evals = [r for r in steps if "eval/reward" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="eval reward")
    ax.set_title("reward")
    ax.legend()

    ax = axes[0, 1]
    ax.plot(x, [r.get("completions/clipped_ratio") for r in steps], color="tab:red")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("clipped ratio (completions cut at MAX_COMPLETION_LENGTH)")

    ax = axes[1, 0]
    ax.plot(x, [r.get("completions/mean_length") for r in steps], label="mean")
    ax.plot(x, [r.get("completions/max_length") for r in steps], ":", label="max")
    ax.set_title("completion length (tokens)")
    ax.legend()

    ax = axes[1, 1]
    parts = [("time/generation_s", "generation"), ("time/sync_s", "adapter sync"), ("time/train_s", "training"),
             ("time/eval_s", "evaluation")]
    bottom = [0.0] * len(steps)
    for key, label in parts:
        values = [r.get(key, 0.0) or 0.0 for r in steps]
        ax.bar(x, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("step time (s)")
    ax.legend()

    ax = axes[2, 0]
    if memory:
        index = list(range(len(memory)))
        for device in memory[-1]["peak_gib"]:
            ax.plot(index, [m["peak_gib"].get(device) for m in memory], label=device)
        ax.set_xlabel("micro-step (all steps in order)")
        ax.legend()
    ax.set_title("peak memory per micro-step (GiB)")

    ax = axes[2, 1]
    ax.plot(x, [r.get("sampling/sampling_logp_difference/mean") for r in steps], label="mean")
    ax.plot(x, [r.get("sampling/sampling_logp_difference/max") for r in steps], ":", label="max")
    ax.set_yscale("log")
    ax.set_title("|vLLM logprob - trainer logprob| (nats)")
    ax.legend()

    for ax in axes.flat[:-1]:
        if ax is not axes[2, 0]:
            ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    out = render(args.run_dir, args.out or args.run_dir / "report.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
