"""The trainer as two data-parallel ranks (gloo on CPU), started by the container's launcher, against a real vLLM
server: the same loss and gradients as one process, one adapter version per step, resume after kill -9, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LAUNCHER_TIMEOUT, REPO, finish, kill_all, start_launcher, start_server, trainer_env, wait_for

pytestmark = pytest.mark.server

LAUNCHER = REPO / "trainer/launch.py"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adam_moments(checkpoint: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """AdamW's first and second moments after the checkpoint's step; after one step they are 0.1 g and 0.001 g**2
    of the LoRA gradient g (clipped at max_grad_norm), in the parameters' order."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    return [(state[i]["exp_avg"], state[i]["exp_avg_sq"]) for i in sorted(state)]


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest elementwise difference, relative to the reference's largest element (0 when both are all zero)."""
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def ranks_env(tiny_model: Path, runs: Path, port: int, processes: int, **overrides) -> dict:
    # ATTN_IMPLEMENTATION at its default, auto: the launcher resolves it (eager on the CPU) for every rank
    return trainer_env(tiny_model, runs, port, TRAINER_PROCESSES=processes, **{"ATTN_IMPLEMENTATION": "auto", **overrides})


# ---------------------------------------------------------------------------------------- settings, no server
def test_launcher_rejects_bad_process_settings_once(tiny_model, tmp_path):
    env = ranks_env(tiny_model, tmp_path, 9, 3)  # 8 micro-steps cannot be shared by 3 processes
    result = subprocess.run([sys.executable, str(LAUNCHER)], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("GRADIENT_ACCUMULATION_STEPS=8") == 1, result.stderr
    assert "multiple of 3" in result.stderr


@pytest.mark.parametrize("gpus, requested, expected", [(0, 0, 1), (0, 2, 2), (2, 0, 2), (8, 0, 8), (8, 4, 4)])
def test_processes_per_node(monkeypatch, gpus, requested, expected):
    """TRAINER_PROCESSES=0 (the default): one per visible GPU, one without GPU; a number is taken as given."""
    from trainer.launch import processes_per_node
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert processes_per_node(requested) == expected


def test_more_processes_than_gpus_names_the_setting(monkeypatch):
    from trainer.config import SettingsError
    from trainer.launch import processes_per_node
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingsError, match="TRAINER_PROCESSES=3 but 2 GPUs are visible"):
        processes_per_node(3)


# ---------------------------------------------------------------------------------------- one rank vs two
@pytest.fixture(scope="module")
def one_and_two_ranks(tiny_model, tmp_path_factory):
    """The same two steps with 1 and with 2 processes, each against a fresh server: vLLM seeds its sampler at
    start (seed 0), so the same requests get the same completions and the first step trains on the same data."""
    runs = {}
    for processes in (1, 2):
        base = tmp_path_factory.mktemp(f"ranks{processes}")
        server = start_server(tiny_model, base / "vllm.log")
        try:
            env = ranks_env(tiny_model, base / "runs", server.port, processes, MAX_STEPS=2, EVAL_STEPS=1,
                            SAMPLES_STEPS=1)
            process = start_launcher(env, base / "stdout.log")
            stdout = finish(process, base / "stdout.log")
            assert process.returncode == 0, stdout[-4000:]
        finally:
            server.stop()
        runs[processes] = (base / "runs/test-run", stdout, server.log())
    return runs


def test_two_ranks_train_the_first_step_as_one_process(one_and_two_ranks):
    (one, _, _), (two, stdout, _) = one_and_two_ranks[1], one_and_two_ranks[2]
    first_one, first_two = metrics(one)[0], metrics(two)[0]
    # the same completions: the data are the same
    assert first_two["completions/mean_length"] == first_one["completions/mean_length"]
    assert first_two["reward"] == pytest.approx(first_one["reward"], abs=1e-6)
    # GRPO's loss at the step's start is the mean of advantages that sum to zero per group: rounding-sized in both
    # runs (measured 2.6e-7 and 2.4e-7), so it is compared absolutely; the gradients carry the information
    assert abs(first_two["loss"] - first_one["loss"]) < 1e-6
    # float32 on CPU; two ranks add their micro-steps' gradients in another order (two halves, averaged by an
    # all-reduce). Measured: grad_norm 1.3e-7 apart (relative), Adam's moments at most 2.2e-6 of each tensor's
    # largest element after step 1 and after step 2 (where lora_A's gradients are no longer zero). 2e-5 leaves 10x
    # room for rounding and still fails a gradient that is not the mean over all 8 sequences (off by tens of percent).
    assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=2e-5)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        moments_one, moments_two = adam_moments(one / checkpoint), adam_moments(two / checkpoint)
        assert len(moments_two) == len(moments_one) == 16  # q, k, v, o of 2 layers, A and B each
        for (m1, v1), (m2, v2) in zip(moments_one, moments_two):
            assert relative_difference(m2, m1) < 2e-5, checkpoint
            assert relative_difference(v2, v1) < 2e-5, checkpoint
    # ATTN_IMPLEMENTATION=auto, resolved by the launcher: the resolved settings name the kernel the ranks use
    assert "\nATTN_IMPLEMENTATION=eager\n" in stdout and "ATTN_IMPLEMENTATION=auto" not in stdout
    # each rank logs its own micro-steps: 4 of the step's 8
    for rank in (0, 1):
        for micro in range(1, 5):
            assert f"rank {rank}: micro-step {micro}/4 of step 1: 1 seq," in stdout


def test_two_ranks_register_one_adapter_version_per_step(one_and_two_ranks):
    run_dir, _, server_log = one_and_two_ranks[2]
    assert [r["adapter"] for r in metrics(run_dir)] == ["policy-v0", "policy-v1"]
    for name in ("policy-vprobe", "policy-v0", "policy-v1", "policy-v2", "test-run"):
        assert server_log.count(f"Loaded new LoRA adapter: name '{name}'") == 1, name
    memory = [json.loads(line) for line in (run_dir / "memory.jsonl").read_text().splitlines()]
    assert sorted({(r["step"], r["rank"]) for r in memory}) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert {"memory/peak_gib/rank0.cpu_max_rss", "memory/peak_gib/rank1.cpu_max_rss"} <= metrics(run_dir)[0].keys()


# ---------------------------------------------------------------------------------------- faults
def start_two_ranks(port: int, tiny_model: Path, tmp_path: Path, **settings):
    """Two ranks launched as the container does; their run directory and stdout."""
    env = ranks_env(tiny_model, tmp_path, port, 2, EVAL_STEPS=0, **settings)
    run_dir, log_path = tmp_path / "test-run", tmp_path / "stdout.log"
    return start_launcher(env, log_path), env, run_dir, log_path


def test_two_ranks_resume_after_kill_9(vllm_server, tiny_model, tmp_path):
    process, env, run_dir, log_path = start_two_ranks(vllm_server.port, tiny_model, tmp_path, MAX_STEPS=3,
                                                      SAVE_STEPS=1)
    try:
        wait_for(lambda: (run_dir / "checkpoint-1/COMPLETE").exists(), LAUNCHER_TIMEOUT, "checkpoint-1")
    finally:
        kill_all(process)  # as `docker kill`: every process at once, no chance to save
    done = [r["step"] for r in metrics(run_dir)]
    assert done and done[-1] < 3, "killed too late to test a resume"

    process = start_launcher(env, log_path)
    stdout = finish(process, log_path)
    assert process.returncode == 0, stdout[-4000:]
    for rank in (0, 1):  # both from the newest checkpoint the killed run completed
        assert f"rank {rank}: resuming from {run_dir}/checkpoint-{done[-1]}" in stdout
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == done + list(range(done[-1] + 1, 4)), steps
    assert (run_dir / "final_adapter/adapter_model.safetensors").exists()


def test_sigterm_stops_every_rank_at_the_same_step_with_one_checkpoint(vllm_server, tiny_model, tmp_path):
    process, _, run_dir, log_path = start_two_ranks(vllm_server.port, tiny_model, tmp_path, MAX_STEPS=200,
                                                    SAVE_STEPS=1000)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists(), LAUNCHER_TIMEOUT, "the first step")
        process.send_signal(signal.SIGTERM)  # as `docker compose down`: to the container's command
        stdout = finish(process, log_path)
    finally:
        if process.poll() is None:
            kill_all(process)
    assert process.returncode == 0, stdout[-4000:]
    stopped = {rank: [line for line in stdout.splitlines() if f"rank {rank}: stopped at step" in line]
               for rank in (0, 1)}
    assert len(stopped[0]) == len(stopped[1]) == 1, stopped
    step = int(stopped[0][0].split("stopped at step ")[1].split(";")[0])
    assert f"stopped at step {step};" in stopped[1][0]
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{step}"]
    assert {"COMPLETE", "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (run_dir / checkpoints[0]).iterdir()}


def test_two_ranks_train_on_rounds_sampled_ahead(vllm_server, tiny_model, tmp_path):
    """With MAX_OFF_POLICY_STEPS=1, rank 0 samples every rank's next round while both train on the current one."""
    env = ranks_env(tiny_model, tmp_path, vllm_server.port, 2, MAX_STEPS=3, EVAL_STEPS=0, MAX_OFF_POLICY_STEPS=1)
    log_path = tmp_path / "stdout.log"
    process = start_launcher(env, log_path)
    stdout = finish(process, log_path)
    assert process.returncode == 0, stdout[-4000:]
    rows = metrics(tmp_path / "test-run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["rollouts/sampled_ahead"] for r in rows] == [0, 1, 1]
    assert [r["rollouts/staleness"] for r in rows] == [0, 1, 1]
