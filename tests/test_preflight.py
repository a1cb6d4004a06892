"""The checks the trainer makes before it waits for the vLLM server: property-based tests (Hypothesis) over every
setting and over data files show that no input ends in a traceback, only in a start or in exit 2 with messages
naming the settings; and the entry script stops with exit 2 without ever contacting the server."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO
from trainer.config import Choice, Settings, SettingsError
from trainer.data import DatasetError, load_prompts
from trainer.preflight import checked_settings

ENV_NAMES = [f.metadata["env"] for f in dataclasses.fields(Settings)]
TYPES = typing.get_type_hints(Settings)
FAST = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No Hub: a name that is not cached must fail at once, as in a container started with HF_HUB_OFFLINE=1."""
    import datasets
    import huggingface_hub.constants

    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    contents = {
        "good.jsonl": b'{"question": "1+1?", "answer": "2"}\n',
        "empty.jsonl": b"",
        "blank.jsonl": b"\n  \n",
        "malformed.jsonl": b'{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n',
        "latin1.jsonl": '{"question": "caf\u00e9?", "answer": "1"}\n'.encode("latin-1"),
        "list.jsonl": b'"just text"\n',
        "array-of-numbers.json": b'[1, 2]',
        "wrong-types.jsonl": b'{"question": 7, "answer": [1]}\n{"question": null, "answer": {"a": 1}}\n',
        "no-fields.jsonl": b'{"text": "hi"}\n',
        "array.json": b'[{"problem": "3?", "solution": 3}]',
    }
    paths = {}
    for name, data in contents.items():
        (root / name).write_bytes(data)
        paths[name] = root / name
    paths["a-file"] = root / "good.jsonl"
    paths["runs"] = root / "runs"
    paths["model"] = tiny_model
    return paths


def comma_list(items) -> st.SearchStrategy[str]:
    return st.lists(items, max_size=4).map(",".join)


def any_text() -> st.SearchStrategy[str]:
    # environment values cannot hold NUL; non-UTF-8 bytes reach Python as lone surrogates, so those are in
    return st.text(alphabet=st.characters(exclude_characters="\x00"), max_size=40)


def setting_values(name: str, files: dict[str, Path]) -> st.SearchStrategy[str | None]:
    """Values for one setting: well-formed ones, edge cases of its type and arbitrary text. Settings that name
    files, modules or Hub entries draw from ones that exist or cannot exist, never from a stranger's module."""
    field = next(f for f in dataclasses.fields(Settings) if f.metadata["env"] == name)
    annotation, check = TYPES[field.name], field.metadata["check"]
    paths = [str(p) for p in files.values()]
    special = {
        "MODEL_NAME": st.sampled_from([str(files["model"]), "/no/such/model", "./relative/model", "no-such-org/model",
                                       "not a name", str(files["good.jsonl"]), str(files["runs"].parent)]),
        "DATASET": st.sampled_from(["sample", "no-such-org/no-such-set", "/no/such.jsonl", *paths]),
        "EVAL_DATASET": st.sampled_from(["", "sample", "no-such-org/no-such-set", "/no/such.jsonl", *paths]),
        "RUNS_DIR": st.sampled_from([str(files["runs"]), str(files["a-file"]), str(files["a-file"] / "sub"), ""]),
        "REWARD_FUNCS": comma_list(st.sampled_from(["accuracy", "boxed_format", "think_format", "nope", "",
                                                    "tests.rewards.known_word_fraction", "tests.rewards.missing",
                                                    "no_such_module.f", "os.sep", ".x", "a..b", "tests."])),
        "LORA_TARGET_MODULES": comma_list(st.sampled_from(["q_proj", "v_proj", "o_proj", "mlp", "foo_proj",
                                                           "lm_head", "embed_tokens", "layers", "", " "])),
    }
    if name in special:
        return st.none() | special[name]
    if isinstance(check, Choice):
        typed = comma_list(st.sampled_from(check.choices)) if check.each else st.sampled_from(check.choices)
    elif annotation is bool:
        typed = st.sampled_from(["true", "false", "1", "0", "yes", "off", "maybe"])
    elif annotation is int:
        typed = st.integers(-10, 10).map(str) | st.integers(-2**70, 2**70).map(str) | st.just("9" * 5000)
    elif annotation is float:
        typed = (st.floats(-1e3, 1e3).map(repr) | st.floats().map(repr) |
                 st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_0.5"]))
    elif typing.get_origin(annotation) is tuple:
        typed = comma_list(st.floats().map(repr) | any_text())
    else:
        typed = any_text()
    return st.none() | typed | any_text()


@st.composite
def environments(draw, files) -> dict[str, str]:
    env = {}
    for name in ENV_NAMES:
        value = draw(setting_values(name, files))
        if value is not None:
            env[name] = value
    return env


def assert_names_settings(exc: SettingsError) -> None:
    assert exc.problems
    for problem in exc.problems:
        assert any(name in problem for name in ENV_NAMES), f"no setting named in: {problem}"


def test_no_setting_value_makes_parsing_raise(files):
    @FAST
    @given(environments(files))
    def check(env):
        parsed, problems = Settings.parse(env)
        assert isinstance(parsed, Settings)
        for problem in problems:
            assert any(name in problem for name in ENV_NAMES), problem

    check()


def test_no_environment_ends_in_a_traceback_before_the_server(files):
    """Every setting at once, data, rewards, model and targets included: a start, or exit 2's messages."""
    @settings(FAST, max_examples=150)
    @given(environments(files))
    def check(env):
        env.setdefault("MODEL_NAME", str(files["model"]))  # the default is a Hub model this machine cannot load
        try:
            s = checked_settings(env)
        except SettingsError as exc:
            assert_names_settings(exc)
            return
        assert s.num_generations >= 2 and s.sequences_per_step % s.num_generations == 0
        assert s.reward_funcs and s.lora_target_modules

    check()


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                                             inner, max_size=3),
                        max_leaves=6)


def rows() -> st.SearchStrategy[dict]:
    field_names = st.sampled_from(["question", "problem", "prompt", "answer", "solution", "text"]) | st.text(max_size=8)
    huge = st.integers(0, 3_000_000).map(lambda n: "7 " * (n // 2))
    return st.dictionaries(field_names, json_values() | huge | st.text(), max_size=4)


def file_contents() -> st.SearchStrategy[bytes]:
    """JSON Lines as a user may write them: rows of any shape, lines broken or not JSON, odd encodings."""
    line = (rows().map(lambda r: json.dumps(r, ensure_ascii=False)) | json_values().map(json.dumps) |
            st.text(max_size=30) | st.just("") | st.just("{\"question\": \"\\ud800\", \"answer\": 1}"))
    text = st.lists(line, max_size=6).map("\n".join)
    return (text.map(lambda t: t.encode("utf-8", "surrogatepass")) | text.map(lambda t: t.encode("utf-16")) |
            st.binary(max_size=200) | st.lists(rows(), max_size=4).map(lambda r: json.dumps(r).encode()))


def test_no_data_file_ends_in_a_traceback(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")

    @settings(FAST, max_examples=300)
    @given(file_contents(), st.sampled_from([".jsonl", ".json"]), st.sampled_from(["DATASET", "EVAL_DATASET"]))
    def check(content, suffix, setting):
        path = root / f"data{suffix}"
        path.write_bytes(content)
        try:
            dataset = load_prompts(str(path), "", "train", "", setting=setting)
        except DatasetError as exc:
            assert str(exc).startswith(setting), str(exc)
            return
        assert len(dataset) >= 1
        for row in dataset:
            # data without an answer column loads without `solution` (the rewards' trial call names who needs it)
            assert row["prompt"][-1]["content"].strip() and isinstance(row.get("solution", ""), str)

    check()


@pytest.mark.parametrize("name, message", [
    ("empty.jsonl", "is empty: write one JSON object per line"),
    ("blank.jsonl", "is empty"),
    ("malformed.jsonl", "not valid JSON on line 2"),
    ("latin1.jsonl", "line 1 is not UTF-8 text: save the file as UTF-8"),
    ("list.jsonl", "line 1 is not a JSON object"),
    ("array-of-numbers.json", "items 1, 2 are not JSON objects"),
    ("wrong-types.jsonl", "no usable rows"),
    ("no-fields.jsonl", "they need one of ('question', 'problem', 'prompt')"),
])
def test_each_broken_data_file_is_named_with_its_fix(files, name, message):
    for setting in ("DATASET", "EVAL_DATASET"):
        with pytest.raises(DatasetError) as err:
            load_prompts(str(files[name]), "", "train", "", setting=setting)
        assert str(err.value).startswith(f"{setting}") and message in str(err.value)


def test_a_json_array_and_numbers_as_answers_load(files):
    assert load_prompts(str(files["array.json"]), "", "train", "")[0]["solution"] == "3"


@pytest.mark.parametrize("env, message", [
    ({"LORA_TARGET_MODULES": "q_proj,nonexistent_proj"}, "LORA_TARGET_MODULES: 'nonexistent_proj' matches no module"),
    ({"LORA_TARGET_MODULES": "mlp"}, "'mlp' names LlamaMLP modules, which LoRA cannot wrap"),
    ({"LORA_TARGET_MODULES": ","}, "LORA_TARGET_MODULES=',': is empty"),
    ({"MODEL_NAME": "/no/such/model"}, "MODEL_NAME='/no/such/model': no such directory"),
    ({"MODEL_NAME": "no-such-org/no-such-model"}, "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1"),
    ({"MODEL_NAME": "not a name"}, "neither an existing directory nor a Hub name"),
    ({"DATASET": "/no/such.jsonl"}, "DATASET='/no/such.jsonl': no such file"),
    ({"EVAL_DATASET": "/no/such.jsonl"}, "EVAL_DATASET='/no/such.jsonl': no such file"),
    ({"DATASET": "no-such-org/no-such-set"}, "DATASET='no-such-org/no-such-set'"),
    ({"REWARD_FUNCS": "accuracy,nope"}, "REWARD_FUNCS: unknown reward 'nope'"),
    ({"REWARD_FUNCS": "os.sep"}, "REWARD_FUNCS: 'os.sep' is a str, not a function"),
])
def test_each_problem_found_before_the_server_names_its_setting(files, env, message):
    base = {"MODEL_NAME": str(files["model"]), "DATASET": "sample", "RUNS_DIR": str(files["runs"])}
    with pytest.raises(SettingsError) as err:
        checked_settings({**base, **env})
    assert message in str(err.value)


def test_an_unreachable_hub_is_named_at_once(files):
    """No network and HF_HUB_OFFLINE unset: one quick request tells, instead of the Hub client's retries."""
    import datasets
    import huggingface_hub.constants

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", False), \
                mock.patch.object(datasets.config, "HF_HUB_OFFLINE", False), \
                mock.patch.object(huggingface_hub.constants, "ENDPOINT", endpoint):
            started = time.monotonic()
            with pytest.raises(SettingsError) as err:
                checked_settings({"MODEL_NAME": "no-such-org/no-such-model", "DATASET": "no-such-org/no-such-set",
                                  "RUNS_DIR": str(files["runs"])})
            seconds = time.monotonic() - started
            assert huggingface_hub.constants.HF_HUB_OFFLINE is False, "the check must not leave the process offline"
    unreachable = f"not in the local Hugging Face cache, and the Hub cannot be reached ({endpoint}: ConnectionError)"
    assert err.value.problems == [f"DATASET='no-such-org/no-such-set': {unreachable}: check the network, or use a "
                                  ".jsonl file or 'sample'",
                                  f"MODEL_NAME='no-such-org/no-such-model': {unreachable}: check the network, or "
                                  "set MODEL_NAME to a local directory"]
    assert seconds < 10


def test_runs_dir_that_is_a_file_is_named(files):
    for runs_dir, message in [(files["a-file"], "is a file, not a directory"),
                              (files["a-file"] / "sub", "is a file, so no directory can be made under it")]:
        with pytest.raises(SettingsError, match=message):
            checked_settings({"MODEL_NAME": str(files["model"]), "DATASET": "sample", "RUNS_DIR": str(runs_dir)})


def test_entry_script_lists_every_problem_and_exits_2_without_contacting_the_server(files, tmp_path):
    """The new user's first start with no server up: every problem at once, exit 2, the server never asked."""
    with socket.socket() as server:  # stands where the vLLM server would: any connection to it is counted
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
               "VLLM_SERVER_HOST": "127.0.0.1", "VLLM_SERVER_PORT": str(server.getsockname()[1]),
               "VLLM_WAIT_TIMEOUT": "1800", "MODEL_NAME": str(files["model"]), "RUNS_DIR": str(files["a-file"]),
               "NUM_GENERATIONS": "0", "DATASET": str(files["malformed.jsonl"]),
               "EVAL_DATASET": str(files["empty.jsonl"]), "REWARD_FUNCS": "accuracy,nope",
               "LORA_TARGET_MODULES": "q_proj,foo_proj"}
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(REPO / "trainer/train_grpo_vllm.py")], env=env,
                                capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for fragment in ("NUM_GENERATIONS='0': must be >= 2", "RUNS_DIR=", "REWARD_FUNCS: unknown reward 'nope'",
                     "not valid JSON on line 2", "EVAL_DATASET=", "is empty", "'foo_proj' matches no module"):
        assert fragment in result.stderr, fragment
    print(f"exit 2 after {seconds:.1f} s (interpreter start and imports included)")
