#!/usr/bin/env python3
"""Entrypoint of the vLLM container: builds the OpenAI-compatible server's command line from the environment.

    serve.py                  # validate, then exec the server (it becomes the process `docker compose down` stops)
    serve.py --print-command  # validate and print the command, one argument per line, without running it

Every setting is an environment variable (see .env.example); a wrong value stops the start with a message naming
it. The API key (VLLM_API_KEY) is passed to vLLM through its environment, never the command line.
Runtime LoRA loading and `--logprobs-mode processed_logprobs` are always on: the trainer depends on both.
CUDA graphs are on (VLLM_ENFORCE_EAGER=false) with one compilation pass off (COMPILATION_CONFIG, below).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
OWN_SETTINGS = ("VLLM_TENSOR_PARALLEL_SIZE", "VLLM_SERVER_PORT", "VLLM_HOST", "VLLM_DTYPE", "VLLM_MAX_MODEL_LEN",
                "VLLM_MAX_NUM_SEQS", "VLLM_GPU_MEMORY_UTILIZATION", "VLLM_KV_CACHE_DTYPE", "VLLM_MAX_LORA_RANK",
                "VLLM_MAX_LORAS", "VLLM_ENFORCE_EAGER", "VLLM_ATTENTION_BACKEND", "VLLM_EXTRA_ARGS", "VLLM_API_KEY")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# With CUDA graphs vLLM 0.26.0 compiles the model and, at TP 2, picks FlashInfer's all-reduce + RMSNorm fusion,
# which crashed with an illegal memory access on 2 x H200. Without that one pass, CUDA graphs ran the stack's step
# on 2 x H100 at 2.8k tok/s, 13x eager mode (BENCHMARKS.md).
COMPILATION_CONFIG = '{"pass_config":{"fuse_allreduce_rms":false}}'


class ConfigError(ValueError):
    pass


def _int(env, name, default, low, high=None):
    raw = env.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name}={value}: must be between {low} and {high}" if high else f"{name}={value}: must be >= {low}")
    return value


def _float(env, name, default, low, high):
    raw = env.get(name, "").strip() or str(default)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if not low < value <= high:
        raise ConfigError(f"{name}={value}: must be in ({low}, {high}]")
    return value


def _bool(env, name, default):
    raw = env.get(name, "").strip().lower() or str(default).lower()
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false")


def _choice(env, name, default, choices):
    value = env.get(name, "").strip() or default
    if value not in choices:
        hint = " ('bf16' is not a vLLM value: 'auto' keeps the model's dtype)" if name == "VLLM_KV_CACHE_DTYPE" else ""
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}{hint}")
    return value


def visible_gpus() -> int | None:
    """GPUs this container sees, or None where that cannot be told (no NVIDIA tools: a CPU build)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def build_command(env: dict[str, str], gpus: int | None) -> list[str]:
    model = env.get("MODEL_NAME", "").strip() or "openai/gpt-oss-20b"
    tp = _int(env, "VLLM_TENSOR_PARALLEL_SIZE", 2, 1)
    if gpus is not None and tp > gpus:
        raise ConfigError(f"VLLM_TENSOR_PARALLEL_SIZE={tp} but this container sees {gpus} GPU(s): "
                          "lower it or give the vllm service more GPUs (NVIDIA_VISIBLE_DEVICES / deploy.resources)")
    rank = _int(env, "VLLM_MAX_LORA_RANK", 8, 1)
    if rank not in LORA_RANKS:
        raise ConfigError(f"VLLM_MAX_LORA_RANK={rank}: vLLM accepts {', '.join(map(str, LORA_RANKS))}")
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", env.get("VLLM_HOST", "").strip() or "0.0.0.0",
        "--port", str(_int(env, "VLLM_SERVER_PORT", 8000, 1, 65535)),
        "--tensor-parallel-size", str(tp),
        "--dtype", _choice(env, "VLLM_DTYPE", "auto", DTYPES),
        "--max-model-len", str(_int(env, "VLLM_MAX_MODEL_LEN", 4096, 16)),
        "--max-num-seqs", str(_int(env, "VLLM_MAX_NUM_SEQS", 16, 1)),
        "--gpu-memory-utilization", str(_float(env, "VLLM_GPU_MEMORY_UTILIZATION", 0.35, 0.0, 1.0)),
        "--kv-cache-dtype", _choice(env, "VLLM_KV_CACHE_DTYPE", "auto", KV_CACHE_DTYPES),
        "--enable-lora", "--max-lora-rank", str(rank),
        "--max-loras", str(_int(env, "VLLM_MAX_LORAS", 2, 1)),
        "--logprobs-mode", "processed_logprobs",
    ]
    extra = extra_args(env)
    if _bool(env, "VLLM_ENFORCE_EAGER", False):
        command.append("--enforce-eager")
    elif not any(arg.startswith(("--compilation-config", "-cc")) for arg in extra):  # the user's own wins
        command += ["--compilation-config", COMPILATION_CONFIG]
    if backend := env.get("VLLM_ATTENTION_BACKEND", "").strip():
        command += ["--attention-backend", backend]
    return command + extra


def extra_args(env: dict[str, str]) -> list[str]:
    """VLLM_EXTRA_ARGS split as a shell would. JSON values (--compilation-config, --speculative-config, ...) must
    sit in single quotes: unquoted, the shell-style split eats their double quotes and vLLM rejects what is left."""
    raw = env.get("VLLM_EXTRA_ARGS", "")
    try:
        args = shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"VLLM_EXTRA_ARGS={raw!r}: {exc} (quotes must be balanced)") from None
    for arg in args:
        if arg.startswith("{"):
            try:
                json.loads(arg)
            except ValueError:
                raise ConfigError(f"VLLM_EXTRA_ARGS: {arg!r} is not JSON; put JSON values in single quotes, e.g. "
                                  f"--compilation-config '{COMPILATION_CONFIG}'") from None
    return args


def server_environment(env: dict[str, str]) -> dict[str, str]:
    """The server's environment: runtime LoRA on; this file's own settings removed (vLLM warns about unknown
    VLLM_* names), except VLLM_API_KEY, which vLLM reads itself, keeping the key off the command line (`ps`)."""
    child = {k: v for k, v in env.items() if k not in OWN_SETTINGS or k == "VLLM_API_KEY"}
    if not child.get("VLLM_API_KEY"):
        child.pop("VLLM_API_KEY", None)
    return {**child, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    try:
        command = build_command(env, visible_gpus())
    except ConfigError as exc:
        print(f"error: {exc} (fix it in .env)", file=sys.stderr)
        return 2
    if "--print-command" in argv:
        print("\n".join(command))
        return 0
    print("starting: " + shlex.join(command), flush=True)
    os.execvpe(command[0], command, server_environment(env))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
