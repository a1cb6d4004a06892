"""The generation backend TRL's GRPOTrainer drives: sampling over HTTP from the vLLM server, weight sync by adapter.

It implements the two calls GRPOTrainer makes on `trl.generation.vllm_generation.VLLMGeneration` in server mode,
`sync_weights()` and `generate(...)`, so TRL's algorithm (losses, importance-sampling correction, metrics) runs
unchanged; evaluation samples through it too. Faults the server recovers from (a restart, a warm-up, a storm of
5xx answers) cost a wait, never the step: every request the trainer makes goes through `ServerRecovery`, the
rounds sampled ahead in the background (rollouts.py) included.

This backend runs where the sampling happens (one process): it sees a round's prompts as one list and keys the
round sampled ahead by them, whoever gathered them.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, TypeVar

from .adapter_sync import AdapterPublisher
from .ranks import Ranks
from .rollouts import Round, RoundPrefetch, staleness
from .vllm_client import AdapterNotFound, Completion, ServerUnavailable, VLLMServerClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# The compose entrypoint always starts vLLM with --logprobs-mode processed_logprobs: sampling logprobs after
# temperature scaling, which is what TRL's importance-sampling correction compares against.
SERVER_LOGPROBS_MODE = "processed_logprobs"


@dataclass
class StepTimings:
    """What one optimizer step spent outside backprop; read and reset by the run logger."""
    generation_seconds: float = 0.0  # the sampling requests' own duration (in the background when overlapped)
    rollout_wait_seconds: float = 0.0  # how long the step waited for its rollouts
    sync_seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    adapter: str = ""  # the adapter that sampled the rollouts this step trains on
    adapter_version: int = 0
    overlapped: bool = False  # the rollouts were sampled ahead, while the trainer trained
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
    """Every rank makes the calls TRL and the callbacks make (`sync_weights`, `generate`,
    `check_server_accepts_adapter`, `start_next_round_when_due`) and gets rank 0's outcome; everything else, `sample`
    included, runs on rank 0 alone, the one process that talks to the server. The LoRA weights are whole on every
    rank, so rank 0 publishes an adapter without the others."""

    def __init__(self, client: VLLMServerClient, publisher: AdapterPublisher, current_step: Callable[[], int],
                 ranks: Ranks = Ranks(), *, max_completion_length: int, temperature: float, top_p: float,
                 wait_timeout: float, stop_requested: Callable[[], bool] = lambda: False, seed: int | None = None,
                 max_off_policy_steps: int = 0, steps_per_round: int = 1, last_step: Callable[[], int] = lambda: 0):
        self.client = client
        self.ranks = ranks
        self.seed = seed  # with the step added, each step's requests sample reproducibly
        self.publisher = publisher
        self.current_step = current_step
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.wait_timeout = wait_timeout
        self.stop_requested = stop_requested
        self.recovery = ServerRecovery(client, wait_timeout, stop_requested, on_fault=self._count_fault)
        self.published_step: int | None = None
        self.timings = StepTimings()
        self.max_off_policy_steps = max_off_policy_steps
        self.steps_per_round = steps_per_round
        self.last_step = last_step
        # Set by the trainer: this rank's prompt token IDs of the round after the one being sampled (None: not known).
        self.next_round_prompts: Callable[[], list[list[int]] | None] = lambda: None
        self.prefetch = RoundPrefetch(self._sample_ahead) if max_off_policy_steps else None
        # Set by the trainer: the model's end-of-turn tokens (TRL's EOS list), named in every request rather than
        # left to the server's defaults, so that vLLM stops where TRL's truncation mask expects an end.
        self.stop_token_ids: list[int] = []
        self._next_round: tuple[int, list[list[int]], int] | None = None  # (first step, prompts, n), not started
        self._round = Round([], 0, [], "", 0, 0.0)  # the round the current steps train on

    # TRL reads `vllm_generation.vllm_client.get_server_info()` to check the server's logprobs mode.
    @property
    def vllm_client(self) -> "ServerGeneration":
        return self

    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": SERVER_LOGPROBS_MODE}}

    def take_timings(self) -> StepTimings:
        """This step's timings, with the adapter of the round it trained on (steps sharing a round repeat it)."""
        timings, self.timings = self.timings, StepTimings()
        timings.adapter, timings.adapter_version = self._round.adapter, self._round.version
        timings.overlapped = self._round.sampled_ahead
        return timings

    # ------------------------------------------------------------------ TRL's interface (every rank)
    def sync_weights(self) -> None:
        """Publish the current step's adapter, once per step: TRL calls this before a step's generation and
        evaluation at a step's end; the weights change only with the step."""
        self.ranks.on_main(self._publish_current)

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None):
        if images is not None and any(i is not None for i in images):
            raise ValueError("image prompts are not supported by this trainer")
        # As TRL's server mode: rank 0 samples every rank's prompts in one request, each rank takes its slice. A
        # prompt's group may be split over two ranks; gathered in rank order, the groups are whole again. The next
        # round's prompts travel with them, for rank 0 to sample ahead.
        next_prompts = self.next_round_prompts() if self.prefetch is not None else None
        gathered = self.ranks.gather((prompts, next_prompts))
        all_prompts = [p for rank_prompts, _ in gathered for p in rank_prompts]
        all_next = None if any(n is None for _, n in gathered) else [p for _, n in gathered for p in n]
        with profiler or nullcontext():  # TRL's timing metric of the generation call
            sampled = self.ranks.on_main(lambda: self._sample_groups(all_prompts, all_next, num_generations))
        mine = sampled[self.ranks.rank * len(prompts):(self.ranks.rank + 1) * len(prompts)]
        prompt_ids = [prompt for prompt, _, _ in mine]
        completion_ids = [token_ids for _, token_ids, _ in mine]
        logprobs = [[[lp] for lp in token_logprobs] for _, _, token_logprobs in mine]  # TRL's (batch, length, 1)
        return prompt_ids, completion_ids, logprobs, None

    def start_next_round_when_due(self) -> None:
        """Start sampling the next round once the current adapter is recent enough for it: at most
        MAX_OFF_POLICY_STEPS steps before its first step. Called after each round is taken and at each step's start."""
        self.ranks.on_main(self._start_next_round_if_due)

    def check_server_accepts_adapter(self) -> None:
        """Register and unload a probe copy of the untrained adapter: a server that cannot take it fails the start."""
        self.ranks.on_main(lambda: self.recovery.call("start-up probe (adapter registration)",
                                                      self.publisher.check_server_accepts))

    def stop_sampling_ahead(self) -> None:
        """The run ends: nobody will train on a round in flight."""
        if self.prefetch is not None:
            self.prefetch.drop()
        self._next_round = None

    # ------------------------------------------------------------------ rank 0
    def _publish_current(self) -> None:
        step = self.current_step()
        if step == self.published_step:
            return
        start = time.perf_counter()
        name = self.recovery.call(f"registering adapter version {step}", lambda: self.publisher.publish(step))
        self.published_step = step
        seconds = time.perf_counter() - start
        self.timings.sync_seconds += seconds
        log.debug("published adapter %s in %.3f s", name, seconds)

    def _sample_groups(self, prompts: list[list[int]], next_prompts: list[list[int]] | None,
                       num_generations: int) -> list[tuple]:
        """(prompt, completion token IDs, logprobs) for each of `prompts`, which repeat each prompt
        `num_generations` times in a row (TRL's groups); the server samples a group with n= in one request."""
        unique_prompts = prompts[::num_generations]
        start = time.perf_counter()
        rollouts = self._round_for(unique_prompts, num_generations)
        self._round = rollouts
        self.timings.rollout_wait_seconds += time.perf_counter() - start
        self.timings.generation_seconds += rollouts.seconds
        self.timings.recoveries += rollouts.recoveries
        self.timings.completion_tokens += sum(len(c.token_ids) for c in rollouts.completions)
        self.timings.prompt_tokens += sum(len(p) for p in unique_prompts) * num_generations
        self._plan_next_round(next_prompts, num_generations)
        return [(unique_prompts[c.prompt_index], c.token_ids, c.logprobs) for c in rollouts.completions]

    def _round_for(self, prompts: list[list[int]], n: int) -> Round:
        """The round sampled ahead for these prompts if there is one within the bound; else sampled now with the
        current step's adapter, as without overlap."""
        step = self.current_step()
        ahead = self.prefetch.take(prompts, n) if self.prefetch else None
        self.publisher.retire_idle()  # the round sampled ahead no longer holds its adapter version
        if ahead is not None and staleness(step, ahead.version) > self.max_off_policy_steps:
            log.warning("dropping the round sampled ahead by adapter version %d: step %d would train on it %d steps "
                        "behind, more than MAX_OFF_POLICY_STEPS=%d; sampling it again now", ahead.version, step + 1,
                        staleness(step, ahead.version), self.max_off_policy_steps)
            ahead = None
        if ahead is not None:
            return ahead
        self._publish_current()
        return self._sample_round(prompts, n, step, self.client, self.recovery)

    def _plan_next_round(self, next_prompts: list[list[int]] | None, n: int) -> None:
        if self.prefetch is None:
            return
        first_step = self.current_step() + self.steps_per_round
        if first_step >= self.last_step():  # no round after the last one
            return
        if next_prompts is None:  # the data ends first (an epoch boundary): that round is sampled when it is due
            return
        self._next_round = (first_step, next_prompts[::n], n)
        self._start_next_round_if_due()

    def _start_next_round_if_due(self) -> None:
        if self._next_round is None or self.prefetch is None or self.prefetch.in_flight:
            return
        first_step, prompts, n = self._next_round
        if self.current_step() < first_step - self.max_off_policy_steps:
            return
        self._next_round = None
        self._publish_current()  # the newest adapter samples it
        self.prefetch.start(prompts, n, self.publisher.current_version, first_step)

    def _sample_ahead(self, prompts: list[list[int]], n: int, first_step: int) -> Round:
        """In the background thread: its own client (a requests.Session per thread) and recovery, the same path."""
        client = self.client.copy()
        faults = []
        recovery = ServerRecovery(client, self.wait_timeout, self.stop_requested, on_fault=lambda: faults.append(1))
        rollouts = self._sample_round(prompts, n, first_step, client, recovery)
        rollouts.recoveries = len(faults)
        return rollouts

    def _sample_round(self, prompts: list[list[int]], n: int, step: int, client: VLLMServerClient,
                      recovery: ServerRecovery) -> Round:
        """The round that trains from `step` on (its number seeds the request), sampled by the current adapter."""
        adapter, version = self.publisher.acquire()
        try:
            start = time.perf_counter()
            completions = recovery.call("generation", lambda: client.complete(
                adapter, prompts, n=n, max_tokens=self.max_completion_length, temperature=self.temperature,
                top_p=self.top_p, seed=self._seed(step), stop_token_ids=self.stop_token_ids),
                restore=lambda: self.publisher.ensure_registered(adapter, client))
            return Round(prompts, n, completions, adapter, version, time.perf_counter() - start)
        finally:
            self.publisher.release(adapter)

    def sample(self, what: str, prompts: list[list[int]], n: int) -> list[Completion]:
        """`n` completions per prompt (token IDs) from the current step's adapter, in prompt order (evaluation).
        Unseeded: vLLM's CPU build fails a seeded request whose prefill it splits over steps, as it does with an
        evaluation's many prompts; training rounds carry the seed."""
        self._publish_current()
        return self.recovery.call(what, lambda: self.client.complete(
            self.publisher.current, prompts, n=n, max_tokens=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p, stop_token_ids=self.stop_token_ids),
            restore=self._restore_adapter)

    def _seed(self, step: int) -> int | None:
        return None if self.seed is None else self.seed + step

    # ------------------------------------------------------------------ recovery
    def _restore_adapter(self) -> None:
        """After a fault: register the current adapter again if the server lost it (a restart loses them all)."""
        if self.publisher.current is not None:
            self.publisher.ensure_registered(self.publisher.current, self.client)

    def _count_fault(self) -> None:
        self.timings.recoveries += 1
