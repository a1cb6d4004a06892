"""Graceful stop: `docker compose down` sends SIGTERM; the trainer finishes the step, checkpoints and exits 0."""

from __future__ import annotations

import logging
import signal

from transformers import TrainerCallback

from .ranks import Ranks

log = logging.getLogger(__name__)


class GracefulStop(TrainerCallback):
    def __init__(self, ranks: Ranks = Ranks()):
        self.ranks = ranks
        self.requested = False
        self.training = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training:  # nothing to save yet: leave at once
            log.warning("%s before training started; exiting", name)
            raise SystemExit(0)
        if self.requested:
            log.warning("second %s: exiting without waiting for the step (last checkpoint stays)", name)
            raise SystemExit(1)
        self.requested = True
        log.warning("%s: finishing the current step, then checkpointing and exiting", name)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        # Each rank gets its own SIGTERM, not all within the same step: they agree here, at every step's end, so
        # that all save the same checkpoint and stop together.
        self.requested = self.ranks.any(self.requested)
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
