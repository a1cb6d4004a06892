"""One forward less per sequence: on-policy steps take the "old" logprobs from the training forward.

With vLLM's importance-sampling correction on, TRL 1.16 always runs a no-grad forward over every sequence of a
generation round to get the trainer's "old" logprobs (`_generate_and_score_completions`): the numerator of the
vLLM importance-sampling weights, and the reference of the PPO ratio. When the round is on-policy — sampled
synchronously by the adapter being trained (MAX_OFF_POLICY_STEPS=0), trained in a single pass (num_iterations 1),
and no optimizer step inside the round (the step's micro-steps are a whole number of rounds) — those old logprobs
are the ones the training forward computes anyway, so the extra pass recomputes them with nothing changed in
between. `OldLogprobsFromTrainingForward` skips that pass for such rounds and computes, from the training forward's
detached logprobs, exactly what TRL would have computed from it: the importance-sampling weights (every
`vllm_importance_sampling_mode`, the same clamps and masks) and TRL's metrics under their names
(`sampling/sampling_logp_difference/{mean,max}`, `sampling/importance_sampling_ratio/{min,mean,max}`), summed
over the round's micro-steps and reported once per round as TRL does. The PPO ratio's reference is then the
detached logprobs, as TRL itself does when it skips the pass without vLLM. Rounds that are stale, evaluation, and
configurations with several optimizer steps per round keep TRL's pass.
"""

from __future__ import annotations

import math

import torch


def vllm_importance_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, mode: str,
                            clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """TRL 1.16's vLLM importance-sampling weights (`_generate_and_score_completions`), for `old_logps` given."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)  # vLLM's missing logprobs weigh 1
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    if mode in ("sequence_mask", "token_mask"):
        low = clip_min if clip_min is not None else -math.inf
        high = clip_max if clip_max is not None else math.inf
        return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)
    raise ValueError(f"Unknown vLLM importance sampling level: {mode}")


class _RoundStatistics:
    """What TRL's sampling metrics summarize over one generation round, gathered micro-step by micro-step."""

    def __init__(self):
        self.delta_sum, self.delta_count, self.delta_max = 0.0, 0, 0.0
        self.ratio_sum, self.ratio_count, self.ratio_min, self.ratio_max = 0.0, 0, math.inf, -math.inf

    def add(self, delta: torch.Tensor, ratios: torch.Tensor) -> None:
        if delta.numel():
            self.delta_sum += delta.sum().item()
            self.delta_count += delta.numel()
            self.delta_max = max(self.delta_max, delta.max().item())
        if ratios.numel():
            self.ratio_sum += ratios.sum().item()
            self.ratio_count += ratios.numel()
            self.ratio_min = min(self.ratio_min, ratios.min().item())
            self.ratio_max = max(self.ratio_max, ratios.max().item())

    def per_process(self) -> dict[str, float]:
        """This process's values, as TRL computes them over its share of a round (0 where there is nothing)."""
        ratios = self.ratio_count > 0
        return {"delta_mean": self.delta_sum / self.delta_count if self.delta_count else 0.0,
                "delta_max": self.delta_max,
                "ratio_min": self.ratio_min if ratios else 0.0,
                "ratio_mean": self.ratio_sum / self.ratio_count if ratios else 0.0,
                "ratio_max": self.ratio_max if ratios else 0.0}


class OldLogprobsFromTrainingForward:
    """A mixin for TRL's GRPOTrainer (before it in the bases): on-policy rounds skip TRL's old-logprob pass.

    `reuse_training_logprobs` turns it off; `max_off_policy_steps` is how many adapter versions behind a round may
    be sampled (the trainer sets it; anything above 0 keeps TRL's pass)."""

    reuse_training_logprobs = True
    max_off_policy_steps = 0
    _pending_inputs: dict | None = None
    _round_stats: _RoundStatistics | None = None
    _round_micro_steps = 0

    def skips_old_logprob_pass(self) -> bool:
        """Whether the round being scored now trains on-policy, its old logprobs the training forward's."""
        args = self.args
        return (self.reuse_training_logprobs and self.use_vllm and self.vllm_importance_sampling_correction
                and self.model.training and self.max_off_policy_steps == 0 and self.num_iterations == 1
                and args.gradient_accumulation_steps % args.steps_per_generation == 0)

    def _generate_and_score_completions(self, inputs):
        if not self.skips_old_logprob_pass():
            return super()._generate_and_score_completions(inputs)
        # TRL skips the pass when the correction is off and the round is on-policy: turn the correction off for
        # the scoring (nothing else reads it there), and apply it in the training forward instead (_compute_loss).
        self._flush_round_metrics()  # a round cut short (never with whole rounds per step) reports what it had
        self.vllm_importance_sampling_correction = False
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self.vllm_importance_sampling_correction = True

    def _compute_loss(self, model, inputs):
        deferred = (self.use_vllm and self.vllm_importance_sampling_correction
                    and "importance_sampling_ratio" not in inputs and "old_per_token_logps" not in inputs
                    and inputs.get("sampling_per_token_logps") is not None)
        if not deferred:
            return super()._compute_loss(model, inputs)
        self._pending_inputs = inputs  # the training forward fills in the weights (_get_per_token_logps_...)
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._pending_inputs = None
        self._round_micro_steps += 1
        if self._round_micro_steps >= self.args.steps_per_generation:
            self._flush_round_metrics()
        return loss

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        outputs = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        inputs = self._pending_inputs
        if inputs is not None and torch.is_grad_enabled():  # the training forward of a deferred micro-batch
            self._pending_inputs = None
            self._importance_weights_from(outputs[0].detach(), inputs)
        return outputs

    def _importance_weights_from(self, logps: torch.Tensor, inputs: dict) -> None:
        sampling = inputs["sampling_per_token_logps"]
        logps = logps.to(sampling.device)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = self.vllm_importance_sampling_mode
        ratio = vllm_importance_weights(logps, sampling, mask, mode, self.vllm_importance_sampling_clip_min,
                                        self.vllm_importance_sampling_clip_max)
        inputs["importance_sampling_ratio"] = ratio
        bool_mask = mask.bool()
        delta = torch.abs(logps - sampling)
        delta = delta[bool_mask & ~torch.isnan(delta)]
        ratios = ratio.flatten() if mode in ("sequence_mask", "sequence_truncate") else ratio[bool_mask]
        if self._round_stats is None:
            self._round_stats = _RoundStatistics()
        self._round_stats.add(delta, ratios)

    def _flush_round_metrics(self) -> None:
        """TRL's sampling metrics of the round, gathered over the processes as TRL gathers them."""
        stats, self._round_stats, self._round_micro_steps = self._round_stats, None, 0
        if stats is None:
            return
        from trl.trainer.utils import nanmax, nanmin

        values = stats.per_process()
        device = self.accelerator.device
        local = torch.tensor([values[k] for k in ("delta_mean", "delta_max", "ratio_min", "ratio_mean",
                                                  "ratio_max")], dtype=torch.float32, device=device)
        gathered = self.accelerator.gather(local[None]).view(-1, 5)
        metrics = self._metrics["train"]
        metrics["sampling/sampling_logp_difference/mean"].append(gathered[:, 0].mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gathered[:, 1].max().item())
        metrics["sampling/importance_sampling_ratio/min"].append(nanmin(gathered[:, 2]).item())
        metrics["sampling/importance_sampling_ratio/mean"].append(gathered[:, 3].nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(nanmax(gathered[:, 4]).item())
