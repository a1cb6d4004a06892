"""Plots of a run, from the files it writes, in the order an RL engineer reads them: is it learning (reward with its
spread and the held-out evaluation, each reward's mean), is the optimisation healthy (loss, gradient norm, learning
rate, entropy), is it on-policy (importance-sampling weights, vLLM-vs-trainer logprob gap), what the completions look
like (length, clipped ratio), and what it costs (step time split into generation / sync / training / evaluation,
peak memory of every micro-step).

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

# A memory axis spans at least this much, so allocator noise of a few MiB does not fill the panel like a leak.
MIN_MEMORY_SPAN_GIB = 1.0


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


def plot_metric(ax, steps: list[dict], key: str, style: str = "-", **kwargs) -> bool:
    """Plot `key` over the steps that have it (a metric absent from every step is skipped); True if plotted."""
    points = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points), style, **kwargs)
    return bool(points)


def reward_names(steps: list[dict]) -> list[str]:
    names = {key.split("/")[1] for r in steps for key in r
             if key.startswith("rewards/") and key.endswith("/mean")}
    return sorted(names)


def render(run_dir: Path, out: Path) -> Path:
    steps = latest_per_step(read_jsonl(run_dir / "metrics.jsonl"))
    if not steps:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'} has no steps yet")
    memory = read_jsonl(run_dir / "memory.jsonl")
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(4, 3, figsize=(16, 15))
    fig.suptitle(f"{run_dir.name}: {len(steps)} steps", fontsize=14)
    panels = iter(axes.flat)

    ax = next(panels)
    sampled = [r for r in steps if r.get("reward") is not None]  # steps sharing a round log its rewards once
    mean = [r["reward"] for r in sampled]
    std = [r.get("reward_std") or 0.0 for r in sampled]
    x_sampled = [r["step"] for r in sampled]
    ax.plot(x_sampled, mean, label="train (mean of the step)")
    ax.fill_between(x_sampled, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                    label="± std within the step")
    plot_metric(ax, steps, "eval/reward", "o-", label="held-out evaluation")
    ax.set(title="total reward (weighted sum)", ylabel="reward")
    ax.legend(fontsize=8)

    ax = next(panels)
    for i, name in enumerate(reward_names(steps)):
        color = f"C{i}"
        plot_metric(ax, steps, f"rewards/{name}/mean", color=color, alpha=0.6, label=f"{name} (train)")
        plot_metric(ax, steps, f"eval/rewards/{name}/mean", "o-", color=color, label=f"{name} (held-out)")
    ax.set(title="each reward's mean (accuracy = fraction correct)", ylabel="mean reward")
    ax.legend(fontsize=8)

    ax = next(panels)
    plot_metric(ax, steps, "loss")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title="loss (GRPO surrogate; ~0 on average is normal)", ylabel="loss")

    ax = next(panels)
    plot_metric(ax, steps, "grad_norm")
    ax.set(title="gradient norm (before clipping)", ylabel="L2 norm")

    ax = next(panels)
    plot_metric(ax, steps, "learning_rate")
    ax.set(title="learning rate", ylabel="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    ax = next(panels)
    plot_metric(ax, steps, "entropy")
    ax.set(title="entropy of the policy on its completions", ylabel="nats per token")

    ax = next(panels)
    for key, label, style in (("mean", "mean", "-"), ("min", "min", ":"), ("max", "max", ":")):
        plot_metric(ax, steps, f"sampling/importance_sampling_ratio/{key}", style, label=label)
    ax.axhline(1, color="grey", lw=0.5)
    ax.ticklabel_format(axis="y", useOffset=False)  # weights within 1e-4 of 1 read as such, not as "+1" offsets
    ax.set(title="importance-sampling weights (1 = on-policy)", ylabel="weight trainer / vLLM")
    ax.legend(fontsize=8)

    ax = next(panels)
    plotted = plot_metric(ax, steps, "sampling/sampling_logp_difference/mean", label="mean")
    plot_metric(ax, steps, "sampling/sampling_logp_difference/max", ":", label="max")
    if plotted:
        ax.set_yscale("log")
    ax.set(title="|vLLM logprob - trainer logprob|", ylabel="nats per token")
    ax.legend(fontsize=8)

    ax = next(panels)
    plot_metric(ax, steps, "completions/mean_length", label="mean")
    plot_metric(ax, steps, "completions/max_length", ":", label="max")
    plot_metric(ax, steps, "eval/completions/mean_length", "o", label="held-out mean")
    plot_metric(ax, steps, "completions/mean_analysis_length", "--", label="reasoning (analysis channel)")
    plot_metric(ax, steps, "completions/mean_final_length", "-.", label="final answer (final channel)")
    ax.set(title="completion length", ylabel="tokens", ylim=(0, None))
    ax.legend(fontsize=8)

    ax = next(panels)
    plot_metric(ax, steps, "completions/clipped_ratio", color="tab:red", label="train")
    plot_metric(ax, steps, "eval/completions/clipped_ratio", "o", color="tab:purple", label="held-out")
    harmony = plot_metric(ax, steps, "completions/no_final_ratio", "--", color="tab:orange", label="no final answer")
    plot_metric(ax, steps, "completions/malformed_ratio", ":", color="tab:brown", label="malformed harmony")
    plot_metric(ax, steps, "completions/answer_only_in_analysis_ratio", "-.", color="tab:green",
                label="answer in the reasoning only")
    ax.set(title="clipped (cut at MAX_COMPLETION_LENGTH)" + (", and GPT-OSS's channels" if harmony else ""),
           ylabel="fraction of completions", ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)

    ax = next(panels)
    parts = [("time/generation_s", "generation"), ("time/sync_s", "adapter sync"), ("time/train_s", "training"),
             ("time/eval_s", "evaluation")]
    bottom = [0.0] * len(steps)
    for key, label in parts:
        values = [r.get(key) or 0.0 for r in steps]
        ax.bar(x, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(title="step time", ylabel="seconds")
    ax.legend(fontsize=8)

    ax = next(panels)
    if memory:
        index = list(range(1, len(memory) + 1))
        peaks = []
        for device in memory[-1]["peak_gib"]:
            values = [m["peak_gib"].get(device) for m in memory]
            ax.plot(index, values, label=device)
            peaks += [v for v in values if v is not None]
        low, high = min(peaks), max(peaks)
        pad = max(MIN_MEMORY_SPAN_GIB - (high - low), 0.0) / 2 + 0.05 * (high - low)
        ax.set_ylim(max(0.0, low - pad), high + pad)
        ax.legend(fontsize=8)
    ax.set(title="peak memory after each micro-step", ylabel="GiB", xlabel="micro-step (all steps in order)")

    for ax in axes.flat:
        if not ax.get_xlabel():
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
