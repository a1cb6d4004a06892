import dataclasses
import subprocess
import sys

import pytest

from conftest import REPO
from trainer.config import Settings, SettingsError, help_text


def test_defaults_match_the_product():
    s = Settings.from_env({})
    assert (s.vllm_server_host, s.vllm_server_port, s.model_name) == ("localhost", 8000, "openai/gpt-oss-20b")
    assert s.run_dir.as_posix() == "runs/grpo_gptoss20b_lora4_tes"
    assert (s.lora_rank, s.micro_batch_size) == (4, 1)
    assert s.sequences_per_step == 128 and s.prompts_per_step == 16
    assert (s.trainer_processes, s.attn_implementation) == (0, "auto")  # one rank per GPU, FA4 where it runs


FOUR_SERVERS = "http://a:8000,http://b:8000,http://c:8000,http://d:8000"


def test_each_server_is_held_to_its_share_of_a_round():
    s = Settings.from_env({"GRADIENT_ACCUMULATION_STEPS": "512", "VLLM_SERVER_URLS": FOUR_SERVERS})  # 128 each: accepted
    assert (s.sequences_per_round, s.sequences_per_server) == (512, 128)


def test_environment_overrides_are_typed():
    s = Settings.from_env({"VLLM_SERVER_PORT": "9000", "ATTN_IMPLEMENTATION": "kernels-community/vllm-flash-attn3",
                           "LORA_TARGET_MODULES": "q_proj, v_proj", "REWARD_WEIGHTS": "1,0.5",
                           "REWARD_FUNCS": "accuracy,boxed_format", "GRADIENT_CHECKPOINTING": "false"})
    assert s.vllm_server_port == 9000 and s.attn_implementation == "kernels-community/vllm-flash-attn3"
    assert s.lora_target_modules == ("q_proj", "v_proj") and s.reward_weights == (1.0, 0.5)
    assert s.gradient_checkpointing is False


@pytest.mark.parametrize("env, fragment", [
    ({"VLLM_SERVER_PORT": "http"}, "VLLM_SERVER_PORT='http': expected an integer"),
    ({"VLLM_SERVER_PORT": "70000"}, "VLLM_SERVER_PORT='70000': must be between 1 and 65535"),
    ({"LORA_RANK": "0"}, "LORA_RANK='0'"),
    ({"TEMPERATURE": "hot"}, "TEMPERATURE='hot': expected a finite number"),
    ({"BETA": "inf"}, "BETA='inf': expected a finite number"),
    ({"LEARNING_RATE": "nan"}, "LEARNING_RATE='nan': expected a finite number"),
    ({"SEED": str(2**32)}, "SEED='4294967296': must be between 0 and 4294967295"),
    ({"VLLM_REQUEST_TIMEOUT": "1e300"}, "VLLM_REQUEST_TIMEOUT='1e300': must be between 1 and"),
    ({"LOSS_TYPE": "ppo"}, "LOSS_TYPE='ppo': must be one of grpo, dapo, dr_grpo, bnpo"),
    ({"IMPORTANCE_SAMPLING": "tis"}, "IMPORTANCE_SAMPLING='tis': must be one of token_truncate,"),
    ({"TORCH_DTYPE": "bf16"}, "TORCH_DTYPE='bf16': must be one of bfloat16, float32"),
    ({"NUM_GENERATIONS": "3"}, "must be a multiple of NUM_GENERATIONS=3"),
    ({"REWARD_WEIGHTS": "1,2,3"}, "REWARD_WEIGHTS has 3 values but REWARD_FUNCS names 2"),
    ({"RUN_NAME": "../escape"}, "RUN_NAME='../escape'"),
    ({"REPORT_TO": "none,wandb"}, "'none' cannot be combined"),
    ({"REPORT_TO": "mlflow"}, "unknown value 'mlflow'"),
    ({"GRADIENT_CHECKPOINTING": "maybe"}, "GRADIENT_CHECKPOINTING='maybe': expected true or false"),
    ({"GENERATION_BATCH_SIZE": "64"}, "GENERATION_BATCH_SIZE=64 must be a multiple of MICRO_BATCH_SIZE x "
                                      "GRADIENT_ACCUMULATION_STEPS = 128"),
    ({"GENERATION_BATCH_SIZE": "256"}, "asks for 256 sequences (GENERATION_BATCH_SIZE, or MICRO_BATCH_SIZE x "
                                       "GRADIENT_ACCUMULATION_STEPS) but VLLM_MAX_NUM_SEQS=128"),
    ({"GRADIENT_ACCUMULATION_STEPS": "160"}, "asks for 160 sequences"),
    ({"GRADIENT_ACCUMULATION_STEPS": "520", "VLLM_SERVER_URLS": FOUR_SERVERS},
     "asks for 136 sequences per server (520 over the 4 VLLM_SERVER_URLS)"),
    ({"MAX_OFF_POLICY_STEPS": "2"}, "MAX_OFF_POLICY_STEPS=2 keeps up to 3 adapter versions in flight but "
                                    "VLLM_MAX_LORAS=2: raise VLLM_MAX_LORAS to 3"),
    ({"VLLM_SERVER_URLS": "vllm:8000"}, "'vllm:8000' is not a server's base URL: write each as http://host:port"),
    ({"VLLM_SERVER_URLS": "http://a:8000/v1"}, "'http://a:8000/v1' has a path: give the base URL only"),
    ({"VLLM_SERVER_URLS": "http://a:80000"}, "'http://a:80000' is not a URL"),
    ({"VLLM_SERVER_URLS": "http://a:8000,http://A:8000/"}, "'http://A:8000/' is listed twice"),
])
def test_wrong_values_name_the_setting(env, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert fragment in str(err.value)


def test_server_urls_default_to_the_one_server():
    assert Settings.from_env({"VLLM_SERVER_HOST": "vllm", "VLLM_SERVER_PORT": "9000"}).server_urls == ("http://vllm:9000",)
    several = Settings.from_env({"VLLM_SERVER_URLS": " http://a:8000/ , https://b.example:8443 "})
    assert several.server_urls == ("http://a:8000", "https://b.example:8443")


def test_all_problems_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"LORA_RANK": "x", "TOP_P": "2"})
    assert "LORA_RANK" in str(err.value) and "TOP_P" in str(err.value)


@pytest.mark.parametrize("generations", ["0", "-4", "many"])
def test_a_wrong_group_size_is_listed_with_the_others_not_divided_by(generations):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"NUM_GENERATIONS": generations, "GRADIENT_ACCUMULATION_STEPS": "7", "LOSS_TYPE": "x"})
    assert err.value.problems[0].startswith(f"NUM_GENERATIONS={generations!r}")
    assert len(err.value.problems) == 2 and "LOSS_TYPE='x'" in err.value.problems[1]


def test_api_key_never_printed():
    assert "s3cret" not in Settings.from_env({"VLLM_API_KEY": "s3cret"}).describe()


def test_help_lists_every_setting_with_default():
    text = help_text()
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"] in text
    result = subprocess.run([sys.executable, str(REPO / "trainer/train_grpo_vllm.py"), "--help"],
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "VLLM_SERVER_HOST" in result.stdout and "default: localhost" in result.stdout
    lines = result.stdout.splitlines()
    for name, allowed in [("LOSS_TYPE", "grpo, dapo, dr_grpo, bnpo"), ("TORCH_DTYPE", "bfloat16, float32"),
                          ("LR_SCHEDULER", "constant, constant_with_warmup, linear, cosine"),
                          ("IMPORTANCE_SAMPLING", "token_truncate, token_mask, sequence_truncate, sequence_mask, off"),
                          ("REASONING_EFFORT", "(empty), low, medium, high"),
                          ("REPORT_TO", "none, tensorboard, wandb, trackio")]:
        line = next(line for line in lines if line.split()[:1] == [name])
        assert line.endswith(f"allowed: {allowed}"), line


def test_bad_env_stops_the_entry_script_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "trainer/train_grpo_vllm.py")], capture_output=True,
                            text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "LORA_RANK": "-1",
                                            "RUNS_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "LORA_RANK='-1'" in result.stderr and "fix them in .env" in result.stderr


@pytest.mark.parametrize("value, correction, mode", [
    ("token_truncate", True, "token_truncate"), ("sequence_mask", True, "sequence_mask"), ("off", False, None)])
def test_importance_sampling_reaches_trl(value, correction, mode):
    from trainer.recipe import grpo_config

    args = grpo_config(Settings.from_env({"IMPORTANCE_SAMPLING": value}), use_cpu=True)
    assert args.vllm_importance_sampling_correction is correction
    assert mode is None or args.vllm_importance_sampling_mode == mode


def test_flex_attention_on_a_model_split_over_gpus_is_refused_before_loading(monkeypatch):
    import torch

    from trainer.model import load_model

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # what the trainer container sees
    with pytest.raises(SettingsError, match="ATTN_IMPLEMENTATION=flex_attention .* use eager"):
        load_model("not/loaded", "bfloat16", "flex_attention", 30, gradient_checkpointing=True)
