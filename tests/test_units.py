"""Pieces with no server: checkpoint manifests, data normalisation, reward wrapping, adapter path confinement."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from trainer.adapter_sync import AdapterPublisher
from trainer.checkpoints import latest_intact_checkpoint, mark_complete
from trainer.data import DatasetError, final_answer, load_prompts, to_prompts
from trainer.rewards import RewardError, boxed_format_reward, final_number_reward, load_rewards, resolve


def make_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "adapter_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        mark_complete(path)
    return path


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    make_checkpoint(tmp_path, 1)
    second = make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10, complete=False)  # killed mid-save
    assert latest_intact_checkpoint(tmp_path) == second
    assert (tmp_path / "incomplete-checkpoint-10").is_dir() and not (tmp_path / "checkpoint-10").exists()


def test_damaged_checkpoint_falls_back(tmp_path):
    first = make_checkpoint(tmp_path, 1)
    second = make_checkpoint(tmp_path, 2)
    (second / "adapter_model.safetensors").write_bytes(b"y" * 100)
    assert latest_intact_checkpoint(tmp_path) == first


def test_no_checkpoint_means_a_new_run(tmp_path):
    assert latest_intact_checkpoint(tmp_path) is None


def test_rows_missing_fields_are_skipped_and_counted():
    raw = datasets.Dataset.from_list([{"question": "What is 2 plus 2?", "answer": "#### 4"},
                                      {"question": "", "answer": "#### 1"},
                                      {"question": "What is 3?", "answer": None}])
    dataset, skipped = to_prompts(raw, "Be brief.")
    assert skipped == 2 and len(dataset) == 1
    assert dataset[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 2 plus 2?"}]
    assert dataset[0]["solution"] == "4"


def test_unusable_columns_fail_with_what_is_needed():
    with pytest.raises(DatasetError, match="needs one of"):
        to_prompts(datasets.Dataset.from_list([{"text": "hi"}]), "")


def test_bundled_sample_and_local_jsonl(tmp_path):
    assert len(load_prompts("sample", "", "train", "")) == 96
    path = tmp_path / "mine.jsonl"
    path.write_text('{"problem": "1+1?", "solution": "2"}\n')
    assert load_prompts(str(path), "", "train", "")[0]["solution"] == "2"
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"), "", "train", "")


def test_gsm8k_answers_reduce_to_the_final_number():
    assert final_answer("She sold 48/2 = 24 clips.\n#### 1,024") == "1024"


def test_rewards_by_name_and_dotted_path():
    assert resolve("boxed_format") is boxed_format_reward
    assert resolve("tests.rewards.known_word_fraction").__name__ == "known_word_fraction"
    with pytest.raises(RewardError, match="unknown reward 'bogus'"):
        resolve("bogus")
    with pytest.raises(RewardError, match="cannot import 'tests.rewards.missing'"):
        resolve("tests.rewards.missing")


def test_accuracy_reward_is_trls_math_verify():
    (accuracy,) = load_rewards(("accuracy",))
    completions = [[{"role": "assistant", "content": "so \\boxed{42}"}],
                   [{"role": "assistant", "content": "so \\boxed{41}"}]]
    assert accuracy(completions=completions, solution=["42", "42"]) == [1.0, 0.0]


def test_final_number_reward_takes_numbers_not_expressions():
    # A policy trained on sums with `accuracy` learned to answer \\boxed{3 + 3}: math-verify evaluates it to 6.
    assert resolve("accuracy")([[{"role": "assistant", "content": r"\boxed{3 + 3}"}]], solution=["6"]) == [1.0]
    completions = [r"\boxed{3 + 3}", r"\boxed{6}", r"\boxed{ 6 }", "3 + 3 = 6", "The answer is 6.", r"\boxed{0 + 6}",
                   "6, no: 7", r"\boxed{}", "no number", [{"role": "assistant", "content": r"so \boxed{6.0}"}]]
    assert final_number_reward(completions, solution=["6"] * len(completions)) == [0, 1, 1, 1, 1, 0, 0, 0, 0, 1]
    assert resolve("final_number") is final_number_reward


def test_boxed_format_reward():
    texts = ["a \\boxed{1}", "no box", "\\boxed{1} \\boxed{2}", "Answer with \\boxed{}."]
    assert boxed_format_reward([[{"role": "assistant", "content": t}] for t in texts]) == [1.0, 0.0, 0.0, 0.0]


def test_a_raising_reward_scores_zero_and_is_counted():
    (broken,) = load_rewards(("tests.rewards.always_raises",))
    assert broken(completions=["a", "b"]) == [0.0, 0.0]
    assert broken.failures == 1 and broken.__name__ == "always_raises"


def test_adapter_paths_stay_inside_the_run(tmp_path):
    publisher = AdapterPublisher(model=None, client=None, adapters_dir=tmp_path / "adapters")
    assert publisher.path_of("policy-v3") == (tmp_path / "adapters" / "policy-v3").resolve()
    for name in ("../policy-v3", "policy-v3/../../etc", "other"):
        with pytest.raises(ValueError, match="refusing"):
            publisher.path_of(name)


def test_reasoning_effort_reaches_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from trainer.config import Settings
    from trainer.data import prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # the tiny vocabulary has no 'low': the template writes a word it has for each effort
    tokenizer.chat_template = ("{% if reasoning_effort == 'low' %}minus{% else %}plus{% endif %} "
                               "{{ messages[0]['content'] }}")
    messages = [{"role": "user", "content": "what is 2"}]
    low = Settings.from_env({"REASONING_EFFORT": "low"}).chat_template_kwargs
    assert tokenizer.decode(prompt_token_ids(tokenizer, messages, low)) == "minus what is 2"
    assert tokenizer.decode(prompt_token_ids(tokenizer, messages, Settings.from_env({}).chat_template_kwargs)) == \
        "plus what is 2"


def log_one_step(run_dir, logs: dict) -> None:
    """The run logger's work for one step with `logs` as TRL's metrics (its line goes to the log)."""
    from types import SimpleNamespace

    from trainer.generation import StepTimings
    from trainer.memory import MicroStepMemory
    from trainer.metrics import StepMetrics
    from trainer.run_log import RunLogger

    logger = RunLogger(run_dir, SimpleNamespace(take_timings=StepTimings), MicroStepMemory(1, run_dir),
                       extra_counters=dict, metrics=StepMetrics())
    state = SimpleNamespace(global_step=1, max_steps=2)
    logger.on_train_begin(None, SimpleNamespace(global_step=0), None)
    logger.on_step_begin(None, state, None)
    logger.on_log(None, state, None, logs=logs)


@pytest.mark.parametrize("gap, weight, warning", [
    (0.05, 0.98, None),
    (18.5, 0.0, "logprobs of the sampled tokens differ by"),
    (0.06, 0.0022, "importance-sampling weights average 0.0022"),  # TRL's sequence_mask at 3.6k tokens on H100
])
def test_logprob_gap_and_collapsed_importance_weights_are_warned_about(tmp_path, caplog, gap, weight, warning):
    caplog.set_level("INFO")
    log_one_step(tmp_path, {"reward": 0.5, "sampling/sampling_logp_difference/mean": gap,
                            "sampling/importance_sampling_ratio/mean": weight})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (warning is not None) and all(warning in w for w in warnings)
    assert f"IS weight {weight:.2f}" in caplog.text  # in the step line
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["sampling/sampling_logp_difference/mean"] == gap


@pytest.mark.parametrize("reward, std, shown", [
    (0.984, 0.015, "reward 0.984 ± 0.015"),
    (0.00017, 0.00025, "reward 1.7e-04 ± 2.5e-04"),  # a random-weight model on H100: not a run that earns nothing
    (0.0, 0.0, "reward 0.000 ± 0.000"),
])
def test_step_line_shows_small_rewards(tmp_path, caplog, reward, std, shown):
    caplog.set_level("INFO")
    log_one_step(tmp_path, {"reward": reward, "reward_std": std})
    assert shown in caplog.text


def test_groups_go_to_the_servers_with_the_fewest_sequences_in_flight():
    from trainer.server_pool import ServerPool
    from trainer.vllm_client import ServerUnavailable, VLLMServerClient

    pool = ServerPool([VLLMServerClient("http://a:8000"), VLLMServerClient("http://b:8000"),
                       VLLMServerClient("http://c:8000")])
    a, b, c = pool.members
    c.up = False  # left the pool: gets nothing
    a.in_flight = 8  # another call's two groups of 4 still on a
    shares = pool._assign([0, 1, 2, 3], n=4)
    assert shares == {b: [0, 1, 3], a: [2]}  # 12 sequences on each in the end
    a.up = b.up = False
    with pytest.raises(ServerUnavailable):
        pool._assign([0], n=4)
