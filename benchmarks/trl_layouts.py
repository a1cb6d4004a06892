#!/usr/bin/env python3
"""TRL's own vLLM layouts, the baselines BENCHMARKS.md compares the stack with.

    python3 benchmarks/trl_layouts.py server      # settings from the environment, as for trainer/train_grpo_vllm.py
    python3 benchmarks/trl_layouts.py colocate [--no-sleep]

- `server`: vLLM serves the model alone on another GPU (`trl vllm-serve`, `gpu.sh trl-serve`); after each optimizer
  step this trainer merges the LoRA adapter into the weights and broadcasts every parameter to it over NCCL.
- `colocate`: vLLM runs inside this process on the trainer's own GPU, taking VLLM_GPU_MEMORY_UTILIZATION of it at
  VLLM_TENSOR_PARALLEL_SIZE and VLLM_MAX_MODEL_LEN (the server's settings, docker/vllm/serve.py), asleep while the
  trainer trains (TRL's `vllm_enable_sleep_mode`; `--no-sleep` keeps it awake, for platforms without sleep mode)
  and given the merged weights before each round. TRL sleeps at level 2, which drops vLLM's weights, and pushes
  back the trainer's parameters only; a trainer that keeps its experts in MXFP4 holds them as buffers, which TRL
  never pushes, so for such a model vLLM sleeps at level 1 instead (weights kept in host memory while it sleeps).

Everything else is the stack's trainer: the same settings, data, rewards, model loading, micro-step memory and
run log, so the step lines compare the layouts alone. Two readings differ: the sync time holds TRL's weight push
and, colocated, vLLM's sleep and wake-ups; and a colocated run's memory peaks are the process's, with what vLLM
allocates through PyTorch, so the card's total (nvidia-smi, in gpu.sh's results.md) is what compares. This needs
vLLM and TRL in one environment (the vLLM image's packages plus the trainer's), where the stack keeps them in two;
`ATTN_IMPLEMENTATION=auto` takes FlashAttention 4 only where `flash-attn-4` is installed there too (the log's
"loaded ... attention" line says which ran).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "docker" / "vllm"))
from serve import ServerSettings  # noqa: E402
from trainer.config import Settings  # noqa: E402
from trainer.experts import has_mxfp4_experts  # noqa: E402
from trainer.generation import StepTimings  # noqa: E402
from trainer.grpo import MeasuredGRPOTrainer  # noqa: E402
from trainer.harmony import HarmonyTokens, pin_prompt_template, run_prompt_date  # noqa: E402
from trainer.model import load_model, load_tokenizer, lora_config  # noqa: E402
from trainer.ranks import Ranks  # noqa: E402
from trainer.recipe import grpo_config, training_prompts  # noqa: E402
from trainer.rewards import load_rewards  # noqa: E402
from trainer.run_log import QuietProgress, RunLogger, setup_logging  # noqa: E402
from transformers import ProgressCallback  # noqa: E402

log = logging.getLogger("trainer")


class TimedGeneration:
    """TRL's VLLMGeneration, timed as the stack's ServerGeneration times itself (for RunLogger). Sampling happens
    inside the step, so the step waits for all of it. Moving weights counts as sync, not sampling: TRL's weight push
    and, colocated, vLLM's sleep and wake-ups (TRL calls them from inside `generate` and `sync_weights`)."""

    def __init__(self, inner, steps_done):
        self.inner = inner
        self.steps_done = steps_done  # the policy version a round samples with: the steps taken before it
        self.timings = StepTimings()
        self.round = ("", 0)  # the adapter and version of the last round sampled: later steps may train on it
        self._timing = False
        # on the instances, so that TRL's own calls from inside `generate` are timed too
        inner.sync_weights = self._as_sync(inner.sync_weights)
        if getattr(inner, "llm", None) is not None:  # colocated: vLLM in this process
            inner.llm.sleep = self._as_sync(inner.llm.sleep)
            inner.llm.wake_up = self._as_sync(inner.llm.wake_up)

    def _as_sync(self, call):
        def timed(*args, **kwargs):
            if self._timing:  # inside another timed call (a wake-up inside the push): counted there
                return call(*args, **kwargs)
            self._timing, start = True, time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.timings.sync_seconds += time.perf_counter() - start
                self._timing = False
        return timed

    def __getattr__(self, name):  # sync_weights included: the timed one on the instance
        return getattr(self.inner, name)

    def take_timings(self) -> StepTimings:
        timings, self.timings = self.timings, StepTimings()
        timings.adapter, timings.adapter_version = self.round
        return timings

    def generate(self, prompts, images, num_generations, profiler=None):
        start, synced = time.perf_counter(), self.timings.sync_seconds
        result = self.inner.generate(prompts, images, num_generations, profiler)
        sampling = time.perf_counter() - start - (self.timings.sync_seconds - synced)
        self.timings.generation_seconds += sampling
        self.timings.rollout_wait_seconds += sampling
        self.round = ("merged weights", self.steps_done())
        self.timings.completion_tokens += sum(len(c) for c in result[1])
        self.timings.prompt_tokens += sum(len(p) for p in result[0])
        return result


def sleep_at_level_one() -> None:
    """vLLM's LLM.sleep at level 1 whatever level TRL asks for: the weights are kept in host memory, not dropped."""
    from vllm import LLM

    sleep = LLM.sleep
    LLM.sleep = lambda self, level=1, *args, **kwargs: sleep(self, 1, *args, **kwargs)


def layout_config(s: Settings, layout: str, sleep: bool):
    config = grpo_config(s, use_cpu=not torch.cuda.is_available())
    if layout == "colocate":
        server = ServerSettings.from_env(os.environ, gpus=None)
        config.vllm_mode = "colocate"
        config.vllm_gpu_memory_utilization = server.vllm_gpu_memory_utilization
        config.vllm_tensor_parallel_size = server.vllm_tensor_parallel_size
        config.vllm_max_model_length = server.vllm_max_model_len
        config.vllm_enable_sleep_mode = sleep
    return config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", choices=("server", "colocate"))
    parser.add_argument("--no-sleep", action="store_true", help="colocate: keep vLLM awake while the trainer trains")
    args = parser.parse_args(argv)
    s = Settings.from_env()
    setup_logging(s.run_dir)
    log.info("resolved settings:\n%s", s.describe())
    config = layout_config(s, args.layout, sleep=not args.no_sleep)
    where = (f"server={s.server_url}, weight_sync=nccl_merged_weights" if args.layout == "server" else
             f"gpu_memory_utilization={config.vllm_gpu_memory_utilization}, "
             f"sleep_mode={config.vllm_enable_sleep_mode}, weight_sync=merged_weights_in_process")
    log.info("Generation config: use_vllm=True, vllm_mode=%s, %s, num_generations=%d, prompts_per_step=%d, "
             "max_completion_length=%d", config.vllm_mode, where, s.num_generations, s.prompts_per_step,
             s.max_completion_length)
    reward_funcs = load_rewards(s.reward_funcs)
    tokenizer = load_tokenizer(s.model_name)
    if HarmonyTokens.of(tokenizer) is not None:
        pin_prompt_template(tokenizer, run_prompt_date(s.run_dir))
    dataset = training_prompts(s, tokenizer)
    model = load_model(s.model_name, s.torch_dtype, s.attn_implementation, s.gpu_memory_budget_gib,
                       s.gradient_checkpointing, experts_format=s.experts_format, experts_forward=s.experts_forward)
    if config.vllm_mode == "colocate" and config.vllm_enable_sleep_mode and has_mxfp4_experts(model):
        log.info("the experts are kept in MXFP4 buffers, which TRL does not push after a level-2 sleep: vLLM "
                 "sleeps at level 1")
        sleep_at_level_one()
    trainer = MeasuredGRPOTrainer(
        ranks=Ranks(), model=model, processing_class=tokenizer, reward_funcs=reward_funcs, train_dataset=dataset,
        args=config, peft_config=lora_config(s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_target_modules))
    trainer.vllm_generation = TimedGeneration(trainer.vllm_generation, lambda: trainer.state.global_step)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    trainer.add_callback(RunLogger(s.run_dir, trainer.vllm_generation, trainer.memory, dict, trainer.step_metrics))
    trainer.train()
    log.info("finished %d steps", trainer.state.global_step)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
