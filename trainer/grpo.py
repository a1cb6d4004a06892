"""TRL's GRPOTrainer with this stack's generation backend and sequential-backprop bookkeeping.

TRL's algorithm runs unchanged (loss types, importance-sampling correction, metric names); only the vLLM backend
is swapped for `ServerGeneration` (HTTP sampling, adapter sync), checkpoints gain a manifest, and each micro-step
reports its peak GPU memory.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch
from torch.nn.parallel import DistributedDataParallel
import trl.trainer.grpo_trainer as trl_grpo
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from . import harmony
from .adapter_sync import AdapterPublisher
from .checkpoints import mark_complete
from .generation import ServerGeneration
from .memory import MicroStepMemory
from .metrics import StepMetrics
from .model import output_head_device_guard
from .old_logprobs import OldLogprobsFromTrainingForward
from .ranks import Ranks, shard_frozen_base
from .vllm_client import VLLMServerClient


class MeasuredGRPOTrainer(OldLogprobsFromTrainingForward, GRPOTrainer):
    """TRL's GRPOTrainer, reporting each micro-step's peak GPU memory, with the layers free to span GPUs; on-policy
    rounds take their old logprobs from the training forward (old_logprobs.py)."""

    def __init__(self, *, ranks: Ranks, **kwargs):
        args = kwargs["args"]
        self.ranks = ranks
        self.memory = MicroStepMemory(args.gradient_accumulation_steps, Path(args.output_dir), ranks)
        self.step_metrics = StepMetrics(self.latest_samples)
        super().__init__(**kwargs)
        self.harmony = harmony.HarmonyTokens.of(self._tokenizer)  # None: completions are plain text
        self._batch_solutions: list | None = None
        if ranks.distributed:  # after TRL added the LoRA layers, before the model is wrapped in DDP
            shard_frozen_base(self.model, ranks.device())

    def _move_model_to_device(self, model, device):
        if not self.ranks.distributed:  # ranks: the model is in host memory until shard_frozen_base moves it
            super()._move_model_to_device(model, device)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not (self.ranks.distributed and self.args.device.type == "cpu"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        # transformers maps a multi-process run's optimizer state to args.device, which on CPU reads "cpu:<rank>",
        # a location torch.load rejects ("don't know how to restore data location"): load it to the CPU itself
        load = torch.load
        with mock.patch.object(torch, "load", lambda *args, **kwargs: load(*args, **{**kwargs, "map_location": "cpu"})):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _wrap_model(self, model, training=True, dataloader=None):
        if not (self.ranks.distributed and training) or isinstance(model, DistributedDataParallel):
            return super()._wrap_model(model, training, dataloader)
        # accelerate refuses DDP around FSDP2's DTensor parameters on GPUs (seen on 2 x H200); DDP itself leaves them
        # to FSDP2 (shard_frozen_base lists them as ignored). The HF Trainer hands a model wrapped here to nobody else.
        device_ids = [self.ranks.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=device_ids)

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

    def _generate_and_score_completions(self, inputs):
        self._batch_solutions = [row.get("solution") for row in inputs] if "solution" in inputs[0] else None
        return super()._generate_and_score_completions(inputs)

    def _generate(self, prompts: list):
        """TRL's sampling, with a harmony model's completions handed to the rewards channel by channel: the final
        answer as `content`, the reasoning as `thinking` (harmony.py)."""
        outputs = super()._generate(prompts)
        if self.harmony is None:
            return outputs
        prompt_ids, completion_ids, tool_mask, _, *rest = outputs
        parsed = harmony.parse_completions(completion_ids, self._tokenizer, self.harmony)
        if is_conversational({"prompt": prompts[0]}):
            completions = [[p.as_message()] for p in parsed]
        else:
            completions = [p.as_message()["content"] for p in parsed]
        self._log_harmony_metrics(parsed)
        return (prompt_ids, completion_ids, tool_mask, completions, *rest)

    def _log_harmony_metrics(self, parsed: list) -> None:
        """harmony.completion_sums over every rank's completions, as TRL logs its own completion metrics."""
        sums = harmony.completion_sums(parsed, self._batch_solutions)
        names = list(sums)
        totals = self.accelerator.gather(torch.tensor([[sums[n] for n in names]], dtype=torch.float64,
                                                      device=self.accelerator.device)).sum(dim=0)
        mode = "train" if self.model.training else "eval"
        count = totals[names.index("completions")].item()
        for name, total in zip(names, totals.tolist()):
            if name != "completions" and count:
                self._metrics[mode][name].append(total / count)

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


class BatchLookahead:
    """The trainer's batch iterator, readable ahead: which batch comes a given number of batches after one it
    handed out. The trainer gets the same batches in the same order; some are only drawn earlier."""

    def __init__(self, source: Iterator):
        self.source = source
        self._ahead: deque = deque()
        self._handed_out = 0
        self._position_of: OrderedDict[int, int] = OrderedDict()  # id of a batch handed out -> its position

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._ahead.popleft() if self._ahead else next(self.source)
        self._position_of[id(batch)] = self._handed_out
        self._position_of.move_to_end(id(batch))
        while len(self._position_of) > 1024:  # only recent batches are asked about
            self._position_of.popitem(last=False)
        self._handed_out += 1
        return batch

    def after(self, batch, count: int):
        """The batch `count` positions after `batch`; None if `batch` was not handed out here or the data ends."""
        position = self._position_of.get(id(batch))
        if position is None:
            return None
        index = position + count - self._handed_out  # into the batches drawn ahead
        if index < 0:
            return None
        while len(self._ahead) <= index:
            try:
                self._ahead.append(next(self.source))
            except StopIteration:
                return None
        return self._ahead[index]


class AdapterSyncGRPOTrainer(MeasuredGRPOTrainer):
    """Samples from the vLLM server over HTTP and syncs weights by registering each step's LoRA adapter; with
    `max_off_policy_steps` > 0 the next generation round is sampled while this one trains (rollouts.py)."""

    def __init__(self, *, client: VLLMServerClient, adapters_dir: Path, wait_timeout: float,
                 stop_requested: Callable[[], bool], max_off_policy_steps: int = 0, **kwargs):
        args = kwargs["args"]
        self.max_off_policy_steps = max_off_policy_steps  # rounds sampled ahead keep TRL's old-logprob pass
        self._lookahead: BatchLookahead | None = None
        self._generation_batch = None

        ranks = kwargs["ranks"]

        def make_backend(model, **_):  # called by GRPOTrainer.__init__ in place of TRL's VLLMGeneration
            publisher = AdapterPublisher(model, client, adapters_dir)
            if ranks.is_main:
                publisher.remove_leftovers()
            return ServerGeneration(
                client, publisher, lambda: self.state.global_step, ranks,
                max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                wait_timeout=wait_timeout, stop_requested=stop_requested, seed=args.seed,
                max_off_policy_steps=max_off_policy_steps,
                steps_per_round=max(args.steps_per_generation // args.gradient_accumulation_steps, 1),
                last_step=lambda: self.state.max_steps)

        # GRPOTrainer.__init__ builds its vLLM backend from this module-level name (and would open an NCCL group
        # to the server); swapping the name for the length of __init__ is the one seam TRL offers.
        with mock.patch.object(trl_grpo, "VLLMGeneration", make_backend):
            super().__init__(**kwargs)
        self.vllm_generation.stop_token_ids = list(self.eos_token_ids)
        self.vllm_generation.next_round_prompts = self.next_round_prompt_ids
        self.add_callback(SampleAheadAtStepStart(self.vllm_generation))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # The HF Trainer draws each step's batches from one iterator per epoch (a new one after a resume): read it
        # through a lookahead, so that the next round's prompts are known before the trainer reaches them.
        if self._lookahead is None or self._lookahead.source is not epoch_iterator:
            self._lookahead = BatchLookahead(epoch_iterator)
        return super().get_batch_samples(self._lookahead, num_batches, device)

    def _prepare_inputs(self, generation_batch):
        if self.model.training:
            self._generation_batch = generation_batch
        return super()._prepare_inputs(generation_batch)

    def next_round_prompt_ids(self) -> list[list[int]] | None:
        """The token IDs of the next generation round's prompts, tokenized as TRL tokenizes them when it gets there
        (each repeated num_generations times, as TRL passes them); None if they are not known yet."""
        if self._lookahead is None or self._generation_batch is None:
            return None
        # TRL generates every steps_per_generation x num_iterations batches (its _prepare_inputs).
        rows = self._lookahead.after(self._generation_batch, self.args.steps_per_generation * self.num_iterations)
        if rows is None:
            return None
        prompt_ids, _, _ = self._tokenize_prompts(copy.deepcopy([row["prompt"] for row in rows]))
        return prompt_ids

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.vllm_generation.stop_sampling_ahead()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        self.ranks.barrier()  # every rank's RNG state is in the checkpoint before the manifest lists its files
        if self.ranks.is_main:
            mark_complete(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
        self.ranks.barrier()


class SampleAheadAtStepStart(TrainerCallback):
    """When several steps train on one round, the next round starts sampling MAX_OFF_POLICY_STEPS steps before it
    is due, at a step's start (with one step per round it starts right after the current round is taken)."""

    def __init__(self, generation: ServerGeneration):
        self.generation = generation

    def on_step_begin(self, args, state, control, **kwargs):
        if self.generation.prefetch is not None:
            self.generation.start_next_round_when_due()
