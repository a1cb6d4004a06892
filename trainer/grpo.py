"""TRL's GRPOTrainer with this stack's generation backend and sequential-backprop bookkeeping.

TRL's algorithm runs unchanged (loss types, importance-sampling correction, metric names); only the vLLM backend
is swapped for `ServerGeneration` (HTTP sampling, adapter sync), checkpoints gain a manifest, and each micro-step
reports its peak GPU memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import trl.trainer.grpo_trainer as trl_grpo
from trl import GRPOTrainer

from .adapter_sync import AdapterPublisher
from .checkpoints import mark_complete
from .generation import ServerGeneration
from .memory import MicroStepMemory
from .metrics import StepMetrics
from .model import output_head_device_guard
from .vllm_client import VLLMServerClient


class MeasuredGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, reporting each micro-step's peak GPU memory, with the layers free to span GPUs."""

    def __init__(self, **kwargs):
        args = kwargs["args"]
        self.memory = MicroStepMemory(args.gradient_accumulation_steps, Path(args.output_dir))
        self.step_metrics = StepMetrics(self.latest_samples)
        super().__init__(**kwargs)

    def _prepare_inputs(self, generation_batch):
        self._micro_batch = super()._prepare_inputs(generation_batch)
        return self._micro_batch

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        with output_head_device_guard(self.accelerator.unwrap_model(model)):
            outputs = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        # With the layers split over both GPUs the head's outputs land on the last one, while TRL keeps masks,
        # advantages and vLLM's sampling logprobs on the first: bring them together there.
        device = self.accelerator.device
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in outputs)

    def latest_samples(self, count: int) -> list[dict]:
        """The last generation batch's first `count` completions, from where TRL keeps them for its tables."""
        logs = self._logs
        return [{"prompt": logs["prompt"][i], "completion": logs["completion"][i],
                 "rewards": {name: values[i] for name, values in logs["rewards"].items()},
                 "advantage": logs["advantages"][i]}
                for i in range(min(count, len(logs["completion"])))]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward + backward of one micro-batch
        batch = self._micro_batch
        tokens = int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
        self.memory.record(self.state.global_step, sequences=batch["completion_mask"].shape[0], tokens=tokens)
        return loss


class AdapterSyncGRPOTrainer(MeasuredGRPOTrainer):
    """Samples from the vLLM server over HTTP and syncs weights by registering each step's LoRA adapter."""

    def __init__(self, *, client: VLLMServerClient, adapters_dir: Path, wait_timeout: float,
                 stop_requested: Callable[[], bool], **kwargs):
        args = kwargs["args"]

        def make_backend(model, **_):  # called by GRPOTrainer.__init__ in place of TRL's VLLMGeneration
            publisher = AdapterPublisher(model, client, adapters_dir)
            publisher.remove_leftovers()
            return ServerGeneration(
                client, publisher, lambda: self.state.global_step,
                max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                wait_timeout=wait_timeout, stop_requested=stop_requested)

        # GRPOTrainer.__init__ builds its vLLM backend from this module-level name (and would open an NCCL group
        # to the server); swapping the name for the length of __init__ is the one seam TRL offers.
        with mock.patch.object(trl_grpo, "VLLMGeneration", make_backend):
            super().__init__(**kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        mark_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
