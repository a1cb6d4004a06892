"""The generation backend TRL's GRPOTrainer drives: sampling over HTTP from the vLLM server, weight sync by adapter.

It implements the two calls GRPOTrainer makes on `trl.generation.vllm_generation.VLLMGeneration` in server mode,
`sync_weights()` and `generate(...)`, so TRL's algorithm (losses, importance-sampling correction, metrics) runs
unchanged; evaluation samples through it too. Faults the server recovers from (a restart, a warm-up, a storm of
5xx answers) cost a wait, never the step: every request the trainer makes goes through `ServerRecovery`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, TypeVar

from .adapter_sync import AdapterPublisher
from .ranks import Ranks
from .vllm_client import AdapterNotFound, Completion, ServerUnavailable, VLLMServerClient

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


def nothing_to_restore() -> None:
    pass


class ServerRecovery:
    """The one recovery path of every request the trainer makes: the start-up probe, adapter registration,
    generation and evaluation.

    The client already retries each request (VLLM_MAX_RETRIES, capped backoff). A fault that outlasts those
    retries, a restart or a long storm of 5xx answers, is waited out here: up to VLLM_WAIT_TIMEOUT for /health,
    then `restore` gives the server back what a restart loses (the current adapter) and the request is made once
    more. A server that stays down, or fails the request again, ends the run with an error naming the server:
    a permanent outage exits after the retries, the wait, and the retries once more.
    """

    def __init__(self, client: VLLMServerClient, wait_timeout: float,
                 stop_requested: Callable[[], bool] = lambda: False, on_fault: Callable[[], None] = lambda: None):
        self.client = client
        self.wait_timeout = wait_timeout
        self.stop_requested = stop_requested
        self.on_fault = on_fault

    def call(self, what: str, request: Callable[[], T], restore: Callable[[], None] = nothing_to_restore) -> T:
        try:
            return request()
        except AdapterNotFound as exc:  # the server answered, without the adapter: it restarted between requests
            self.on_fault()
            log.warning("%s: the vLLM server does not know the adapter (%s): it restarted since the adapter was "
                        "registered", what, str(exc)[:200])
            restore()
            return request()
        except ServerUnavailable as exc:
            self.on_fault()
            log.warning("%s interrupted: %s; waiting up to %.0f s for the server to come back (VLLM_WAIT_TIMEOUT)",
                        what, exc, self.wait_timeout)
            self.client.wait_until_healthy(self.wait_timeout, stop_requested=self.stop_requested)
            restore()
            return request()


class ServerGeneration:
    """Every rank calls `sync_weights`, `generate` and `check_server_accepts_adapter` (TRL does), and each waits for
    rank 0's outcome; `sample` is rank 0's own."""

    def __init__(self, client: VLLMServerClient, publisher: AdapterPublisher, current_step: Callable[[], int],
                 ranks: Ranks = Ranks(), *, max_completion_length: int, temperature: float, top_p: float,
                 wait_timeout: float, stop_requested: Callable[[], bool] = lambda: False, seed: int | None = None):
        self.client = client
        self.ranks = ranks
        self.seed = seed  # with the step added, each step's requests sample reproducibly
        self.publisher = publisher
        self.current_step = current_step
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.recovery = ServerRecovery(client, wait_timeout, stop_requested, on_fault=self._count_fault)
        self.published_step: int | None = None
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
        """Publish the current step's adapter, once per step: TRL calls this before a step's generation and
        evaluation at a step's end; the weights change only with the step."""
        step = self.current_step()
        if step == self.published_step:
            return
        start = time.perf_counter()
        name = self.ranks.on_main(lambda: self.recovery.call(f"registering adapter version {step}",
                                                             lambda: self.publisher.publish(step)))
        self.published_step = step
        seconds = time.perf_counter() - start
        self.timings.sync_seconds += seconds
        log.debug("published adapter %s in %.3f s", name, seconds)

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None):
        if images is not None and any(i is not None for i in images):
            raise ValueError("image prompts are not supported by this trainer")
        # As TRL's server mode: rank 0 samples every rank's prompts in one request, each rank takes its slice. A
        # prompt's group may be split over two ranks; gathered in rank order, the groups are whole again.
        all_prompts = [p for rank_prompts in self.ranks.gather(prompts) for p in rank_prompts]
        with profiler or nullcontext():  # TRL's timing metric of the generation call
            sampled = self.ranks.on_main(lambda: self._sample_groups(all_prompts, num_generations))
        mine = sampled[self.ranks.rank * len(prompts):(self.ranks.rank + 1) * len(prompts)]
        prompt_ids = [prompt for prompt, _, _ in mine]
        completion_ids = [token_ids for _, token_ids, _ in mine]
        logprobs = [[[lp] for lp in token_logprobs] for _, _, token_logprobs in mine]  # TRL's (batch, length, 1)
        return prompt_ids, completion_ids, logprobs, None

    def _sample_groups(self, prompts: list[list[int]], num_generations: int) -> list[tuple]:
        """(prompt, completion token IDs, logprobs) for each of `prompts`, which repeat each prompt
        `num_generations` times in a row (TRL's groups); the server samples a group with n= in one request."""
        unique_prompts = prompts[::num_generations]
        start = time.perf_counter()
        completions = self.sample("generation", unique_prompts, n=num_generations)
        self.timings.generation_seconds += time.perf_counter() - start
        self.timings.adapter = self.publisher.current
        self.timings.completion_tokens += sum(len(c.token_ids) for c in completions)
        self.timings.prompt_tokens += sum(len(p) for p in unique_prompts) * num_generations
        return [(unique_prompts[c.prompt_index], c.token_ids, c.logprobs) for c in completions]

    # ------------------------------------------------------------------ for the trainer's own requests
    def sample(self, what: str, prompts: list[list[int]], n: int) -> list[Completion]:
        """`n` completions per prompt (token IDs) from the current step's adapter, in prompt order. On rank 0 only,
        after every rank called `sync_weights`."""
        if self.ranks.distributed and self.published_step != self.current_step():
            raise RuntimeError("sample() before sync_weights(): with several ranks the adapter is published by all")
        self.sync_weights()
        return self.recovery.call(what, lambda: self.client.complete(
            self.publisher.current, prompts, n=n, max_tokens=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p,
            seed=None if self.seed is None else self.seed + self.current_step()), restore=self._restore_adapter)

    def check_server_accepts_adapter(self) -> None:
        """Register and unload a probe copy of the untrained adapter: a server that cannot take it fails the start."""
        self.ranks.on_main(lambda: self.recovery.call("start-up probe (adapter registration)",
                                                      self.publisher.check_server_accepts))

    # ------------------------------------------------------------------ recovery
    def _restore_adapter(self) -> None:
        """After a fault: register the current adapter again if the server lost it (a restart loses them all)."""
        name = self.publisher.current
        if name is None:
            return
        if name in {m["id"] for m in self.client.models()}:
            log.info("vLLM server still has adapter %s: it was unavailable, not restarted", name)
            return
        log.warning("vLLM server came back without adapter %s (it restarted); registering it again", name)
        self.client.load_lora_adapter(name, str(self.publisher.path_of(name)))

    def _count_fault(self) -> None:
        self.timings.recoveries += 1
