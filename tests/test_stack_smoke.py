"""Both entrypoints as processes, wired as docker-compose.yml wires them: settings from .env.example (with a tiny
model and CPU-sized overrides), one shared runs directory, the trainer started before the server is up, and the
`docker compose down` stop order (SIGTERM to the trainer, then to the server)."""

from __future__ import annotations

import signal

import pytest

from conftest import API_KEY, REPO, free_port, start_server, start_trainer, trainer_env, wait_for
from test_deployment import env_example
from test_training_server import metrics

pytestmark = pytest.mark.server

HF_TOKEN = "hf_do_not_log_me_123"


def test_stack_waits_trains_and_stops_cleanly(tiny_model, tmp_path):
    port = free_port()
    runs = tmp_path / "runs"  # the `runs` volume, mounted in both containers
    shared = {**env_example(), "MODEL_NAME": str(tiny_model), "VLLM_SERVER_PORT": str(port),
              "VLLM_API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN}
    trainer_overrides = {
        "VLLM_SERVER_HOST": "127.0.0.1", "RUNS_DIR": str(runs), "TORCH_DTYPE": "float32", "DATASET": "sample",
        "REWARD_FUNCS": "accuracy,boxed_format,tests.rewards.known_word_fraction", "REWARD_WEIGHTS": "",
        "NUM_GENERATIONS": "4", "GRADIENT_ACCUMULATION_STEPS": "8", "MAX_PROMPT_LENGTH": "96",
        "MAX_COMPLETION_LENGTH": "16", "MAX_STEPS": "100", "SAVE_STEPS": "50", "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1", "VLLM_WAIT_TIMEOUT": "300"}
    server_overrides = {"VLLM_TENSOR_PARALLEL_SIZE": "1", "VLLM_DTYPE": "float32", "VLLM_MAX_MODEL_LEN": "512"}

    env = trainer_env(tiny_model, runs, port)
    env.update(shared)
    env.update(trainer_overrides)
    env["PYTHONPATH"] = str(REPO)
    trainer = start_trainer(env, tmp_path / "trainer.log")  # before the server: it must wait for /health
    run_dir = runs / env["RUN_NAME"]
    wait_for(lambda: (run_dir / "training.log").exists() and "waiting for vLLM server" in
             (run_dir / "training.log").read_text(), 120, "the trainer to wait for the server")
    server = start_server(tiny_model, tmp_path / "vllm.log", port=port, **{**shared, **server_overrides})
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2, 300, "two steps")
        trainer.send_signal(signal.SIGTERM)  # docker compose down: dependents stop first
        assert trainer.wait(120) == 0
    finally:
        trainer.kill()
        server_exit = server.stop(signal.SIGTERM, timeout=60)
    assert server_exit == 0, server.log()[-2000:]

    last = metrics(run_dir)[-1]["step"]
    assert (run_dir / f"checkpoint-{last}" / "COMPLETE").is_file()
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "trainer.log", tmp_path / "vllm.log",
                                                           run_dir / "training.log"))
    assert HF_TOKEN not in logs and API_KEY not in logs
    assert "Generation config: use_vllm=True, vllm_mode=server" in (run_dir / "training.log").read_text()
