"""Evaluation on held-out prompts through the same server, with the current adapter, every EVAL_STEPS steps.

One completion per prompt, all prompts in one request: the cost is one generation batch, not a training step.
Results are logged as `eval/...` in the step's metrics line and in metrics.jsonl. Sampling goes through the
generation backend, so a restart or a storm of 5xx answers during evaluation is waited out like one during
generation; a server that stays down costs the evaluation, never the step just trained (it is checkpointed first).
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from . import harmony
from .data import prompt_token_ids
from .generation import ServerGeneration
from .metrics import StepMetrics
from .rewards import reward_arguments
from .run_log import format_reward
from .vllm_client import ServerUnavailable, StopRequested

log = logging.getLogger(__name__)


class Evaluator(TrainerCallback):
    def __init__(self, generation: ServerGeneration, tokenizer, dataset, reward_funcs, reward_weights, every: int,
                 metrics: StepMetrics, chat_template_kwargs: dict):
        self.generation = generation
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.reward_funcs = reward_funcs
        self.reward_weights = list(reward_weights) or [1.0] * len(reward_funcs)
        self.every = every
        self.metrics = metrics  # written with the step's record by the run logger
        self.prompt_ids = [prompt_token_ids(tokenizer, row["prompt"], chat_template_kwargs) for row in dataset]
        self.failure: ServerUnavailable | None = None
        self.harmony = harmony.HarmonyTokens.of(tokenizer)

    def on_step_end(self, args, state, control, **kwargs):
        if not (self.every and state.global_step % self.every == 0):
            return
        try:
            self.generation.sync_weights()  # by every rank; then rank 0 samples and every rank gets the metrics
            self.metrics.add(self.generation.ranks.on_main(lambda: self.evaluate(state.global_step, state)))
        except StopRequested:  # the stop callback saves this step and ends the run
            log.warning("evaluation at step %d skipped: stop requested while waiting for the server",
                        state.global_step)
        except ServerUnavailable as exc:
            # Raised again once the trainer has written this step's metrics and checkpoint (on_save).
            self.failure = exc
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        if self.failure is not None:
            log.error("evaluation at step %d failed; step %d is checkpointed, restart to resume",
                      state.global_step, state.global_step)
            raise self.failure

    def evaluate(self, step: int, trainer_state) -> dict:
        start = time.perf_counter()
        completions = self.generation.sample("evaluation", self.prompt_ids, n=1)
        columns = {k: self.dataset[k] for k in self.dataset.column_names if k != "prompt"}
        metrics = {}
        if self.harmony is None:
            texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
            messages = [[{"role": "assistant", "content": text}] for text in texts]
        else:  # scored as in training: the final channel
            parsed = harmony.parse_completions([c.token_ids for c in completions], self.tokenizer, self.harmony)
            messages = [[p.as_message()] for p in parsed]
            metrics.update({f"eval/{name}": value for name, value in
                            harmony.completion_metrics(parsed, columns.get("solution")).items()})
        total = [0.0] * len(messages)
        for func, weight in zip(self.reward_funcs, self.reward_weights):
            scores = func(**reward_arguments(self.dataset["prompt"], messages, [c.token_ids for c in completions],
                                             columns, trainer_state))
            scores = [0.0 if s is None else s for s in scores]
            metrics[f"eval/rewards/{func.__name__}/mean"] = sum(scores) / len(scores)
            total = [t + weight * s for t, s in zip(total, scores)]
        mean = sum(total) / len(total)
        metrics["eval/reward"] = mean
        metrics["eval/reward_std"] = (sum((t - mean) ** 2 for t in total) / len(total)) ** 0.5
        metrics["eval/completions/clipped_ratio"] = sum(c.finish_reason == "length" for c in completions) / len(completions)
        metrics["eval/completions/mean_length"] = sum(len(c.token_ids) for c in completions) / len(completions)
        metrics["eval/seconds"] = time.perf_counter() - start
        log.info("eval at step %d on %d held-out prompts | reward %s ± %s | clipped %.2f | len %.0f", step,
                 len(messages), format_reward(mean), format_reward(metrics["eval/reward_std"]),
                 metrics["eval/completions/clipped_ratio"], metrics["eval/completions/mean_length"])
        return metrics
