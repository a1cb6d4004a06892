"""The peak GPU memory of each micro-step: `torch.cuda.max_memory_allocated()` per device, logged and kept in
`memory.jsonl`, so a user sees what sequential backprop costs and how close a run is to the limit.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def peak_memory_gib() -> dict[str, float]:
    """Peak allocated memory since the last call, per CUDA device (reset after reading); host max RSS on CPU."""
    if not torch.cuda.is_available():
        return {"cpu_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    peaks = {}
    for device in range(torch.cuda.device_count()):
        peaks[f"cuda:{device}"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


class MicroStepMemory:
    """Logs `torch.cuda.max_memory_allocated()` per device after each micro-step; keeps the step's maximum."""

    def __init__(self, micro_steps_per_step: int, run_dir: Path):
        self.micro_steps_per_step = micro_steps_per_step
        self.path = run_dir / "memory.jsonl"
        self.micro_step = 0
        self.step_peak: dict[str, float] = {}

    def record(self, step: int, sequences: int, tokens: int) -> None:
        self.micro_step += 1
        peaks = peak_memory_gib()
        for device, gib in peaks.items():
            self.step_peak[device] = max(gib, self.step_peak.get(device, 0.0))
        index = (self.micro_step - 1) % self.micro_steps_per_step + 1
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step + 1, "micro_step": index, "sequences": sequences, "tokens": tokens,
                                "peak_gib": peaks}) + "\n")
        log.info("micro-step %d/%d of step %d: %d seq, %d tokens, peak memory %s", index, self.micro_steps_per_step,
                 step + 1, sequences, tokens, " ".join(f"{d}={g:.2f}GiB" for d, g in peaks.items()))

    def take_step_peak(self) -> dict[str, float]:
        peak, self.step_peak = self.step_peak, {}
        return peak
