"""What a run tells its user: `training.log` and stdout (one readable line per step), `metrics.jsonl` (every metric)
and `samples.jsonl` (completions with their rewards).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from .memory import MicroStepMemory
from .metrics import StepMetrics
from .ranks import Ranks
from .rollouts import staleness

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class BarAwareHandler(logging.Handler):
    """Writes log lines to stdout on lines of their own: tqdm clears its progress bar first, then redraws it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a failed log line must never stop training
            self.handleError(record)


def setup_logging(run_dir: Path, rank: int = 0, world_size: int = 1) -> None:
    """Log to stdout (for `docker compose logs trainer`) and append to run_dir/training.log (kept across restarts);
    with several trainer processes, rank 0 writes training.log and every rank's lines on stdout carry its rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = logging.Formatter(LOG_FORMAT if world_size == 1 else LOG_FORMAT.replace(
        "%(name)s", f"%(name)s rank {rank}"))
    handlers = [BarAwareHandler()] + ([logging.FileHandler(run_dir / "training.log")] if rank == 0 else [])
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "backoff"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class QuietProgress(ProgressCallback):
    """TRL's progress bar without its per-step dict dump (RunLogger prints a readable line instead)."""
    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# bf16 alone moves a well-conditioned gpt-oss-20b's logprobs by a small fraction of this per token (BENCHMARKS.md,
# "Do vLLM and the trainer compute the same policy?"); a gap above it means vLLM and the trainer compute different
# functions, and TRL's importance-sampling correction then weights the tokens near 0.
LOGP_GAP_WARNING_NATS = 1.0
# Token-level weights stay near 1 at such gaps; per-completion weights (IMPORTANCE_SAMPLING=sequence_*) multiply the
# small per-token gaps and fall toward 0 on long completions (BENCHMARKS.md): the gradient shrinks as much.
IMPORTANCE_WEIGHT_WARNING = 0.5


class RunLogger(TrainerCallback):
    """Per step: one human line (stdout + training.log) and one JSON line in metrics.jsonl."""

    def __init__(self, run_dir: Path, generation, memory: MicroStepMemory, extra_counters, metrics: StepMetrics,
                 ranks: Ranks = Ranks()):
        self.ranks = ranks  # on every rank, to gather their memory peaks; rank 0 writes
        self.metrics_path = run_dir / "metrics.jsonl"
        self.generation = generation
        self.memory = memory
        self.extra_counters = extra_counters
        self.metrics = metrics  # what other callbacks computed for this step (evaluation)
        self.step_started = None
        self.run_started = None
        self.first_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.run_started = time.time()
        self.first_step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.step_started is None:
            self.step_started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The end-of-training summary is no step. A step that trains on a round sampled for an earlier step (several
        # steps per round) has the trainer's metrics but none of TRL's sampling metrics (rewards, lengths).
        if not logs or "train_runtime" in logs:
            return
        memory_peaks = {device: gib for peaks in self.ranks.gather(self.memory.take_step_peak())
                        for device, gib in peaks.items()}
        if not self.ranks.is_main:
            return
        step_seconds = time.perf_counter() - self.step_started if self.step_started else float("nan")
        self.step_started = None
        timings = self.generation.take_timings()
        eval_seconds = self.metrics.get("eval/seconds", 0.0)
        # Rollouts sampled ahead cost the step only the wait for them; sampled in the step, the wait is the sampling.
        train_seconds = max(step_seconds - timings.rollout_wait_seconds - timings.sync_seconds - eval_seconds, 1e-9)
        record = {"step": state.global_step, "max_steps": state.max_steps, "time": time.time(), **logs,
                  "adapter": timings.adapter,
                  # the step numbered k trains the policy of version k - 1 (the steps taken before it)
                  "rollouts/adapter_version": timings.adapter_version,
                  "rollouts/staleness": staleness(state.global_step - 1, timings.adapter_version),
                  "rollouts/sampled_ahead": int(timings.overlapped),
                  "time/step_s": step_seconds, "time/generation_s": timings.generation_seconds,
                  "time/rollout_wait_s": timings.rollout_wait_seconds,
                  "time/sync_s": timings.sync_seconds, "time/train_s": train_seconds, "time/eval_s": eval_seconds,
                  "tokens/generated": timings.completion_tokens,
                  "tokens/generation_per_s": timings.completion_tokens / max(timings.generation_seconds, 1e-9),
                  "tokens/train_per_s": (timings.completion_tokens + timings.prompt_tokens) / train_seconds,
                  "server/recoveries": timings.recoveries,
                  **{f"memory/peak_gib/{d}": g for d, g in memory_peaks.items()},
                  **self.extra_counters(), **self.metrics.take()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
        log.info(self.format_line(record, state))
        gap = record.get("sampling/sampling_logp_difference/mean", 0.0)
        if gap > LOGP_GAP_WARNING_NATS:
            log.warning("vLLM's and the trainer's logprobs of the sampled tokens differ by %.2f nats on average "
                        "(expected below %.1f): the importance-sampling correction gives them almost no weight, so "
                        "this step learned little. Check that both services load the same MODEL_NAME; see README, "
                        "Troubleshooting", gap, LOGP_GAP_WARNING_NATS)
        weight = record.get("sampling/importance_sampling_ratio/mean", 1.0)
        if gap <= LOGP_GAP_WARNING_NATS and weight < IMPORTANCE_WEIGHT_WARNING:
            log.warning("importance-sampling weights average %.3g though vLLM's and the trainer's logprobs agree "
                        "(gap %.2f nats): this step's gradient shrank about as much. Per-completion weights "
                        "(IMPORTANCE_SAMPLING=sequence_*) do this on long completions; use token_truncate",
                        weight, gap)

    def format_line(self, r: dict, state) -> str:
        done = state.global_step - self.first_step
        elapsed = time.time() - self.run_started
        eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        memory = "/".join(f"{v:.1f}" for k, v in r.items() if k.startswith("memory/peak_gib/"))
        return (f"step {r['step']}/{r['max_steps']} | eta {_fmt_seconds(eta) if math.isfinite(eta) else '?'} | "
                f"reward {format_reward(r.get('reward', float('nan')))} ± {format_reward(r.get('reward_std', float('nan')))} | "
                f"clipped {r.get('completions/clipped_ratio', float('nan')):.2f} | "
                f"len {r.get('completions/mean_length', float('nan')):.0f} | "
                + (f"no final {r['completions/no_final_ratio']:.2f}, malformed {r['completions/malformed_ratio']:.2f} | "
                   if "completions/no_final_ratio" in r else "") +
                f"gen {r['time/generation_s']:.1f}s{' ahead' if r['rollouts/sampled_ahead'] else ''} "
                f"wait {r['time/rollout_wait_s']:.1f}s sync {r['time/sync_s']:.2f}s train {r['time/train_s']:.1f}s | "
                f"{r['tokens/generation_per_s']:.0f} gen tok/s, {r['tokens/train_per_s']:.0f} train tok/s | "
                f"logp gap {r.get('sampling/sampling_logp_difference/mean', float('nan')):.1e}, "
                f"IS weight {r.get('sampling/importance_sampling_ratio/mean', float('nan')):.2f} | "
                f"peak {memory} GiB | rollouts of {r['adapter']}, "
                f"{r['rollouts/staleness']} step{'' if r['rollouts/staleness'] == 1 else 's'} behind")


def format_reward(value: float) -> str:
    """Three decimals, or two significant digits when smaller (0.00017 must not read as 0.000 and a failed run)."""
    return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


class SampleWriter(TrainerCallback):
    """Every N steps, a few of the step's completions with their rewards and advantage, to samples.jsonl."""

    def __init__(self, metrics: StepMetrics, run_dir: Path, every: int, count: int):
        self.metrics = metrics
        self.path = run_dir / "samples.jsonl"
        self.every = every
        self.count = count

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every:
            return
        samples = self.metrics.samples(self.count)
        with open(self.path, "a") as f:
            for sample in samples:
                f.write(json.dumps({"step": state.global_step, **sample}, default=_json_default) + "\n")
        first = samples[0]["completion"] if samples else ""
        text = first[-1]["content"] if isinstance(first, list) else first
        log.info("sample at step %d: %r", state.global_step, text[:300])
