#!/usr/bin/env python3
"""Entrypoint of the vLLM container: builds the OpenAI-compatible server's command line from the environment.

    serve.py                  # validate, then exec the server (it becomes the process `docker compose down` stops)
    serve.py --print-command  # validate and print the command, one argument per line, without running it
    serve.py --help           # every setting, its default, allowed values and meaning

Every setting is an environment variable (the compose `.env`), declared once below in `ServerSettings`; all are
checked at start and every wrong value is named, with what is allowed, before the server starts. The API key
(VLLM_API_KEY) is passed to vLLM through its environment, never the command line. Runtime LoRA loading and
`--logprobs-mode processed_logprobs` are always on: the trainer depends on both.

This file runs in the vLLM image, which holds no trainer package, so it declares its settings in the same style
as trainer/config.py rather than importing it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
# With CUDA graphs vLLM 0.26.0 compiles the model and, at TP 2, picks FlashInfer's all-reduce + RMSNorm fusion,
# which crashed with an illegal memory access on 2 x H200; without that one pass CUDA graphs ran the stack's step
# (their speed against eager mode: BENCHMARKS.md, "How fast is each phase?").
COMPILATION_CONFIG = '{"pass_config":{"fuse_allreduce_rms":false}}'


class ConfigError(ValueError):
    """One or more settings are wrong; `problems` holds one message per setting, each naming it."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def setting(env: str, default: Any, help: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "check": check})


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def fraction(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]: a fraction of each GPU's memory"


@dataclass(frozen=True)
class Choice:
    """A check that a value is one of `choices` (`--help` lists them); `note` is added to the message."""
    choices: tuple
    note: str = ""

    def __call__(self, value: Any) -> str | None:
        return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}{self.note}"


def extra_args_problem(raw: str) -> str | None:
    """VLLM_EXTRA_ARGS is split as a shell would. JSON values (--compilation-config, --speculative-config, ...)
    must sit in single quotes: unquoted, the shell-style split eats their double quotes and vLLM rejects the rest."""
    try:
        args = shlex.split(raw)
    except ValueError as exc:
        return f"{exc} (quotes must be balanced)"
    for arg in args:
        if arg.startswith("{"):
            try:
                json.loads(arg)
            except ValueError:
                return (f"{arg!r} is not JSON; put JSON values in single quotes, e.g. "
                        f"--compilation-config '{COMPILATION_CONFIG}'")
    return None


@dataclass(frozen=True)
class ServerSettings:
    # --- model and network ---
    model_name: str = setting("MODEL_NAME", "openai/gpt-oss-20b", "--model: Hub name or local path (inside the containers); the server and the trainer must use the same one.")
    vllm_host: str = setting("VLLM_HOST", "0.0.0.0", "--host: address the server listens on inside its container; all interfaces, for the trainer on the compose network.")
    vllm_server_port: int = setting("VLLM_SERVER_PORT", 8000, "--port: the server's port on the compose network (the trainer connects to vllm:<port>).", between(1, 65535))
    vllm_api_key: str = setting("VLLM_API_KEY", "", "Shared secret of the trainer and the server (vLLM's --api-key, passed through its environment, not its command line); empty means none. Never logged.")
    # --- GPUs and memory ---
    vllm_tensor_parallel_size: int = setting("VLLM_TENSOR_PARALLEL_SIZE", 2, "--tensor-parallel-size: GPUs the model is split over; at most the GPUs the container sees.", at_least(1))
    vllm_dtype: str = setting("VLLM_DTYPE", "auto", "--dtype: auto keeps the checkpoint's dtype (bf16 for gpt-oss, with MXFP4 experts).", Choice(DTYPES))
    vllm_max_model_len: int = setting("VLLM_MAX_MODEL_LEN", 4096, "--max-model-len: must cover MAX_PROMPT_LENGTH + MAX_COMPLETION_LENGTH (the trainer checks at start).", at_least(16))
    vllm_max_num_seqs: int = setting("VLLM_MAX_NUM_SEQS", 128, "--max-num-seqs: most sequences sampled at once; the trainer checks at start that this server's share of one generation round (GENERATION_BATCH_SIZE) fits.", at_least(1))
    vllm_gpu_memory_utilization: float = setting("VLLM_GPU_MEMORY_UTILIZATION", 0.35, "--gpu-memory-utilization: fraction of each whole GPU vLLM takes (weights + KV cache); the trainer lives in the rest.", fraction)
    vllm_kv_cache_dtype: str = setting("VLLM_KV_CACHE_DTYPE", "auto", "--kv-cache-dtype: auto (the model's dtype) or an fp8 format; 'bf16' is not a vLLM value.", Choice(KV_CACHE_DTYPES, note=" ('bf16' is not a vLLM value: 'auto' keeps the model's dtype)"))
    # --- kernels ---
    vllm_enforce_eager: bool = setting("VLLM_ENFORCE_EAGER", False, "true: --enforce-eager (no CUDA graphs, much slower sampling). false: CUDA graphs, compiled at the first start and cached in the hf-cache volume, with the all-reduce fusion pass that crashed at TP 2 off unless VLLM_EXTRA_ARGS gives its own --compilation-config/-cc. Set true if the server fails while capturing graphs.")
    vllm_attention_backend: str = setting("VLLM_ATTENTION_BACKEND", "", "--attention-backend when set, e.g. FLASH_ATTN or TRITON_ATTN; empty lets vLLM choose.")
    # --- LoRA ---
    vllm_max_lora_rank: int = setting("VLLM_MAX_LORA_RANK", 8, "--max-lora-rank: must be >= LORA_RANK (the trainer checks at start).", Choice(LORA_RANKS))
    vllm_max_loras: int = setting("VLLM_MAX_LORAS", 2, "--max-loras: adapters per batch; the trainer checks at start that it covers the MAX_OFF_POLICY_STEPS + 1 adapter versions overlapped sampling keeps in flight.", at_least(1))
    lora_target_modules: tuple[str, ...] = setting("LORA_TARGET_MODULES", ("q_proj", "k_proj", "v_proj", "o_proj"), "--lora-target-modules: comma-separated modules the trainer's adapter wraps, read by both services. The server adds LoRA kernels to these layers only; without the list vLLM wraps every linear layer, gpt-oss's router and experts included, and decodes through LoRA kernels that only ever add zeros.", lambda v: None if v else "is empty: name at least one module")
    # --- any other vLLM flag ---
    vllm_extra_args: str = setting("VLLM_EXTRA_ARGS", "", "More vLLM flags, split like a shell command line; JSON values in single quotes, e.g. -cc '{\"cudagraph_mode\":\"FULL\"}' (your own -cc/--compilation-config replaces the stack's).", extra_args_problem)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], gpus: int | None) -> "ServerSettings":
        settings, problems = cls.parse(environ, gpus)
        if problems:
            raise ConfigError(problems)
        return settings

    @classmethod
    def parse(cls, environ: Mapping[str, str], gpus: int | None) -> tuple["ServerSettings", list[str]]:
        """The settings and every problem found; a wrong value is replaced by its default so that the other
        settings are still checked, and the check against the GPUs is skipped for a wrong VLLM_TENSOR_PARALLEL_SIZE."""
        values, problems, wrong = {}, [], set()
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            raw = environ.get(env)
            if raw is None or (raw.strip() == "" and f.default != ""):
                continue
            try:
                value = _parse(raw.strip(), types[f.name])
            except ValueError:
                problems.append(f"{env}={raw!r}: expected {_type_name(types[f.name])}")
                wrong.add(env)
                continue
            check = f.metadata["check"]
            message = check(value) if check else None
            if message:
                problems.append(f"{env}={value!r}: {message}")
                wrong.add(env)
                continue
            values[f.name] = value
        settings = cls(**values)
        tp = settings.vllm_tensor_parallel_size
        if "VLLM_TENSOR_PARALLEL_SIZE" not in wrong and gpus is not None and tp > gpus:
            problems.append(f"VLLM_TENSOR_PARALLEL_SIZE={tp} but this container sees {gpus} GPU(s): lower it or "
                            "give the vllm service more GPUs (NVIDIA_VISIBLE_DEVICES / deploy.resources)")
        return settings, problems


# The server's own VLLM_* names, kept from vLLM's environment (it warns about unknown VLLM_* variables)
OWN_SETTINGS = tuple(f.metadata["env"] for f in dataclasses.fields(ServerSettings)
                     if f.metadata["env"].startswith("VLLM_"))


def _parse(raw: str, annotation: Any) -> Any:
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if typing.get_origin(annotation) is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    value = annotation(raw)
    if annotation is float and not math.isfinite(value):  # "nan" and "inf" parse as floats
        raise ValueError(raw)
    return value


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return "a comma-separated list"
    return {bool: "true or false", int: "an integer", float: "a finite number"}.get(annotation, "text")


def visible_gpus() -> int | None:
    """GPUs this container sees, or None where that cannot be told (no NVIDIA tools: a CPU build)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def build_command(env: Mapping[str, str], gpus: int | None) -> list[str]:
    s = ServerSettings.from_env(env, gpus)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", s.model_name,
        "--host", s.vllm_host,
        "--port", str(s.vllm_server_port),
        "--tensor-parallel-size", str(s.vllm_tensor_parallel_size),
        "--dtype", s.vllm_dtype,
        "--max-model-len", str(s.vllm_max_model_len),
        "--max-num-seqs", str(s.vllm_max_num_seqs),
        "--gpu-memory-utilization", str(s.vllm_gpu_memory_utilization),
        "--kv-cache-dtype", s.vllm_kv_cache_dtype,
        "--enable-lora", "--max-lora-rank", str(s.vllm_max_lora_rank),
        "--max-loras", str(s.vllm_max_loras),
        "--lora-target-modules", *s.lora_target_modules,
        "--logprobs-mode", "processed_logprobs",
    ]
    extra = shlex.split(s.vllm_extra_args)
    if s.vllm_enforce_eager:
        command.append("--enforce-eager")
    elif not any(arg.startswith(("--compilation-config", "-cc")) for arg in extra):  # the user's own wins
        command += ["--compilation-config", COMPILATION_CONFIG]
    if s.vllm_attention_backend:
        command += ["--attention-backend", s.vllm_attention_backend]
    return command + extra


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: runtime LoRA on; this file's own settings removed (vLLM warns about unknown
    VLLM_* names), except VLLM_API_KEY, which vLLM reads itself, keeping the key off the command line (`ps`)."""
    child = {k: v for k, v in env.items() if k not in OWN_SETTINGS or k == "VLLM_API_KEY"}
    if not child.get("VLLM_API_KEY"):
        child.pop("VLLM_API_KEY", None)
    return {**child, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def env_value(value: Any) -> str:
    """A value as it is written in .env (lists comma-separated)."""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_text() -> str:
    """The table `--help` prints: every setting, its default, allowed values and meaning."""
    rows = []
    for f in dataclasses.fields(ServerSettings):
        check = f.metadata["check"]
        allowed = "; allowed: " + ", ".join(map(str, check.choices)) if isinstance(check, Choice) else ""
        rows.append(f"  {f.metadata['env']:<28} default: {env_value(f.default) or '(empty)'}{allowed}\n"
                    f"      {f.metadata['help']}")
    return "Settings (environment variables, e.g. in .env):\n" + "\n".join(rows)


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\n" + help_text())
        return 0
    env = dict(os.environ)
    try:
        command = build_command(env, visible_gpus())
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem} (fix it in .env)", file=sys.stderr)
        return 2
    if "--print-command" in argv:
        print("\n".join(command))
        return 0
    print("starting: " + shlex.join(command), flush=True)
    os.execvpe(command[0], command, server_environment(env))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
