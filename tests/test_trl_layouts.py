"""TRL's colocated layout (benchmarks/trl_layouts.py colocate), the baseline the one-GPU stack is measured against:
vLLM inside the trainer process and real TRL pushing the merged weights into it before each round, on the CPU
(without sleep mode, which vLLM's CPU build lacks)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, SERVER_PYTHON, free_port, trainer_env
from test_training_server import metrics

pytestmark = pytest.mark.server


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
    assert "step 3/3" in log and "rollouts of merged into the weights" in log
