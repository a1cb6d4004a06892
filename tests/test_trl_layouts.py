"""TRL's colocated layout (benchmarks/trl_layouts.py colocate), the baseline the one-GPU stack is measured against:
vLLM inside the trainer process and real TRL pushing the merged weights into it before each round, on the CPU
(without sleep mode, which vLLM's CPU build lacks); and how its step line splits the time when vLLM sleeps."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import REPO, SERVER_PYTHON, free_port, trainer_env
from test_training_server import metrics

sys.path.insert(0, str(REPO / "benchmarks"))
from trl_layouts import TimedGeneration  # noqa: E402


@pytest.mark.server
def test_trl_colocated_layout_trains_and_samples_from_the_weights_it_trained(tiny_model, tmp_path):
    # a learning rate this high moves the policy far in one step: sampling from stale weights would show at once
    env = trainer_env(tiny_model, tmp_path / "runs", free_port(), RUN_NAME="colocate", MAX_STEPS=3, SAVE_STEPS=100,
                      LEARNING_RATE=0.3, REWARD_FUNCS="tests.rewards.known_word_fraction", REPORT_TO="none",
                      VLLM_TENSOR_PARALLEL_SIZE=1, VLLM_MAX_MODEL_LEN=512, VLLM_CPU_KVCACHE_SPACE=1)
    result = subprocess.run([str(SERVER_PYTHON), str(REPO / "tests/keep_vllm_cpu_weights.py"),
                             str(REPO / "benchmarks/trl_layouts.py"), "colocate", "--no-sleep"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run = tmp_path / "runs" / "colocate"
    log = (run / "training.log").read_text()
    assert "Generation config: use_vllm=True, vllm_mode=colocate" in log
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["tokens/generated"] > 0 and r["time/sync_s"] > 0 and r["time/train_s"] > 0, r
        # vLLM samples in bfloat16 here (TRL asks for the checkpoint's dtype, which vLLM narrows from float32):
        # within that of the trainer's float32 logprobs. Without the push the gap was 1.5 nats from step 2 on.
        assert r["sampling/sampling_logp_difference/mean"] < 0.1, r
    assert any(r["reward_std"] > 0 for r in records), "no reward spread: nothing was learned to push"
    assert "step 3/3" in log and "rollouts of merged weights" in log


class SleepingColocatedVLLM:
    """What TRL 1.16's VLLMGeneration does around sampling in colocate mode with sleep mode on
    (vllm_generation.py), each part taking a known time: sleep mode does not run on the CPU."""

    def __init__(self):
        outer = self

        class LLM:
            def sleep(self, level=1):
                time.sleep(0.10)

            def wake_up(self, tags=None):
                time.sleep(0.15)

        self.llm = LLM()

        def sync_weights():  # TRL's: wakes the weights, then pushes them
            outer.llm.wake_up(tags=["weights"])
            time.sleep(0.20)

        self.sync_weights = sync_weights

    def generate(self, prompts, images, num_generations, profiler=None):
        self.sync_weights()  # asleep since the last round: the weights were dropped
        self.llm.wake_up(tags=["kv_cache"])
        time.sleep(0.30)  # sampling
        self.llm.sleep(level=2)
        return [[1, 2]] * len(prompts), [[3, 4, 5]] * len(prompts)


def test_a_sleeping_colocated_vllm_s_weight_moves_count_as_sync_not_sampling():
    generation = TimedGeneration(SleepingColocatedVLLM(), steps_done=lambda: 4)
    generation.generate(["a", "b"], None, 1)
    timings = generation.take_timings()
    assert 0.30 <= timings.generation_seconds < 0.45, timings  # the sampling alone (with the rest: 0.90)
    assert timings.rollout_wait_seconds == timings.generation_seconds
    # the push, both wake-ups and the sleep, each once (0.60; the wake-up inside the push twice: 0.75)
    assert 0.60 <= timings.sync_seconds < 0.70, timings
    assert (timings.completion_tokens, timings.prompt_tokens) == (6, 4)
    assert (timings.adapter, timings.adapter_version) == ("merged weights", 4)
    # a later step that trains on the same round (GENERATION_BATCH_SIZE over several steps) names the same policy
    later = generation.take_timings()
    assert (later.adapter, later.adapter_version, later.generation_seconds) == ("merged weights", 4, 0.0)
