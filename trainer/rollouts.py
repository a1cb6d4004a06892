"""Rollouts sampled ahead: the next generation round's prompts go to the vLLM server while the trainer still trains.

A generation round is the batch of prompts TRL samples at once (GENERATION_BATCH_SIZE sequences; one or more
optimizer steps train on it). With MAX_OFF_POLICY_STEPS > 0 the round after the current one is requested in a
background thread as soon as the adapter it may use is registered: the server decodes while the trainer runs
forward and backward. The prefetch is keyed by the round's prompt token IDs, so the trainer takes it only for the
prompts it was sampled for; anything else (a resumed run, an epoch boundary) is sampled at once, as without overlap.

Each round carries the adapter version that sampled it. A round is never used when that version lags the policy at
the round's first step by more than the bound; like prime-rl's `async_level` and TRL's async GRPO `max_staleness`,
the bound counts optimizer steps between the weights that sampled and the weights that train.

Thread safety: the background thread has its own HTTP client (its own `requests.Session`; sessions are not shared
across threads) and its own `ServerRecovery`; it touches no TRL state: the trainer tokenizes the prompts before
handing them over, and takes the result back on its own thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from .vllm_client import Completion

log = logging.getLogger(__name__)


@dataclass
class Round:
    """One generation round's completions and the adapter version that sampled them."""
    prompts: list[list[int]]
    n: int
    completions: list[Completion]
    adapter: str
    version: int
    seconds: float  # the request's own duration, from send to answer
    recoveries: int = 0
    sampled_ahead: bool = False  # while the trainer trained, not while it waited


@dataclass
class _Pending:
    prompts: list[list[int]]
    n: int
    version: int
    done: threading.Event = field(default_factory=threading.Event)
    result: Round | None = None
    error: BaseException | None = None


class RoundPrefetch:
    """At most one round sampled ahead, by `sample(prompts, n, first_step) -> Round` in a daemon thread.

    `sample` must name the adapter it uses and keep it registered until it returns (the publisher's `in_use`)."""

    def __init__(self, sample: Callable[[list[list[int]], int, int], Round]):
        self._sample = sample
        self._pending: _Pending | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def start(self, prompts: list[list[int]], n: int, version: int, first_step: int) -> None:
        if self._pending is not None:
            raise RuntimeError("a round is already being sampled ahead")
        pending = _Pending([list(p) for p in prompts], n, version)

        def run() -> None:
            try:
                pending.result = self._sample(pending.prompts, n, first_step)
            except BaseException as exc:  # handed to the trainer's thread by take()
                pending.error = exc
            finally:
                pending.done.set()

        self._pending = pending
        threading.Thread(target=run, name=f"rollouts-v{version}", daemon=True).start()
        log.debug("sampling the next round (%d prompts x %d) ahead with adapter version %d", len(prompts), n, version)

    def take(self, prompts: list[list[int]], n: int) -> Round | None:
        """The round sampled ahead for exactly these prompts, waiting for it if it is still being sampled; None if
        none was, or it was sampled for other prompts (then it is dropped unused)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.prompts != [list(p) for p in prompts] or pending.n != n:
            log.warning("the round sampled ahead was for other prompts than the trainer's; sampling these now")
            return None
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        pending.result.sampled_ahead = True
        return pending.result

    def drop(self) -> None:
        """Forget the round in flight (the run ends): its request finishes on the server and nobody trains on it."""
        self._pending = None


def staleness(training_step: int, version: int) -> int:
    """Optimizer steps between the adapter that sampled a round (`version`, the steps it had taken) and the policy
    that trains on it at `training_step` (steps taken before it)."""
    return training_step - version
