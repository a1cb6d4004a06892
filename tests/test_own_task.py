"""A user's own task: their data's columns reach their rewards (from a Hub-style data set and a JSONL file), a
conversational prompt is taken as written, empty settings mean empty, a reward that cannot take the data stops the
start with its name, a user module is never shadowed by the trainer's own, and `launch.py --check` runs the start's
checks alone, in seconds, with no server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from conftest import REPO, free_port, trainer_env
from test_deployment import container_env, compose_config
from trainer.config import Settings
from trainer.data import load_prompts, to_prompts
from trainer.preflight import checked_settings, trial_arguments

CHECK_TIMEOUT = 120

USER_REWARDS = '''
def passes(completions, test_cases, **kwargs):
    """A reward that takes a column of the data by name, as TRL's contract has it."""
    return [1.0 if cases else 0.0 for cases in test_cases]


def reads_answer(completions, **kwargs):
    return [1.0 if answer else 0.0 for answer in kwargs["answer"]]


def strict(completions, solution):
    """No **kwargs: TRL's other arguments and the other columns cannot reach it."""
    return [0.0 for _ in completions]


def needs_column(completions, unit_tests, **kwargs):
    return [0.0 for _ in completions]


def raises(completions, **kwargs):
    raise RuntimeError("cannot score a placeholder")
'''

ROWS = [{"question": "Write add(a, b).", "answer": "return a + b",
         "test_cases": [{"call": "add(1, 2)", "expect": "3"}], "difficulty": 1},
        {"question": "Write neg(a).", "answer": "return -a",
         "test_cases": [{"call": "neg(4)", "expect": "-4"}], "difficulty": 2}]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    """The user's folder on PYTHONPATH (the runs volume in the stack), holding their rewards and data."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_rewards.py").write_text(USER_REWARDS)
    # named like the trainer's own modules: must not be shadowed by trainer/rewards.py or trainer/data.py
    (root / "rewards.py").write_text(USER_REWARDS)
    (root / "data.py").write_text(USER_REWARDS)
    (root / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    hub_style = root / "hub-style"
    hub_style.mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(hub_style / "train.parquet"))
    return root


def check_env(tiny_model, tmp_path, user_dir, **overrides) -> dict:
    env = trainer_env(tiny_model, tmp_path / "runs", free_port(), DATASET=str(user_dir / "tasks.jsonl"),
                      EVAL_STEPS="0", PYTHONPATH=f"{REPO}{os.pathsep}{user_dir}", REWARD_FUNCS="my_rewards.passes")
    env.update(overrides)
    return env


def run_check(env: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The container's check-only command: `python launch.py --check`, from the trainer's folder as its WORKDIR."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "launch.py", "--check", *args], cwd=REPO / "trainer", env=env,
                            capture_output=True, text=True, timeout=CHECK_TIMEOUT)
    return result, time.monotonic() - started


# ------------------------------------------------------------------ columns reach the rewards
def test_a_jsonl_files_columns_reach_a_reward_by_name(user_dir):
    dataset = load_prompts(str(user_dir / "tasks.jsonl"), "", "train", "Be brief.")
    assert set(dataset.column_names) == {"prompt", "question", "answer", "test_cases", "difficulty", "solution"}
    assert dataset[0]["test_cases"] == ROWS[0]["test_cases"] and dataset[1]["difficulty"] == 2
    assert dataset[0]["answer"] == ROWS[0]["answer"] and dataset[0]["solution"] == ROWS[0]["answer"]
    sys.path.insert(0, str(user_dir))
    try:
        import my_rewards
    finally:
        sys.path.remove(str(user_dir))
    arguments = trial_arguments(dataset)  # what TRL's GRPOTrainer passes
    assert my_rewards.passes(**arguments) == [1.0, 1.0]
    assert my_rewards.reads_answer(**arguments) == [1.0, 1.0]


def test_a_hub_style_data_sets_columns_reach_a_reward(tiny_model, tmp_path, user_dir):
    """A parquet data set loaded through `datasets.load_dataset`, as a Hub name is; it has no 'main' configuration,
    so DATASET_CONFIG is set empty."""
    env = check_env(tiny_model, tmp_path, user_dir, DATASET=str(user_dir / "hub-style"), DATASET_CONFIG="")
    settings = checked_settings(env)  # the reward was called with the data's columns: no problem
    assert settings.dataset_config == ""
    dataset = load_prompts(settings.dataset, settings.dataset_config, "train", settings.system_prompt)
    assert dataset["test_cases"] == [row["test_cases"] for row in ROWS]
    assert dataset["solution"] == [row["answer"] for row in ROWS]


def test_gsm8k_style_answers_keep_their_column_and_give_a_normalised_solution():
    raw = datasets.Dataset.from_list([{"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4", "level": "easy"}])
    dataset, skipped = to_prompts(raw, "")
    assert skipped == 0
    assert dataset[0] == {"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4", "level": "easy", "solution": "4",
                          "prompt": [{"role": "user", "content": "2 + 2?"}]}


def test_a_conversational_prompt_is_taken_as_written(tmp_path):
    conversation = [{"role": "user", "content": "What is 2 + 3?"}]
    with_system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "2 + 2?"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": conversation, "answer": "5"},
        {"prompt": with_system, "answer": "4"},
        {"prompt": "What is 1 + 1?", "answer": "2"},  # text beside conversations: a user message
        {"prompt": [{"role": "assistant", "content": "hi"}], "answer": "0"}]))  # nothing asked: skipped
    dataset = load_prompts(str(path), "", "train", "Be brief.")
    assert dataset["prompt"] == [[{"role": "system", "content": "Be brief."}, *conversation], with_system,
                                 [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 1 + 1?"}]]
    # and from a data set in TRL's conversational format, as a Hub data set holds it
    hub, skipped = to_prompts(datasets.Dataset.from_list([{"prompt": conversation, "solution": "5"}]), "")
    assert skipped == 0 and hub[0]["prompt"] == conversation and hub[0]["solution"] == "5"


def test_empty_system_prompt_and_data_set_config_mean_none():
    assert (Settings.from_env({}).system_prompt, Settings.from_env({}).dataset_config) == (
        "Solve the problem. Put the final answer in \\boxed{}.", "main")
    settings = Settings.from_env({"SYSTEM_PROMPT": "", "DATASET_CONFIG": ""})
    assert (settings.system_prompt, settings.dataset_config) == ("", "")
    dataset = load_prompts("sample", settings.dataset_config, "train", settings.system_prompt)
    assert all(len(prompt) == 1 and prompt[0]["role"] == "user" for prompt in dataset["prompt"])
    assert Settings.from_env({"MAX_STEPS": ""}).max_steps == 500  # elsewhere empty still means the default


# ------------------------------------------------------------------ the rewards' trial call at start
@pytest.mark.parametrize("reward, fragments", [
    ("my_rewards.strict", ["reward 'my_rewards.strict' cannot be called", "unexpected keyword argument",
                           "Add **kwargs to its parameters"]),
    ("my_rewards.needs_column", ["reward 'my_rewards.needs_column' cannot be called",
                                 "The data has no column 'unit_tests'"]),
])
def test_a_reward_that_cannot_take_the_data_stops_the_start_named(tiny_model, tmp_path, user_dir, reward, fragments):
    result, seconds = run_check(check_env(tiny_model, tmp_path, user_dir, REWARD_FUNCS=f"accuracy,{reward}"))
    assert result.returncode == 2, result.stdout + result.stderr
    problems = [line for line in result.stderr.splitlines() if "REWARD_FUNCS" in line]
    assert len(problems) == 1, result.stderr  # accuracy takes the data: only the wrong one is named
    for fragment in fragments + ["question, answer, test_cases, difficulty, solution"]:
        assert fragment in problems[0], problems[0]
    assert "Traceback" not in result.stderr
    print(f"exit 2 after {seconds:.1f} s")


def test_a_reward_that_raises_on_the_placeholder_only_warns(tiny_model, tmp_path, user_dir):
    result, _ = run_check(check_env(tiny_model, tmp_path, user_dir, REWARD_FUNCS="my_rewards.raises"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raised RuntimeError on the start-up check's placeholder completion" in result.stderr


# ------------------------------------------------------------------ user modules are not shadowed
@pytest.mark.parametrize("module", ["rewards", "data"])
def test_a_user_module_named_like_the_trainers_is_the_one_imported(tiny_model, tmp_path, user_dir, module):
    # the container runs launch.py from /app/trainer, whose rewards.py and data.py Python would find first
    result, _ = run_check(check_env(tiny_model, tmp_path, user_dir, REWARD_FUNCS=f"{module}.passes"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"rewards {module}.passes" in result.stdout


def test_the_entry_script_imports_the_users_module_too(tiny_model, tmp_path, user_dir):
    """train_grpo_vllm.py (what launch.py starts, once per rank) passes its own checks with the user's rewards.py,
    then waits for a server that is not there: exit 1 (the server), not 2 (the settings)."""
    env = check_env(tiny_model, tmp_path, user_dir, REWARD_FUNCS="rewards.passes", VLLM_WAIT_TIMEOUT="1",
                    VLLM_MAX_RETRIES="1", VLLM_RETRY_MAX_WAIT="0.1")
    result = subprocess.run([sys.executable, "train_grpo_vllm.py"], cwd=REPO / "trainer", env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "REWARD_FUNCS:" not in output and "cannot import" not in output


# ------------------------------------------------------------------ the check-only command
def test_check_command_on_a_good_and_a_bad_env_file(tiny_model, tmp_path, user_dir):
    """A .env through compose's own parser into the trainer's environment, as `docker compose run --rm --no-deps
    trainer python launch.py --check` gives it: exit 0 with a summary, or exit 2 naming each problem."""
    good = ((REPO / ".env.example").read_text() + f"MODEL_NAME={tiny_model}\nDATASET=sample\nTORCH_DTYPE=float32\n"
            "ATTN_IMPLEMENTATION=eager\nGRADIENT_ACCUMULATION_STEPS=8\nNUM_GENERATIONS=4\nEVAL_STEPS=0\n")
    bad = good + "NUM_GENERATIONS=1\nREWARD_FUNCS=accuracy,nope\nLEARNING_RATE=fast\n"
    outcomes = {}
    for name, text in (("good", good), ("bad", bad)):
        (tmp_path / name).mkdir()
        env = container_env(compose_config(tmp_path / name, text)["services"]["trainer"])
        # the container's volumes are /workspace/runs and /workspace/hf-cache: here, folders of the test's own
        env.update(PATH=os.environ["PATH"], PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HOME=str(tmp_path),
                   RUNS_DIR=str(tmp_path / "runs"), HF_HOME=str(tmp_path / "hf-cache"))
        outcomes[name] = run_check(env)
    (good_result, good_seconds), (bad_result, bad_seconds) = outcomes["good"], outcomes["bad"]
    assert good_result.returncode == 0, good_result.stderr[-3000:]
    assert good_result.stdout.startswith("settings OK") and "http://vllm:8000" in good_result.stdout
    assert bad_result.returncode == 2, bad_result.stderr[-3000:]
    for fragment in ("NUM_GENERATIONS='1': must be >= 2", "unknown reward 'nope'", "LEARNING_RATE='fast'"):
        assert fragment in bad_result.stderr, fragment
    print(f"--check: exit 0 after {good_seconds:.1f} s, exit 2 after {bad_seconds:.1f} s")


def test_the_trainer_command_stops_a_wrong_env_in_seconds_with_no_server_at_all(tiny_model, tmp_path, user_dir):
    """The container's command with nothing listening where the server would be, and 30 minutes to wait for it: a
    wrong setting still ends it at once, before any wait."""
    env = check_env(tiny_model, tmp_path, user_dir, VLLM_WAIT_TIMEOUT="1800", REWARD_FUNCS="my_rewards.strict",
                    LORA_TARGET_MODULES="q_proj,foo_proj")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "launch.py"], cwd=REPO / "trainer", env=env, capture_output=True,
                            text=True, timeout=CHECK_TIMEOUT)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert "my_rewards.strict" in result.stderr and "'foo_proj' matches no module" in result.stderr
    # the checks came first: no wait for the server began (that wait, 1800 s, would outlast CHECK_TIMEOUT)
    assert "waiting for vLLM server" not in result.stdout + result.stderr
    print(f"exit 2 after {seconds:.1f} s")


def test_the_placeholder_completion_has_the_training_shape():
    dataset = load_prompts("sample", "", "train", "")
    (completion, *_), prompts = trial_arguments(dataset)["completions"], trial_arguments(dataset)["prompts"]
    assert isinstance(prompts[0], list) and len(completion) == 1
    assert (completion[0]["role"], type(completion[0]["content"])) == ("assistant", str)
    assert completion[0]["thinking"] == ""  # a key a model's completions may add reads as empty, not KeyError
