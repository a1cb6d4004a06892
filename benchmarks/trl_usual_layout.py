#!/usr/bin/env python3
"""TRL's usual 2-GPU layout, as the baseline BENCHMARKS.md compares the stack with.

vLLM serves the model alone on one GPU (`trl vllm-serve`, TP 1, `gpu.sh trl-serve`); this trainer holds the whole
model on the other and, after each optimizer step, merges the LoRA adapter into the weights and broadcasts every
parameter to the server over NCCL (TRL's own `VLLMGeneration`). Everything else is the stack's trainer: the same
settings (environment, `.env`), data, rewards, model loading, micro-step memory and run log, so the two step lines
compare the layouts alone.

    CUDA_VISIBLE_DEVICES=1 python3 benchmarks/trl_usual_layout.py   # settings as for trainer/train_grpo_vllm.py
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.config import Settings  # noqa: E402
from trainer.generation import StepTimings  # noqa: E402
from trainer.grpo import MeasuredGRPOTrainer  # noqa: E402
from trainer.model import load_model, load_tokenizer, lora_config  # noqa: E402
from trainer.rewards import load_rewards  # noqa: E402
from trainer.run_log import RunLogger, setup_logging  # noqa: E402
from trainer.recipe import grpo_config, training_prompts  # noqa: E402
from trainer.run_log import QuietProgress  # noqa: E402
from transformers import ProgressCallback  # noqa: E402

log = logging.getLogger("trainer")


class TimedGeneration:
    """TRL's VLLMGeneration, timed the way the stack's ServerGeneration times itself (for RunLogger)."""

    def __init__(self, inner):
        self.inner = inner
        self.timings = StepTimings(adapter="merged into the weights")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def take_timings(self) -> StepTimings:
        timings, self.timings = self.timings, StepTimings(adapter=self.timings.adapter)
        return timings

    def sync_weights(self) -> None:
        start = time.perf_counter()
        self.inner.sync_weights()
        torch.cuda.synchronize()
        self.timings.sync_seconds += time.perf_counter() - start

    def generate(self, prompts, images, num_generations, profiler=None):
        start = time.perf_counter()
        result = self.inner.generate(prompts, images, num_generations, profiler)
        self.timings.generation_seconds += time.perf_counter() - start
        prompt_ids, completion_ids = result[0], result[1]
        self.timings.completion_tokens += sum(len(c) for c in completion_ids)
        self.timings.prompt_tokens += sum(len(p) for p in prompt_ids)
        return result


def main() -> int:
    s = Settings.from_env()
    setup_logging(s.run_dir)
    log.info("resolved settings:\n%s", s.describe())
    log.info("Generation config: use_vllm=True, vllm_mode=server, server=%s, weight_sync=nccl_merged_weights, "
             "num_generations=%d, prompts_per_step=%d, max_completion_length=%d", s.server_url,
             s.num_generations, s.prompts_per_step, s.max_completion_length)
    reward_funcs = load_rewards(s.reward_funcs)
    tokenizer = load_tokenizer(s.model_name)
    dataset = training_prompts(s, tokenizer)
    model = load_model(s.model_name, s.torch_dtype, s.attn_implementation, s.gpu_memory_budget_gib,
                       s.gradient_checkpointing)
    trainer = MeasuredGRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=reward_funcs, train_dataset=dataset,
        args=grpo_config(s, use_cpu=False),
        peft_config=lora_config(s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_target_modules))
    trainer.vllm_generation = TimedGeneration(trainer.vllm_generation)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(RunLogger(s.run_dir, trainer.vllm_generation, trainer.memory, dict, {}))
    trainer.train()
    log.info("finished %d steps", trainer.state.global_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
