"""What the callbacks around TRL's step share: metrics computed beside TRL's own (evaluation), and the step's
samples, read through one object instead of a shared dict and TRL's private state.
"""

from __future__ import annotations

from typing import Callable


class StepMetrics:
    """Metrics added during a step by anyone (`add`), taken once by the run logger for the step's record (`take`);
    the step's sampled completions from `samples_source` (the trainer knows where TRL keeps them)."""

    def __init__(self, samples_source: Callable[[int], list[dict]] = lambda count: []):
        self._metrics: dict = {}
        self._samples_source = samples_source

    def add(self, metrics: dict) -> None:
        self._metrics.update(metrics)

    def get(self, name: str, default: float = 0.0) -> float:
        return self._metrics.get(name, default)

    def take(self) -> dict:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def samples(self, count: int) -> list[dict]:
        """Up to `count` of the last generation batch's completions: prompt, completion, rewards by name, advantage."""
        return self._samples_source(count)
