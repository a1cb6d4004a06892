"""Faults a multi-day run meets, each caused for real where it can be (a killed server, a killed trainer, a
corrupted checkpoint) and injected through a proxy where it cannot (a storm of 5xx answers, a stalled server)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, run_trainer, start_server, start_trainer, trainer_env, wait_for
from fault_proxy import CUT, FaultProxy
from test_training_server import metrics

pytestmark = pytest.mark.server


def test_warm_up_503s_are_waited_out(vllm_server, tiny_model, tmp_path):
    def plan(path, attempt, body):  # a server still loading: /health and the API answer 503 for a while
        if path == "/health" and attempt <= 3:
            return 503
        if path == "/v1/completions" and attempt <= 2:
            return 503
        return None

    with FaultProxy(vllm_server.url, plan) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=1, VLLM_RETRY_MAX_WAIT=0.5)
        result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-3000:]
    assert proxy.faults[503] == 5
    log = (tmp_path / "test-run" / "training.log").read_text()
    assert "waiting for vLLM server" in log and "answered HTTP 503; retry" in log
    assert [r["step"] for r in metrics(tmp_path / "test-run")] == [1]


def test_storm_of_5xx_ends_in_a_clear_error_naming_the_server(vllm_server, tiny_model, tmp_path):
    statuses = [500, 502, 503, 504]
    with FaultProxy(vllm_server.url, lambda path, n, body: statuses[n % 4] if path == "/v1/completions" else None) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=2, VLLM_MAX_RETRIES=3, VLLM_RETRY_MAX_WAIT=0.2)
        started = time.monotonic()
        result = run_trainer(env, tmp_path / "stdout.log", timeout=300)
    assert result.returncode == 1
    assert time.monotonic() - started < 120, "retries must be bounded"
    assert f"vLLM server at http://127.0.0.1:{proxy.port} is unavailable" in result.stdout
    assert proxy.requests["/v1/completions"] == 6  # 3 attempts, a health wait, 3 attempts again
    assert not list((tmp_path / "test-run").glob("checkpoint-*")), "no step may be recorded as done"


def test_backoff_waits_differ_between_processes():
    """Training seeds Python's `random` with SEED: jitter drawn from it would be the same in every run, and the
    retries of several clients of one server would stay in step."""
    draw = ("import random; from trainer.vllm_client import full_jitter; random.seed(42); "
            "print([round(full_jitter(30), 6) for _ in range(5)])")
    runs = {subprocess.run([sys.executable, "-c", draw], capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}).stdout for _ in range(2)}
    assert len(runs) == 2


def test_stalled_server_times_out_and_is_retried(vllm_server, tiny_model, tmp_path):
    with FaultProxy(vllm_server.url, lambda path, n, body: 3.0 if path == "/v1/completions" and n == 1 else None) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=1, VLLM_REQUEST_TIMEOUT=1,
                          VLLM_RETRY_MAX_WAIT=0.2)
        result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-3000:]
    assert proxy.faults["stall"] == 1 and "timed out" in result.stdout


def test_answer_broken_off_mid_way_is_retried(vllm_server, tiny_model, tmp_path):
    # a server killed while it answers: the headers arrive, the body stops halfway
    with FaultProxy(vllm_server.url, lambda path, n, body: CUT if path == "/v1/completions" and n == 1 else None) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=1, VLLM_RETRY_MAX_WAIT=0.2)
        result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-3000:]
    assert proxy.faults[CUT] == 1 and "broke mid-answer; retry 1" in result.stdout
    assert [r["step"] for r in metrics(tmp_path / "test-run")] == [1]


# The trainer's requests, by phase (MAX_STEPS=3, EVAL_STEPS=2, NUM_GENERATIONS=4 below): the start-up probe asks
# for the served model and registers a probe adapter; each step registers its adapter version and samples the
# groups (n=4); evaluation after step 2 samples one completion per held-out prompt (n=1).
def phase_of(path: str, body: dict) -> str | None:
    if path == "/v1/models":
        return "probe: served model"
    if path == "/v1/load_lora_adapter":
        return {"policy-vprobe": "probe: adapter", "policy-v1": "registration"}.get(body.get("lora_name"))
    if path == "/v1/completions":
        return {4: "generation", 1: "evaluation"}.get(body.get("n"))
    return None


# What the trainer logs when a fault interrupts each phase (ServerRecovery's warning).
INTERRUPTED = {"probe: served model": "start-up probe (served model) interrupted",
               "probe: adapter": "start-up probe (adapter registration) interrupted",
               "registration": "registering adapter version 1 interrupted",
               "evaluation": "evaluation interrupted", "generation": "generation interrupted"}


def faults_in_every_phase(phases: list[str], fault, after: dict[str, int]):
    """A proxy plan that calls `fault(phase)` on the request of each phase numbered `after[phase]` (default: the
    first), once, then forwards that request."""
    seen, done = {}, []

    def plan(path, attempt, body):
        phase = phase_of(path, body)
        if phase in phases and phase not in done:
            seen[phase] = seen.get(phase, 0) + 1
            if seen[phase] == after.get(phase, 1):
                done.append(phase)
                return fault(phase)
        return None

    return plan, done


def assert_nothing_lost(run_dir, log: str, phases: list[str]) -> None:
    for phase in phases:
        assert INTERRUPTED[phase] in log, f"no recovery logged for the fault during {phase}"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3], "a step was lost or repeated"
    assert "eval/reward" in rows[1], "the evaluation of step 2 was lost"
    for step in (1, 2, 3):
        assert (run_dir / f"checkpoint-{step}" / "COMPLETE").is_file(), f"checkpoint of step {step} missing"
    for r in rows:
        assert r["sampling/sampling_logp_difference/mean"] < 1e-4, "after a fault vLLM sampled other weights"


# generation is faulted on its third request (step 3), after the evaluation's fault at the end of step 2
GENERATION_AT_STEP_3 = {"generation": 3}
PHASE_ENV = dict(MAX_STEPS=3, EVAL_STEPS=2, SAVE_STEPS=1, VLLM_MAX_RETRIES=2, VLLM_RETRY_MAX_WAIT=0.2,
                 VLLM_WAIT_TIMEOUT=300)


def test_server_restart_in_every_phase_is_waited_out(tiny_model, tmp_path):
    """vLLM killed (SIGKILL) and started again on its port while the trainer's request of each phase is in
    flight: the trainer waits for /health, registers its adapter again and goes on."""
    port = free_port()
    servers = [start_server(tiny_model, tmp_path / "vllm-0.log", port=port)]
    phases = ["probe: served model", "registration", "evaluation", "generation"]

    def restart(phase):
        servers[-1].stop(signal.SIGKILL)
        servers.append(start_server(tiny_model, tmp_path / f"vllm-{len(servers)}.log", port=port, wait=False))
        return None  # forward to the dead port: the trainer sees its connection closed

    plan, restarted = faults_in_every_phase(phases, restart, GENERATION_AT_STEP_3)
    try:
        with FaultProxy(f"http://127.0.0.1:{port}", plan) as proxy:
            env = trainer_env(tiny_model, tmp_path, proxy.port, **PHASE_ENV)
            result = run_trainer(env, tmp_path / "stdout.log")
    finally:
        for server in servers:
            server.stop()
    assert restarted == phases
    assert result.returncode == 0, result.stdout[-3000:]
    run_dir = tmp_path / "test-run"
    log = (run_dir / "training.log").read_text()
    assert_nothing_lost(run_dir, log, phases)
    assert log.count("came back without adapter policy-v2 (it restarted); registering it again") == 2  # eval, gen
    assert "Loaded new LoRA adapter" in servers[-1].log()


def test_storm_of_503_in_every_phase_is_waited_out(vllm_server, tiny_model, tmp_path):
    """From the request of each phase on, every request, /health included, answers 503 for longer than the
    retries last: the trainer waits for /health and goes on; it does not take the storm for a restart."""
    phases = list(INTERRUPTED)
    storm = {"until": 0.0}

    def start_storm(phase):
        storm["until"] = time.monotonic() + 3
        return 503

    plan, stormed = faults_in_every_phase(phases, start_storm, GENERATION_AT_STEP_3)

    def plan_with_storm(path, attempt, body):
        status = plan(path, attempt, body)
        return status or (503 if time.monotonic() < storm["until"] else None)

    with FaultProxy(vllm_server.url, plan_with_storm) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, **PHASE_ENV)
        result = run_trainer(env, tmp_path / "stdout.log")
    assert stormed == phases
    assert result.returncode == 0, result.stdout[-3000:]
    run_dir = tmp_path / "test-run"
    log = (run_dir / "training.log").read_text()
    assert_nothing_lost(run_dir, log, phases)
    assert "still has adapter policy-v2: it was unavailable, not restarted" in log  # after eval's and gen's storms
    assert "it restarted" not in log and "did it restart" not in log


def test_server_down_for_good_during_evaluation_keeps_the_step(vllm_server, tiny_model, tmp_path):
    """A permanent outage that starts at the evaluation after step 2: the trainer gives up after its retries and
    VLLM_WAIT_TIMEOUT, but step 2, trained before the evaluation, is recorded and checkpointed first."""
    down = {"on": False}

    def plan(path, attempt, body):
        if phase_of(path, body) == "evaluation":
            down["on"] = True
        return 503 if down["on"] else None

    with FaultProxy(vllm_server.url, plan) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, **{**PHASE_ENV, "SAVE_STEPS": 5, "VLLM_WAIT_TIMEOUT": 3})
        started = time.monotonic()
        result = run_trainer(env, tmp_path / "stdout.log", timeout=300)
        seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout[-3000:]
    run_dir = tmp_path / "test-run"
    log = (run_dir / "training.log").read_text()
    assert f"vLLM server at http://127.0.0.1:{proxy.port} not healthy after 3 s" in log
    assert "evaluation at step 2 failed; step 2 is checkpointed, restart to resume" in log
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoint-2" / "COMPLETE").is_file(), "the step trained before the outage was lost"
    assert seconds < 240, "a permanent outage must end after the retries and VLLM_WAIT_TIMEOUT"


def test_adapter_rank_above_the_servers_limit_fails_at_start(vllm_server, tiny_model, tmp_path):
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, LORA_RANK=16)
    result = run_trainer(env, tmp_path / "stdout.log", timeout=300)
    assert result.returncode == 1
    assert "rejected adapter" in result.stdout and "--max-lora-rank >= LORA_RANK" in result.stdout
    assert not (tmp_path / "test-run" / "metrics.jsonl").exists()


def test_prompt_plus_completion_longer_than_the_server_allows_fails_at_start(vllm_server, tiny_model, tmp_path):
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_PROMPT_LENGTH=400, MAX_COMPLETION_LENGTH=200)
    result = run_trainer(env, tmp_path / "stdout.log", timeout=300)
    assert result.returncode == 2 and "exceeds the server's --max-model-len 512" in result.stdout


def test_raising_reward_scores_zero_and_training_goes_on(vllm_server, tiny_model, tmp_path):
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_STEPS=2,
                      REWARD_FUNCS="tests.rewards.always_raises,tests.rewards.known_word_fraction")
    result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-3000:]
    rows = metrics(tmp_path / "test-run")
    assert [r["rewards/always_raises/failures"] for r in rows] == [1, 2]
    assert all(r["rewards/always_raises/mean"] == 0.0 for r in rows)
    assert "reward always_raises raised RuntimeError: broken reward" in result.stdout


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(vllm_server, tiny_model, tmp_path):
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_STEPS=2)
    assert run_trainer(env, tmp_path / "first.log").returncode == 0
    run_dir = tmp_path / "test-run"
    adapter = run_dir / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the weights: the file still parses, only the manifest catches it
    adapter.write_bytes(bytes(data))

    result = run_trainer({**env, "MAX_STEPS": "3"}, tmp_path / "second.log")
    assert result.returncode == 0, result.stdout[-3000:]
    log = (run_dir / "training.log").read_text()
    assert "checkpoint-2: adapter_model.safetensors does not match its manifest" in log
    assert f"resuming from {run_dir / 'checkpoint-1'}" in log
    assert (run_dir / "incomplete-checkpoint-2").is_dir(), "the damaged checkpoint is kept for inspection"
    assert [r["step"] for r in metrics(run_dir)][-2:] == [2, 3]


def test_sigterm_while_the_server_is_down_exits_promptly(vllm_server, tiny_model, tmp_path):
    broken = {"on": False}
    with FaultProxy(vllm_server.url, lambda path, n, body: 503 if broken["on"] else None) as proxy:
        env = trainer_env(tiny_model, tmp_path, proxy.port, MAX_STEPS=100, SAVE_STEPS=1, VLLM_MAX_RETRIES=2,
                          VLLM_RETRY_MAX_WAIT=0.2, VLLM_WAIT_TIMEOUT=600)
        run_dir = tmp_path / "test-run"
        trainer = start_trainer(env, tmp_path / "stdout.log")
        wait_for(lambda: (run_dir / "checkpoint-1" / "COMPLETE").exists(), 300, "checkpoint-1")
        broken["on"] = True
        wait_for(lambda: "waiting up to 600 s for the server to come back" in (run_dir / "training.log").read_text(),
                 120, "the trainer to wait for the server")
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(30) == 0, "a stop must not wait out VLLM_WAIT_TIMEOUT"
    log = (run_dir / "training.log").read_text()
    assert "stop requested while waiting for the vLLM server" in log and "restart resumes from" in log


@pytest.fixture
def small_volume(tmp_path):
    """A real filesystem that can fill up: a 64 MiB tmpfs (needs root, as CI has)."""
    mount = tmp_path / "volume"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_runs_volume_fails_clearly_and_keeps_the_last_checkpoint(vllm_server, tiny_model, small_volume, tmp_path):
    from trainer.checkpoints import problem_with

    env = trainer_env(tiny_model, small_volume, vllm_server.port, MAX_STEPS=200, SAVE_STEPS=1)
    run_dir = small_volume / "test-run"
    trainer = start_trainer(env, tmp_path / "stdout.log")
    wait_for(lambda: (run_dir / "checkpoint-2" / "COMPLETE").exists(), 300, "checkpoint-2")
    with open(small_volume / "filler", "wb", buffering=0) as f:  # take every free byte
        for block in (1 << 20, 1 << 10, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    assert trainer.wait(120) == 1
    stdout = (tmp_path / "stdout.log").read_text()
    assert "the runs volume is full" in stdout and "No space left on device" in stdout
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    assert complete and all(problem_with(p) is None for p in complete)


def test_one_lora_slot_on_the_server_is_enough(tiny_model, tmp_path):
    """`--max-loras 1`: a new version is registered before the old one is unloaded, and vLLM evicts the older from
    its adapter cache, so the smallest setting works: there is no 'too few --max-loras' to detect."""
    server = start_server(tiny_model, tmp_path / "vllm.log", VLLM_MAX_LORAS=1)
    try:
        env = trainer_env(tiny_model, tmp_path, server.port, MAX_STEPS=3)
        result = run_trainer(env, tmp_path / "stdout.log")
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-3000:]
    rows = metrics(tmp_path / "test-run")
    assert [r["adapter"] for r in rows] == ["policy-v0", "policy-v1", "policy-v2"]
    assert all(r["sampling/sampling_logp_difference/mean"] < 1e-4 for r in rows)


def test_server_without_runtime_lora_fails_at_start_naming_the_fix(tiny_model, tmp_path):
    from conftest import SERVER_PYTHON, Server, server_env, wait_healthy

    port = free_port()  # vLLM started by hand, not by the entrypoint (which always turns runtime LoRA on)
    env = {k: v for k, v in server_env(tiny_model, port).items() if k != "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}
    command = [str(SERVER_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
               "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512"]
    with open(tmp_path / "vllm.log", "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = Server(process, port, tiny_model, tmp_path / "vllm.log", env)
    try:
        wait_healthy(server)
        result = run_trainer(trainer_env(tiny_model, tmp_path, port), tmp_path / "stdout.log", timeout=300)
    finally:
        server.stop()
    assert result.returncode == 1
    assert "--enable-lora" in result.stdout and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in result.stdout
    assert not (tmp_path / "test-run" / "metrics.jsonl").exists()
