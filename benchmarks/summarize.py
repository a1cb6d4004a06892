#!/usr/bin/env python3
"""Turn a GPU stack run's files (metrics.jsonl, gpu-memory.csv) into the per-step table BENCHMARKS.md quotes."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.report import latest_per_step, read_jsonl  # noqa: E402


def main(out: Path) -> None:
    rows = latest_per_step(read_jsonl(out / "metrics.jsonl"))
    print("| step | gen s | gen tok/s | sync s | train s | train tok/s | clipped | mean len | "
          "logp gap mean/max | trainer peak GiB per GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peaks = "/".join(f"{v:.1f}" for k, v in r.items() if k.startswith("memory/peak_gib/"))
        print(f"| {r['step']} | {r['time/generation_s']:.1f} | {r['tokens/generation_per_s']:.0f} | "
              f"{r['time/sync_s']:.3f} | {r['time/train_s']:.1f} | {r['tokens/train_per_s']:.0f} | "
              f"{r.get('completions/clipped_ratio', float('nan')):.2f} | "
              f"{r.get('completions/mean_length', float('nan')):.0f} | "
              f"{r.get('sampling/sampling_logp_difference/mean', float('nan')):.4f}/"
              f"{r.get('sampling/sampling_logp_difference/max', float('nan')):.3f} | {peaks} |")
    memory = out / "gpu-memory.csv"
    if memory.exists():
        peak = defaultdict(int)
        for line in memory.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4 and parts[3].endswith("MiB"):
                key = (parts[1], parts[2], parts[0])
                peak[key] = max(peak[key], int(parts[3].split()[0]))
        print("\nPeak GPU memory per process and GPU (nvidia-smi, sampled every 2 s):")
        for (pid, name, gpu), mib in sorted(peak.items()):
            print(f"- pid {pid} {name} on {gpu}: {mib / 1024:.1f} GiB")

if __name__ == "__main__":
    main(Path(sys.argv[1]))
