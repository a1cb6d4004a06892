"""The generation backend TRL's GRPOTrainer drives: sampling over HTTP from the vLLM server, weight sync by adapter.

It implements the two calls GRPOTrainer makes on `trl.generation.vllm_generation.VLLMGeneration` in server mode,
`sync_weights()` and `generate(...)`, so TRL's algorithm (losses, importance-sampling correction, metrics) runs
unchanged. Faults the server recovers from (a restart, a warm-up) cost a wait, never the step.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, TypeVar

from .adapter_sync import AdapterPublisher
from .vllm_client import AdapterNotFound, ServerUnavailable, VLLMServerClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# The compose entrypoint always starts vLLM with --logprobs-mode processed_logprobs: sampling logprobs after
# temperature scaling, which is what TRL's importance-sampling correction compares against.
SERVER_LOGPROBS_MODE = "processed_logprobs"


@dataclass
class StepTimings:
    """What one optimizer step spent outside backprop; read and reset by the run logger."""
    generation_seconds: float = 0.0
    sync_seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    adapter: str = ""
    recoveries: int = 0


class ServerGeneration:
    def __init__(self, client: VLLMServerClient, publisher: AdapterPublisher, current_step: Callable[[], int], *,
                 max_completion_length: int, temperature: float, top_p: float, wait_timeout: float,
                 stop_requested: Callable[[], bool] = lambda: False):
        self.client = client
        self.publisher = publisher
        self.current_step = current_step
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.wait_timeout = wait_timeout
        self.stop_requested = stop_requested
        self.timings = StepTimings()

    # TRL reads `vllm_generation.vllm_client.get_server_info()` to check the server's logprobs mode.
    @property
    def vllm_client(self) -> "ServerGeneration":
        return self

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": SERVER_LOGPROBS_MODE}}

    def take_timings(self) -> StepTimings:
        timings, self.timings = self.timings, StepTimings()
        return timings

    # ------------------------------------------------------------------ TRL's interface
    def sync_weights(self) -> None:
        start = time.perf_counter()
        name = self._with_recovery(lambda: self.publisher.publish(self.current_step()), republish=False)
        seconds = time.perf_counter() - start
        self.timings.sync_seconds += seconds
        log.debug("published adapter %s in %.3f s", name, seconds)

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None):
        if images is not None and any(i is not None for i in images):
            raise ValueError("image prompts are not supported by this trainer")
        # TRL repeats each prompt num_generations times; the server samples the group with n= in one request.
        unique_prompts = prompts[::num_generations]
        start = time.perf_counter()
        with profiler or nullcontext():  # TRL's timing metric of the generation call
            completions = self._with_recovery(lambda: self.client.complete(
                self.publisher.current, unique_prompts, n=num_generations, max_tokens=self.max_completion_length,
                temperature=self.temperature, top_p=self.top_p))
        self.timings.generation_seconds += time.perf_counter() - start
        self.timings.adapter = self.publisher.current
        self.timings.completion_tokens += sum(len(c.token_ids) for c in completions)
        self.timings.prompt_tokens += sum(len(p) for p in unique_prompts) * num_generations
        prompt_ids = [unique_prompts[c.prompt_index] for c in completions]
        completion_ids = [c.token_ids for c in completions]
        logprobs = [[[lp] for lp in c.logprobs] for c in completions]  # TRL's (batch, length, top-k=1) shape
        return prompt_ids, completion_ids, logprobs, None

    # ------------------------------------------------------------------ recovery
    def _with_recovery(self, call: Callable[[], T], republish: bool = True) -> T:
        try:
            return call()
        except AdapterNotFound:
            self.timings.recoveries += 1
            self.publisher.republish()
            return call()
        except ServerUnavailable as exc:
            self.timings.recoveries += 1
            log.warning("%s; waiting up to %.0f s for the server to come back (VLLM_WAIT_TIMEOUT)", exc, self.wait_timeout)
            self.client.wait_until_healthy(self.wait_timeout, stop_requested=self.stop_requested)
            if republish:
                self.publisher.republish()  # a restarted server has no adapters
            return call()
