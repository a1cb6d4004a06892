#!/usr/bin/env python3
"""Two GPU stack runs of the same workload side by side, one synchronous (MAX_OFF_POLICY_STEPS=0), one overlapped:
generation tokens/s through the adapter, step time against max(generation, training), staleness, and the peak GPU
memory of all processes together per GPU.

    python benchmarks/compare_overlap.py OUT/sync OUT/overlap     # each a `gpu.sh train` results folder

Steps after the first are counted (the first step of either run samples while nothing trains), and in the overlapped
run not its last either (nothing is sampled beside it). Generation seconds are the sampling requests' own
durations; in the overlapped run they ran while the trainer trained.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.report import latest_per_step, read_jsonl  # noqa: E402


def summary(out: Path, overlapped: bool) -> dict:
    rows = latest_per_step(read_jsonl(out / "metrics.jsonl"))[1:]
    if overlapped:
        rows = rows[:-1]
    if not rows:
        raise SystemExit(f"{out}: too few steps in metrics.jsonl ({3 if overlapped else 2} at least)")
    total = lambda key: sum(r.get(key, 0.0) for r in rows)  # noqa: E731
    step, generation, train = total("time/step_s"), total("time/generation_s"), total("time/train_s")
    return {"steps": f"{rows[0]['step']}-{rows[-1]['step']}", "step_s": step / len(rows),
            "generation_s": generation / len(rows), "train_s": train / len(rows),
            "wait_s": total("time/rollout_wait_s") / len(rows),
            "step_vs_max": step / max(generation, train, 1e-9),
            "tokens_per_s": total("tokens/generated") / max(generation, 1e-9),
            "staleness_max": max(r.get("rollouts/staleness", 0) for r in rows),
            "sampled_ahead": sum(r.get("rollouts/sampled_ahead", 0) for r in rows),
            "count": len(rows), "memory": gpu_peaks(out / "gpu-memory.csv")}


def gpu_peaks(path: Path) -> str:
    """The largest sum over processes per GPU at one sample of nvidia-smi (every 2 s)."""
    if not path.exists():
        return "?"
    per_sample = defaultdict(int)  # (sample, gpu) -> MiB; a sample is one pass over the processes
    sample, seen = 0, set()
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[3].endswith("MiB"):
            continue
        gpu, pid = parts[0], parts[1]
        if (gpu, pid) in seen:  # the same process again: the next sample began
            sample, seen = sample + 1, set()
        seen.add((gpu, pid))
        per_sample[(sample, gpu)] += int(parts[3].split()[0])
    peak = defaultdict(int)
    for (_, gpu), mib in per_sample.items():
        peak[gpu] = max(peak[gpu], mib)
    return " / ".join(f"{mib / 1024:.1f}" for _, mib in sorted(peak.items()))


def main(sync: Path, overlap: Path) -> None:
    runs = {"synchronous": summary(sync, overlapped=False), "overlapped": summary(overlap, overlapped=True)}
    print("| run | steps | step s | generation s | training s | wait s | step / max(gen, train) | "
          "gen tok/s (adapter) | max staleness | steps sampled ahead | peak GiB per GPU (all processes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['steps']} | {r['step_s']:.1f} | {r['generation_s']:.1f} | {r['train_s']:.1f} | "
              f"{r['wait_s']:.1f} | {r['step_vs_max']:.2f} | {r['tokens_per_s']:.0f} | {r['staleness_max']} | "
              f"{r['sampled_ahead']}/{r['count']} | {r['memory']} |")
    sync, overlapped = runs["synchronous"], runs["overlapped"]
    print(f"\nOverlapped step time / synchronous step time: {overlapped['step_s'] / sync['step_s']:.2f}")
    # each phase alone, as the synchronous run times it: the bound overlap aims at
    alone = max(sync["generation_s"], sync["train_s"])
    print(f"Overlapped step time / max(generation, training) each alone: {overlapped['step_s'] / alone:.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
