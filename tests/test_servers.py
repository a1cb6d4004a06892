"""The trainer against two real vLLM servers (CPU build) at once (VLLM_SERVER_URLS): every adapter version on both,
the work spread over both, one server killed and restarted mid-run with nothing lost, the same result as one server,
also with the trainer's two ranks on two "nodes" (separate launchers meeting by rendezvous, as on two hosts)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import (API_KEY, LAUNCHER_TIMEOUT, free_port, kill_all, run_trainer, start_launcher, start_server,
                      start_trainer, trainer_env, wait_for, wait_healthy)
from fault_proxy import CUT, FaultProxy
from trainer.server_pool import ServerPool
from trainer.vllm_client import AdapterUnreadable, VLLMServerClient

pytestmark = pytest.mark.server

STEPS = 3
SEQUENCES_PER_STEP = 8  # trainer_env: MICRO_BATCH_SIZE 1 x GRADIENT_ACCUMULATION_STEPS 8


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory) -> list:
    """Two servers of the tiny model on two ports; a test that restarts one puts the new one in its place."""
    logs = tmp_path_factory.mktemp("vllm-pair")
    pair = [start_server(tiny_model, logs / f"vllm-{i}.log", wait=False) for i in range(2)]
    for server in pair:
        wait_healthy(server)
    yield pair
    for server in pair:
        server.stop()


def pool_env(model: Path, runs: Path, servers: list, **overrides) -> dict:
    urls = ",".join(server.url for server in servers)
    # VLLM_SERVER_PORT points at no server: only VLLM_SERVER_URLS may be used
    return trainer_env(model, runs, 9, VLLM_SERVER_URLS=urls, **overrides)


def completions_served(server) -> float:
    """The server's own count of finished requests (vLLM's Prometheus counter, all finish reasons)."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class AdapterWatch:
    """Polls each server's /v1/models while a run goes on and keeps every adapter name each one listed."""

    def __init__(self, servers: list):
        self.servers = servers
        self.seen = [set() for _ in servers]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            for seen, server in zip(self.seen, self.servers):
                try:
                    seen.update(server.models())
                except (requests.RequestException, ValueError, KeyError):
                    pass  # a server being restarted
            time.sleep(0.1)

    def stop(self) -> list[set]:
        self._stop.set()
        self._thread.join()
        return self.seen


def steps_complete(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl, each checked to have trained on all its rollouts."""
    rows = metrics(run_dir)
    micro_steps: dict[int, int] = {}
    for line in (run_dir / "memory.jsonl").read_text().splitlines():
        step = json.loads(line)["step"]
        micro_steps[step] = micro_steps.get(step, 0) + 1
    for row in rows:
        assert micro_steps.get(row["step"]) == SEQUENCES_PER_STEP, (row["step"], micro_steps)
        assert row["tokens/generated"] == round(SEQUENCES_PER_STEP * row["completions/mean_length"]), row
    return [row["step"] for row in rows]


def test_every_version_on_both_servers_and_the_work_spread_over_both(servers, tiny_model, tmp_path):
    before = [completions_served(s) for s in servers]
    watch = AdapterWatch(servers)
    result = run_trainer(pool_env(tiny_model, tmp_path, servers, MAX_STEPS=STEPS), tmp_path / "trainer.log")
    seen = watch.stop()
    assert result.returncode == 0, result.stdout[-4000:]
    assert steps_complete(tmp_path / "test-run") == list(range(1, STEPS + 1))
    versions = {f"policy-v{step}" for step in range(STEPS)}  # step k samples from the adapter after k-1 updates
    for server, names in zip(servers, seen):
        assert versions <= names, f"{server.url} never listed {sorted(versions - names)}"
        assert "test-run" in server.models(), f"{server.url} does not serve the final adapter"
    served = [completions_served(s) - b for s, b in zip(servers, before)]
    assert min(served) >= 0.4 * sum(served), f"completions per server: {served}"
    assert "left the pool" not in result.stdout


def test_an_unreadable_adapter_path_names_the_shared_storage_fix(servers, tmp_path):
    pool = ServerPool([VLLMServerClient(s.url, API_KEY) for s in servers])
    with pytest.raises(AdapterUnreadable) as err:  # a path that exists for the trainer, not for the server
        pool.load_lora_adapter("policy-v7", "/mnt/elsewhere/runs/test-run/adapters/policy-v7")
    assert "RUNS_DIR" in str(err.value) and "network filesystem" in str(err.value)


def test_a_server_killed_and_restarted_mid_run_loses_nothing(servers, tiny_model, tmp_path):
    log_path = tmp_path / "trainer.log"
    # runs until stopped: a restart on two busy cores takes minutes, many steps of this model
    trainer = start_trainer(pool_env(tiny_model, tmp_path, servers, MAX_STEPS=100000, SAVE_STEPS=100000), log_path)
    try:
        victim = servers[1]
        run_dir = tmp_path / "test-run"  # (the servers may still list versions of an earlier run)
        wait_for(lambda: len(metrics(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False, 300,
                 "two steps done")
        victim.stop(signal.SIGKILL)  # a crash: no graceful shutdown
        wait_for(lambda: "left the pool" in log_path.read_text(), 120, "the trainer to notice")
        steps_when_left = len(metrics(run_dir))
        wait_for(lambda: len(metrics(run_dir)) >= steps_when_left + 3, 120, "three steps on the other server alone")
        # On two cores vLLM does not finish starting beside a busy trainer and server within minutes: the trainer
        # waits (SIGSTOP) while the server restarts, then goes on and must take the server back.
        os.killpg(trainer.pid, signal.SIGSTOP)
        try:
            servers[1] = start_server(victim.model, victim.log_path, port=victim.port)
        finally:
            os.killpg(trainer.pid, signal.SIGCONT)
        wait_for(lambda: "rejoined the pool" in log_path.read_text(), 60, "the restarted server to rejoin")
        wait_for(lambda: completions_served(servers[1]) > 0, 120, "requests to the restarted server")
    finally:
        trainer.send_signal(signal.SIGTERM)  # checkpoint and stop after the step in flight
        returncode = trainer.wait(300)
    log = log_path.read_text()
    assert returncode == 0, log[-4000:]
    steps = steps_complete(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4, steps
    assert (run_dir / f"checkpoint-{steps[-1]}").is_dir()
    current = {name for name in servers[0].models() if name.startswith("policy-v")}
    assert current and current <= set(servers[1].models()), "the restarted server lacks the current adapter"


def test_a_server_failing_mid_sampling_has_its_share_sampled_by_the_other(servers, tiny_model, tmp_path):
    """The second server breaks off every answer of step 2's sampling (a kill at that moment cannot be timed for
    real): its group must come from the first server, once, and the step must go on."""
    def plan(path, attempt, body):
        return CUT if path == "/v1/completions" and body.get("model") == "policy-v1" else None

    with FaultProxy(servers[1].url, plan) as proxy:
        env = trainer_env(tiny_model, tmp_path, 9, MAX_STEPS=STEPS,
                          VLLM_SERVER_URLS=f"{servers[0].url},http://127.0.0.1:{proxy.port}")
        result = run_trainer(env, tmp_path / "trainer.log")
    assert result.returncode == 0, result.stdout[-4000:]
    assert proxy.faults[CUT] == 4  # VLLM_MAX_RETRIES attempts, then the pool gives up on it
    assert "1 of 2 prompts go to the other vLLM servers" in result.stdout
    assert steps_complete(tmp_path / "test-run") == list(range(1, STEPS + 1))


# Same seed and greedy sampling (TOP_P at its floor keeps only the likeliest token): one server and two must give the
# same completions, so the same rewards, step by step, exactly. Greedy groups have no spread, so the loss is 0 and the
# update is not compared; with sampling, vLLM draws without a seed and two runs differ even on one server.
GREEDY = {"MAX_STEPS": STEPS, "TOP_P": "0.01"}


@pytest.fixture(scope="module")
def one_server_greedy(servers, tiny_model, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("one-server")
    one = run_trainer(trainer_env(tiny_model, runs, servers[0].port, **GREEDY), runs / "trainer.log")
    assert one.returncode == 0, one.stdout[-2000:]
    return runs / "test-run"


def assert_same_samples(run_dir: Path, reference: Path) -> None:
    for a, b in zip(metrics(reference), metrics(run_dir), strict=True):
        for key in ("tokens/generated", "completions/mean_length", "reward", "reward_std"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_two_servers_sample_what_one_does(servers, one_server_greedy, tiny_model, tmp_path):
    two = run_trainer(pool_env(tiny_model, tmp_path, servers, **GREEDY), tmp_path / "trainer.log")
    assert two.returncode == 0, two.stdout[-2000:]
    assert_same_samples(tmp_path / "test-run", one_server_greedy)


def test_two_trainer_nodes_on_two_servers_sample_what_one_process_does(servers, one_server_greedy, tiny_model,
                                                                         tmp_path):
    """Two launchers, each a node of one rank (NNODES=2, its own NODE_RANK, MASTER_ADDR:MASTER_PORT), sharing the
    runs directory as nodes share a network filesystem: rank 0 on node 0 drives both servers, node 1's rank trains
    its share of every step, and the run samples and rewards what the one-process run on one server does (greedy:
    no spread, so no update to compare; tests/test_ranks.py compares two ranks' gradients with one process's)."""
    rendezvous = {"NNODES": 2, "TRAINER_PROCESSES": 1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    watch = AdapterWatch(servers)
    nodes = [start_launcher(pool_env(tiny_model, tmp_path, servers, NODE_RANK=node, **rendezvous, **GREEDY),
                            tmp_path / f"node{node}.log") for node in (0, 1)]
    try:  # a node that fails leaves the other waiting in a collective: stop both at the first failure
        wait_for(lambda: all(p.poll() is not None for p in nodes) or any(p.poll() for p in nodes), LAUNCHER_TIMEOUT,
                 "both nodes to finish")
    finally:
        for process in nodes:
            if process.poll() is None:
                kill_all(process)
    seen = watch.stop()
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    for node, process in enumerate(nodes):
        assert process.returncode == 0, f"node {node}:\n" + "\n".join(log[-3000:] for log in logs)
    run_dir = tmp_path / "test-run"
    for step in range(1, STEPS + 1):  # each node's rank ran half of every step's 8 micro-steps
        assert f"rank 0: micro-step 4/4 of step {step}:" in logs[0]
        assert f"rank 1: micro-step 4/4 of step {step}:" in logs[1]
    assert steps_complete(run_dir) == list(range(1, STEPS + 1))  # 8 micro-steps each, 4 per node
    assert_same_samples(run_dir, one_server_greedy)
    versions = {f"policy-v{step}" for step in range(STEPS)}
    for server, names in zip(servers, seen):
        assert versions <= names, f"{server.url} never listed {sorted(versions - names)}"
    assert (run_dir / "final_adapter/adapter_model.safetensors").exists()
