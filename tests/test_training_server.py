"""The trainer against a real vLLM server (CPU build) over HTTP: GRPO steps, adapter hot-swap, logs, resume, stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import API_KEY, run_trainer, start_trainer, trainer_env, wait_for
from benchmarks.logprob_agreement import completion_logprobs

pytestmark = pytest.mark.server


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(vllm_server, tiny_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = trainer_env(tiny_model, runs, vllm_server.port, EVAL_STEPS=2, SAMPLES_STEPS=1)
    result = run_trainer(env, runs / "stdout.log")
    assert result.returncode == 0, result.stdout[-4000:]
    return runs / "test-run", result.stdout


def test_training_log_shows_generation_config_and_metrics(finished_run):
    run_dir, stdout = finished_run
    log = (run_dir / "training.log").read_text()
    assert "Generation config: use_vllm=True, vllm_mode=server" in log
    for step in (1, 2, 3):
        assert f"step {step}/3 |" in log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("reward", "reward_std", "completions/clipped_ratio", "completions/mean_length",
                    "time/generation_s", "time/sync_s", "time/train_s", "tokens/generation_per_s"):
            assert key in r, key
    assert any(r["reward_std"] > 0 for r in rows), "rewards have no spread: GRPO would learn nothing"
    # the same lines reach `docker compose logs trainer`, each on a line of its own beside the progress bar
    assert any(line.startswith("20") and "INFO trainer.run_log: step 3/3 |" in line for line in stdout.splitlines())


def test_each_micro_step_reports_peak_memory(finished_run):
    log = (finished_run[0] / "training.log").read_text()
    for step in (1, 2, 3):
        for micro in range(1, 9):
            assert f"micro-step {micro}/8 of step {step}: 1 seq," in log


def test_each_step_registers_a_new_adapter_version(finished_run, vllm_server):
    run_dir, _ = finished_run
    assert [r["adapter"] for r in metrics(run_dir)] == ["policy-v0", "policy-v1", "policy-v2"]
    server_log = vllm_server.log()
    for version in (0, 1, 2):
        assert f"Loaded new LoRA adapter: name 'policy-v{version}'" in server_log
    assert "policy-v2" in vllm_server.models()
    # the finished run's adapter stays on the server under the run's name, for users to query
    assert f"Loaded new LoRA adapter: name 'test-run', path '{(run_dir / 'final_adapter').resolve()}'" in server_log
    assert "test-run" in vllm_server.models()
    assert "policy-v0" not in vllm_server.models()  # retired versions are unloaded
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["policy-v1", "policy-v2"]


def test_sampling_logprobs_match_the_trainers_at_every_step(finished_run):
    # TRL compares vLLM's sampling logprobs with the trainer's own for the adapter version that sampled them.
    for r in metrics(finished_run[0]):
        assert r["sampling/sampling_logp_difference/mean"] < 1e-4, r
        assert r["sampling/sampling_logp_difference/max"] < 1e-3, r


def test_vllm_samples_with_the_trained_adapter(finished_run, vllm_server, tiny_model):
    """The final adapter, served by vLLM, gives the logprobs transformers+PEFT give; the base model does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.vllm_client import VLLMServerClient

    adapter = finished_run[0] / "final_adapter"
    client = VLLMServerClient(vllm_server.url, API_KEY)
    client.load_lora_adapter("final-check", str(adapter))
    prompt = [1, 62, 28, 29, 6, 30, 7, 23, 2, 1, 63]
    completions = client.complete("final-check", [prompt], n=4, max_tokens=16, temperature=1.0, top_p=1.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    gaps_tuned, gaps_base = [], []
    for c in completions:
        for model, gaps in ((tuned, gaps_tuned), (base, gaps_base)):
            gaps += (completion_logprobs(model, prompt, c.token_ids) - torch.tensor(c.logprobs)).abs().tolist()
    assert max(gaps_tuned) < 1e-3, max(gaps_tuned)
    assert sum(gaps_base) / len(gaps_base) > 100 * sum(gaps_tuned) / len(gaps_tuned)


def test_checkpoints_and_final_adapter(finished_run):
    run_dir, _ = finished_run
    for step in (1, 2, 3):
        assert (run_dir / f"checkpoint-{step}" / "COMPLETE").is_file()
    state = json.loads((run_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    config = json.loads((run_dir / "final_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert list((run_dir / "tb").glob("**/events.out.tfevents.*")), "no TensorBoard events"


def step_prompts(run_dir: Path) -> dict[int, list]:
    """The prompts each step trained on (samples.jsonl with SAMPLES_PER_STEP = sequences per step)."""
    prompts: dict[int, list] = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        prompts.setdefault(sample["step"], []).append(sample["prompt"][-1]["content"])
    return prompts


def test_killed_run_resumes_without_losing_or_repeating_a_step(vllm_server, tiny_model, tmp_path):
    settings = dict(MAX_STEPS=5, SAVE_STEPS=1, SAMPLES_STEPS=1, SAMPLES_PER_STEP=8)
    reference = run_trainer(trainer_env(tiny_model, tmp_path / "reference", vllm_server.port, **settings),
                            tmp_path / "reference.log")
    assert reference.returncode == 0, reference.stdout[-3000:]
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, **settings)
    run_dir = tmp_path / "test-run"
    first = start_trainer(env, tmp_path / "first.log")
    wait_for(lambda: (run_dir / "checkpoint-2" / "COMPLETE").exists(), 300, "checkpoint-2")
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed_from = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "COMPLETE").exists())

    result = run_trainer(env, tmp_path / "second.log")
    assert result.returncode == 0, result.stdout[-3000:]
    log = (run_dir / "training.log").read_text()
    assert f"resuming from {run_dir / f'checkpoint-{resumed_from}'}" in log
    second_steps = [r["step"] for r in metrics(run_dir)][-(5 - resumed_from):]
    assert second_steps == list(range(resumed_from + 1, 6))  # picks up right after the checkpoint
    state = json.loads((run_dir / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5
    assert "Generation config" in log.split("resuming from")[0]  # the first process's log is kept
    # the data position survives too: each step after the resume trains on the prompts it would have without the kill
    expected, got = step_prompts(tmp_path / "reference" / "test-run"), step_prompts(run_dir)
    for step in range(resumed_from + 1, 6):
        assert got[step][-8:] == expected[step], f"step {step} saw other prompts after the resume"


def test_sigterm_checkpoints_then_exits_zero(vllm_server, tiny_model, tmp_path):
    env = trainer_env(tiny_model, tmp_path, vllm_server.port, MAX_STEPS=200, SAVE_STEPS=100)
    run_dir = tmp_path / "test-run"
    process = start_trainer(env, tmp_path / "stdout.log")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the first step")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    last_step = metrics(run_dir)[-1]["step"]
    checkpoint = run_dir / f"checkpoint-{last_step}"
    assert (checkpoint / "COMPLETE").is_file(), sorted(p.name for p in run_dir.iterdir())
    assert "checkpoint saved, restart to resume" in (run_dir / "training.log").read_text()


def test_evaluation_and_samples_are_logged(finished_run):
    run_dir, stdout = finished_run
    rows = metrics(run_dir)
    assert [("eval/reward" in r) for r in rows] == [False, True, False]
    assert rows[1]["eval/completions/mean_length"] > 0 and "eval/rewards/accuracy_reward/mean" in rows[1]
    assert "eval at step 2 on 24 held-out prompts | reward" in stdout
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3]
    assert {"prompt", "completion", "rewards", "advantage"} <= set(samples[0])


def test_report_renders_plots_from_the_run(finished_run, tmp_path):
    from trainer.report import main as report

    out = tmp_path / "report.png"
    assert report([str(finished_run[0]), "--out", str(out)]) == 0
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1440, 1350) and out.stat().st_size > 30_000
