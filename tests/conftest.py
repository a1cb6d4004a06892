"""Fixtures: tiny random checkpoints, a real vLLM server (CPU build, own venv) started by the compose entrypoint,
and helpers that run the trainer entry script, or the container's launcher, as the trainer container does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.random_models import save_tiny_dense  # noqa: E402

SERVER_PYTHON = Path(os.environ.get("VLLM_SERVER_PYTHON", REPO / ".venv/server/bin/python"))
API_KEY = "test-key-1234"
SERVER_START_TIMEOUT = 300
LAUNCHER_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gpt_oss_tokenizer_dir() -> Path:
    """GPT-OSS's real tokenizer, chat template and generation config, rebuilt once under .venv/models."""
    from scripts.gpt_oss_tokenizer import build

    return build()


def build_tiny_gpt_oss(path: Path, *args: str) -> Path:
    """benchmarks/build_gpt_oss_checkpoint.py --tiny: GPT-OSS's architecture (MoE, sinks, sliding window) at toy
    size, its experts in the published MXFP4 layout."""
    subprocess.run([sys.executable, str(REPO / "benchmarks/build_gpt_oss_checkpoint.py"), str(path), "--tiny", *args],
                   check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def mxfp4_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_gpt_oss(tmp_path_factory.mktemp("models") / "tiny-gpt-oss-mxfp4")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_dense(tmp_path_factory.mktemp("models") / "tiny-dense")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    model: Path
    log_path: Path
    env: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def models(self) -> list[str]:
        r = requests.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        return [m["id"] for m in r.json()["data"]]

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def server_env(model: Path, port: int, **overrides) -> dict:
    """The vllm service's environment as compose gives it (.env.example), with CPU-sized values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PYTEST"))}
    env.update({"MODEL_NAME": str(model), "VLLM_SERVER_PORT": str(port), "VLLM_HOST": "127.0.0.1",
                "VLLM_TENSOR_PARALLEL_SIZE": "1", "VLLM_DTYPE": "float32", "VLLM_MAX_MODEL_LEN": "512",
                "VLLM_MAX_LORA_RANK": "8", "VLLM_MAX_LORAS": "2", "VLLM_API_KEY": API_KEY,
                "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                # CUDA graphs are a GPU feature; on the CPU build compilation would only lengthen each start
                "VLLM_ENFORCE_EAGER": "true"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start_server(model: Path, log_path: Path, port: int | None = None, wait: bool = True,
                 server_args: list[str] | None = None, **overrides) -> Server:
    """The vllm container's entrypoint; or, with `server_args`, vLLM's own server with exactly those flags."""
    port = port or free_port()
    env = server_env(model, port, **overrides)
    command = [str(SERVER_PYTHON), str(REPO / "docker/vllm/serve.py")] if server_args is None else [
        str(SERVER_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), *server_args]
    log_file = open(log_path, "ab")
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, port, model, log_path, env)
    if wait:
        wait_healthy(server)
    return server


def wait_healthy(server: Server, timeout: float = SERVER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"vLLM server not healthy after {timeout} s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def vllm_server(tiny_model, tmp_path_factory):
    if not SERVER_PYTHON.exists():
        pytest.fail(f"{SERVER_PYTHON} missing: run scripts/test.sh, which builds the server venv")
    server = start_server(tiny_model, tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield server
    server.stop()


def trainer_env(model: Path, runs_dir: Path, port: int, **overrides) -> dict:
    """The trainer service's environment: .env.example's settings, small enough for two CPU cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update({
        "VLLM_SERVER_HOST": "127.0.0.1", "VLLM_SERVER_PORT": str(port), "VLLM_API_KEY": API_KEY,
        "MODEL_NAME": str(model), "TORCH_DTYPE": "float32", "ATTN_IMPLEMENTATION": "eager",
        "RUNS_DIR": str(runs_dir), "RUN_NAME": "test-run", "DATASET": "sample",
        "REWARD_FUNCS": "accuracy,boxed_format,tests.rewards.known_word_fraction",
        "NUM_GENERATIONS": "4", "MICRO_BATCH_SIZE": "1", "GRADIENT_ACCUMULATION_STEPS": "8",
        "MAX_PROMPT_LENGTH": "96", "MAX_COMPLETION_LENGTH": "24", "MAX_STEPS": "3", "SAVE_STEPS": "1",
        "LEARNING_RATE": "0.02", "WARMUP_STEPS": "0", "LR_SCHEDULER": "constant", "REPORT_TO": "tensorboard",
        "VLLM_WAIT_TIMEOUT": "120", "VLLM_MAX_RETRIES": "4", "VLLM_RETRY_MAX_WAIT": "2",
        # Each round sampled with the newest adapter: the on-policy checks hold exactly (test_overlap.py runs
        # MAX_OFF_POLICY_STEPS=1).
        "MAX_OFF_POLICY_STEPS": "0",
        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
    })
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def start_trainer(env: dict, log_path: Path) -> subprocess.Popen:
    log_file = open(log_path, "ab")
    return subprocess.Popen([sys.executable, str(REPO / "trainer/train_grpo_vllm.py")], env=env, cwd=REPO,
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def run_trainer(env: dict, log_path: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    process = start_trainer(env, log_path)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"trainer did not finish in {timeout} s:\n{log_path.read_text()[-4000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, log_path.read_text(), "")


def start_launcher(env: dict, log_path: Path) -> subprocess.Popen:
    """The trainer container's command (trainer/launch.py: one process, or torchrun and its ranks)."""
    with open(log_path, "ab") as log_file:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, str(REPO / "trainer/launch.py")], env=env, cwd=REPO,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, log_path: Path, timeout: float = LAUNCHER_TIMEOUT) -> str:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_all(process)
        raise AssertionError(f"trainer did not finish in {timeout} s:\n{log_path.read_text()[-4000:]}")
    return log_path.read_text()


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the launcher, torchrun and the ranks (torchrun starts each rank in a session of its own)."""
    try:
        family = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
