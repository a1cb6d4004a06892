"""Overlapped generation (MAX_OFF_POLICY_STEPS > 0) against the real vLLM server: each step trains on rollouts whose
declared adapter version is at most the bound behind, the declared version is the one that sampled them, and the
faults of a long run (a server restart while a round is sampled ahead, kill -9, SIGTERM) lose or repeat no step."""

from __future__ import annotations

import signal

import pytest

from conftest import free_port, run_trainer, start_server, start_trainer, trainer_env, wait_for
from fault_proxy import FaultProxy
from test_training_server import metrics

pytestmark = pytest.mark.server

OVERLAP = dict(MAX_OFF_POLICY_STEPS=1)


@pytest.fixture(scope="module")
def overlapped_run(vllm_server, tiny_model, tmp_path_factory):
    """Four steps, evaluated every two; the rounds sampled ahead reach the server 2 s late, after the trainer has
    registered the next adapter version: the version they name must still be registered then."""
    runs = tmp_path_factory.mktemp("overlap")
    rounds = []

    def delay_rounds_sampled_ahead(path, attempt, body):
        if path == "/v1/completions" and body.get("n") == 4:
            rounds.append(body["model"])
            return 2.0 if len(rounds) > 1 else None
        return None

    with FaultProxy(vllm_server.url, delay_rounds_sampled_ahead) as proxy:
        env = trainer_env(tiny_model, runs, proxy.port, MAX_STEPS=4, EVAL_STEPS=2, **OVERLAP)
        result = run_trainer(env, runs / "stdout.log")
    assert result.returncode == 0, result.stdout[-4000:]
    return runs / "test-run"


def test_each_step_trains_on_rollouts_at_most_the_bound_behind(overlapped_run):
    rows = metrics(overlapped_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # step 1 has nothing sampled ahead; from step 2 on each round was sampled while the step before trained
    assert [r["rollouts/sampled_ahead"] for r in rows] == [0, 1, 1, 1]
    assert [r["adapter"] for r in rows] == ["policy-v0", "policy-v0", "policy-v1", "policy-v2"]
    assert [r["rollouts/staleness"] for r in rows] == [0, 1, 1, 1]
    log = (overlapped_run / "training.log").read_text()
    assert "step 3/4 |" in log and "rollouts of policy-v1, 1 step behind" in log
    assert "max_off_policy_steps=1 (the next round is sampled while a step trains)" in log


def test_a_version_in_use_stays_registered_until_its_round_is_sampled(overlapped_run):
    log = (overlapped_run / "training.log").read_text()
    assert "does not know the adapter" not in log, "an adapter version was unloaded under a request naming it"
    assert all(r["server/recoveries"] == 0 for r in metrics(overlapped_run))


def test_rollouts_sampled_ahead_come_from_the_declared_older_adapter(overlapped_run):
    """vLLM's logprobs of the sampled tokens equal the trainer's only for the weights that sampled them: zero gap
    at step 1 (on-policy), a clear gap when a step trains the adapter one version past the one declared."""
    rows = metrics(overlapped_run)
    assert rows[0]["sampling/sampling_logp_difference/mean"] < 1e-4
    assert all(r["sampling/sampling_logp_difference/mean"] > 1e-3 for r in rows[1:])


def test_overlapped_steps_wait_less_than_the_sampling_took(overlapped_run):
    for r in metrics(overlapped_run)[1:]:
        assert r["time/rollout_wait_s"] < r["time/generation_s"], f"step {r['step']} waited for all of its sampling"


def test_steps_sharing_a_round_sample_the_next_one_the_bound_before_it_is_due(vllm_server, tiny_model, tmp_path):
    """GENERATION_BATCH_SIZE of two steps' sequences: one round per two steps (TRL's generation batch); the next
    round starts sampling at the start of the step before it is due, with that step's adapter."""
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_STEPS=4, GENERATION_BATCH_SIZE=16, **OVERLAP)
    result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-4000:]
    rows = metrics(tmp_path / "test-run")
    assert [r["rollouts/adapter_version"] for r in rows] == [0, 0, 1, 1]
    assert [r["rollouts/sampled_ahead"] for r in rows] == [0, 0, 1, 1]
    # a round's first step is at most the bound behind; its second step one more, as in TRL's generation batches
    assert [r["rollouts/staleness"] for r in rows] == [0, 1, 1, 2]
    assert "sequences_per_round=16 (2 step(s) each)" in result.stdout


def test_server_restart_while_a_round_is_sampled_ahead(tiny_model, tmp_path):
    """vLLM killed (SIGKILL) and started again while the background request for step 2's round is in flight: that
    request waits for /health, registers its adapter version again and is made once more; nothing is lost."""
    port = free_port()
    servers = [start_server(tiny_model, tmp_path / "vllm-0.log", port=port)]
    generation_requests = []

    def plan(path, attempt, body):
        if path == "/v1/completions" and body.get("n") == 4:
            generation_requests.append(body["model"])
            if len(generation_requests) == 2:  # step 1's round is sampled in the step; step 2's ahead
                servers[-1].stop(signal.SIGKILL)
                servers.append(start_server(tiny_model, tmp_path / "vllm-1.log", port=port, wait=False))
        return None

    try:
        with FaultProxy(f"http://127.0.0.1:{port}", plan) as proxy:
            env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=3, VLLM_MAX_RETRIES=2,
                              VLLM_RETRY_MAX_WAIT=0.2, VLLM_WAIT_TIMEOUT=300, **OVERLAP)
            result = run_trainer(env, tmp_path / "stdout.log")
    finally:
        for server in servers:
            server.stop()
    assert len(servers) == 2, "the server was not restarted"
    assert result.returncode == 0, result.stdout[-4000:]
    run_dir = tmp_path / "test-run"
    log = (run_dir / "training.log").read_text()
    assert "generation interrupted" in log
    assert "vLLM server came back without adapter policy-v0 (it restarted); registering it again" in log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3], "a step was lost or repeated"
    assert [r["rollouts/staleness"] for r in rows] == [0, 1, 1]
    assert rows[1]["adapter"] == "policy-v0" and rows[1]["rollouts/sampled_ahead"] == 1
    for step in (1, 2, 3):
        assert (run_dir / f"checkpoint-{step}" / "COMPLETE").is_file(), f"checkpoint of step {step} missing"


def test_kill_and_sigterm_lose_or_repeat_no_step(vllm_server, tiny_model, tmp_path):
    """Killed (SIGKILL) after checkpoint 2, resumed, stopped by SIGTERM, resumed to the end: each process goes on
    right after the checkpoint it resumed from, and its first step samples its round anew (the round the previous
    process sampled ahead died with it, untrained)."""
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_STEPS=6, SAVE_STEPS=1, **OVERLAP)
    run_dir = tmp_path / "test-run"

    def newest_checkpoint() -> int:
        return max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "COMPLETE").exists())

    first = start_trainer(env, tmp_path / "first.log")
    wait_for(lambda: (run_dir / "checkpoint-2" / "COMPLETE").exists(), 300, "checkpoint-2")
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = newest_checkpoint()
    rows_before = len(metrics(run_dir))

    second = start_trainer(env, tmp_path / "second.log")
    wait_for(lambda: len(metrics(run_dir)) > rows_before, 300, "a step after the resume")
    second.send_signal(signal.SIGTERM)
    assert second.wait(120) == 0
    stopped_at = newest_checkpoint()
    rows_stopped = len(metrics(run_dir))

    result = run_trainer(env, tmp_path / "third.log")
    assert result.returncode == 0, result.stdout[-4000:]
    rows = metrics(run_dir)
    second_rows, third_rows = rows[rows_before:rows_stopped], rows[rows_stopped:]
    assert [r["step"] for r in second_rows] == list(range(killed_at + 1, stopped_at + 1))
    assert [r["step"] for r in third_rows] == list(range(stopped_at + 1, 7))
    for resumed in (second_rows, third_rows):
        assert resumed[0]["rollouts/sampled_ahead"] == 0 and resumed[0]["rollouts/staleness"] == 0
    assert all(r["rollouts/staleness"] <= 1 for r in rows)
    log = (run_dir / "training.log").read_text()
    assert f"resuming from {run_dir / f'checkpoint-{killed_at}'}" in log
    assert f"resuming from {run_dir / f'checkpoint-{stopped_at}'}" in log
