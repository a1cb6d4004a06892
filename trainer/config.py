"""Typed settings of the trainer, read from the environment (the compose `.env`).

Every field names its environment variable, default and meaning; `Settings.from_env` parses and validates all of
them at once and reports every wrong value with the variable's name and what is allowed, so a bad `.env` fails
at start, before a GPU is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

SECRET_SETTINGS = ("VLLM_API_KEY",)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "off")
TORCH_DTYPES = ("bfloat16", "float32")
EXPERTS_FORMATS = ("auto", "mxfp4", "bf16")
EXPERTS_FORWARDS = ("lean", "fused")
REPORT_TARGETS = ("none", "tensorboard", "wandb", "trackio")
MAX_SECONDS = 1e6  # longer waits overflow socket timeouts and sleeps
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SettingsError(ValueError):
    """One or more settings are wrong; the message lists each with its fix."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):  # one problem found later, its message complete
            self.problems = [problems]
            super().__init__(problems)
        else:
            self.problems = list(problems)
            super().__init__("invalid settings (fix them in .env):\n  " + "\n  ".join(self.problems))


def setting(env: str, default: Any, help: str, check: Callable[[Any], str | None] | None = None,
            empty_allowed: bool = False) -> Any:
    """One setting. An empty value (`NAME=` in .env) means the default, unless `empty_allowed`: then it means empty
    (no system prompt, no data set configuration), as its help says."""
    return field(default=default, metadata={"env": env, "help": help, "check": check, "empty_allowed": empty_allowed})


def at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def not_empty(what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v else f"is empty: name at least one {what}"


def server_urls_problem(urls: tuple[str, ...]) -> str | None:
    """Each URL a server's base (scheme, host, port; no /v1, which the client adds), none given twice."""
    from urllib.parse import urlsplit

    seen = set()
    for url in urls:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return f"{url!r} is not a URL: write each as http://host:port"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"{url!r} is not a server's base URL: write each as http://host:port"
        if parts.path.rstrip("/") or parts.query or parts.fragment:
            return f"{url!r} has a path: give the base URL only (http://host:port; the trainer adds /v1/...)"
        key = (parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80))
        if key in seen:
            return f"{url!r} is listed twice: name each server once (a server listed twice would get twice the load)"
        seen.add(key)
    return None


@dataclass(frozen=True)
class Choice:
    """A check that a value (or, with `each`, every item of a list) is one of `choices`; `--help` lists them."""
    choices: tuple[str, ...]
    each: bool = False

    def __call__(self, value: Any) -> str | None:
        allowed = ", ".join(repr(c) if c == "" else c for c in self.choices)
        if not self.each:
            return None if value in self.choices else f"must be one of {allowed}"
        return next((f"unknown value {v!r}; allowed: {allowed}" for v in value if v not in self.choices), None)


def one_of(*choices: str) -> Choice:
    return Choice(choices)


def each_one_of(*choices: str) -> Choice:
    return Choice(choices, each=True)


@dataclass(frozen=True)
class Settings:
    # --- the vLLM server ---
    vllm_server_host: str = setting("VLLM_SERVER_HOST", "localhost", "Host name of the vLLM server (the compose service name in the stack).")
    vllm_server_port: int = setting("VLLM_SERVER_PORT", 8000, "Port of the vLLM server.", between(1, 65535))
    vllm_server_urls: tuple[str, ...] = setting("VLLM_SERVER_URLS", (), "Comma-separated base URLs of several vLLM servers (http://host:port each, e.g. http://vllm:8000,http://vllm-2:8000); each step's prompts are spread over them, every adapter version is registered on all. Empty: the one server at VLLM_SERVER_HOST:VLLM_SERVER_PORT. Every server must read RUNS_DIR at the same path (docs/multi-node.md).", server_urls_problem)
    vllm_api_key: str = setting("VLLM_API_KEY", "", "API key shared with the server's --api-key; empty means none. Never logged.")
    vllm_wait_timeout: float = setting("VLLM_WAIT_TIMEOUT", 1800.0, "Seconds to wait for GET /health before giving up (first start downloads and loads the model).", between(1, MAX_SECONDS))
    vllm_request_timeout: float = setting("VLLM_REQUEST_TIMEOUT", 900.0, "Seconds one generation request may take before it counts as failed and is retried.", between(1, MAX_SECONDS))
    vllm_max_retries: int = setting("VLLM_MAX_RETRIES", 6, "Attempts per request on connection refused or broken off, timeouts, 500/502/503/504, before a clear error.", at_least(1))
    vllm_retry_max_wait: float = setting("VLLM_RETRY_MAX_WAIT", 30.0, "Cap in seconds of the exponential backoff between attempts.", between(0.1, MAX_SECONDS))
    vllm_max_num_seqs: int = setting("VLLM_MAX_NUM_SEQS", 128, "The server's --max-num-seqs (sequences it decodes at once), read by the trainer too: each server's share of one generation round (GENERATION_BATCH_SIZE) must fit in it.", at_least(1))
    vllm_max_loras: int = setting("VLLM_MAX_LORAS", 2, "The server's --max-loras (adapters in one batch), read by the trainer too: overlapped sampling has up to MAX_OFF_POLICY_STEPS + 1 adapter versions in flight.", at_least(1))
    # --- model ---
    model_name: str = setting("MODEL_NAME", "openai/gpt-oss-20b", "Hub name or local path of the base model; the server must serve the same one.")
    attn_implementation: str = setting("ATTN_IMPLEMENTATION", "auto", "Attention of the trainer: auto, fa4 where it can run (bfloat16 on a GPU that has its sink backward, the package installed), else eager; eager (any device); fa4, FlashAttention 4 with GPT-OSS's sinks and sliding window forward and backward (the image has it; Hopper or datacenter Blackwell GPUs, bfloat16); flex_attention (GPU, the model on one GPU); or another transformers name. For a model with attention sinks (GPT-OSS), kernels that lose the sinks or their gradients, or are not checked for them (kernels-community/vllm-flash-attn3, flash_attention_2/3/4, sdpa), are refused at start. docs/attention.md.")
    torch_dtype: str = setting("TORCH_DTYPE", "bfloat16", "Dtype the trainer loads the model in (MXFP4 checkpoints are dequantized to it).", one_of(*TORCH_DTYPES))
    experts_format: str = setting("EXPERTS_FORMAT", "auto", "How the trainer holds an MXFP4 checkpoint's frozen MoE experts (GPT-OSS): auto and mxfp4 keep the checkpoint's MXFP4 blocks and scales on the GPU, as vLLM does, dequantized one layer at a time inside its forward (the same logits, the model in a third of its bf16 memory, so every trainer rank holds it whole, unsharded); bf16 dequantizes them at load (TORCH_DTYPE), sharded over the ranks by FSDP2. mxfp4 refuses a checkpoint that is not MXFP4; auto and bf16 load any.", one_of(*EXPERTS_FORMATS))
    experts_forward: str = setting("EXPERTS_FORWARD", "lean", "How the trainer computes the MoE experts (GPT-OSS) of either format: lean is transformers' grouped-GEMM forward without its expert-parallel masking (trainer/experts.py); fused adds the gate_up bias and computes gpt-oss's clamped gate in one Triton kernel each way (their torch reference off CUDA), folds the down bias and routing weights into the combine, and dispatches and combines by gathers (trainer/fused_experts.py: the same values within rounding, checked against transformers on the CPU; its speed on a GPU is not yet measured, BENCHMARKS.md). Experts whose biases train take lean.", one_of(*EXPERTS_FORWARDS))
    gpu_memory_budget_gib: float = setting("GPU_MEMORY_BUDGET_GIB", 30.0, "With one trainer process (TRAINER_PROCESSES=1): GiB of weights it may place on each GPU (layers are spread evenly); vLLM holds its share beside them. Ranks shard the weights evenly instead and ignore it.", at_least(1))
    gradient_checkpointing: bool = setting("GRADIENT_CHECKPOINTING", True, "Recompute activations in backward to keep the micro-step peak low.")
    # --- LoRA ---
    lora_rank: int = setting("LORA_RANK", 4, "LoRA rank; must not exceed the server's --max-lora-rank.", between(1, 512))
    lora_alpha: int = setting("LORA_ALPHA", 8, "LoRA alpha (scale = alpha / rank).", at_least(1))
    lora_dropout: float = setting("LORA_DROPOUT", 0.0, "LoRA dropout.", between(0.0, 0.9))
    lora_target_modules: tuple[str, ...] = setting("LORA_TARGET_MODULES", ("q_proj", "k_proj", "v_proj", "o_proj"), "Comma-separated module names LoRA wraps; attention projections load in vLLM for every architecture here.", not_empty("module"))
    # --- data and rewards ---
    dataset: str = setting("DATASET", "openai/gsm8k", "Hub data set name, a local .jsonl file, 'sample' for the bundled offline set, or 'sums' for generated single-digit sums (held-out pairs for EVAL_SPLIT=test; examples/smollm2.env).")
    dataset_config: str = setting("DATASET_CONFIG", "main", "Hub data set configuration (ignored for files); empty (DATASET_CONFIG=) means none, the data set's default, for a Hub data set without a 'main' configuration.", empty_allowed=True)
    dataset_split: str = setting("DATASET_SPLIT", "train", "Split to train on.")
    reasoning_effort: str = setting("REASONING_EFFORT", "", "GPT-OSS chat template's reasoning effort (low, medium, high); empty keeps the template's default. Lower effort, shorter completions.", one_of("", "low", "medium", "high"))
    system_prompt: str = setting("SYSTEM_PROMPT", "Solve the problem. Put the final answer in \\boxed{}.", "System message put before each prompt (before a conversational prompt only if it starts with no system message of its own); empty (SYSTEM_PROMPT=) means none.", empty_allowed=True)
    eval_dataset: str = setting("EVAL_DATASET", "", "Held-out prompts: empty means DATASET's EVAL_SPLIT (the bundled eval set for 'sample'); or a Hub name or .jsonl path.")
    eval_split: str = setting("EVAL_SPLIT", "test", "Split of the evaluation data set.")
    eval_steps: int = setting("EVAL_STEPS", 50, "Evaluate on the held-out prompts every this many steps (0: never).", at_least(0))
    eval_max_prompts: int = setting("EVAL_MAX_PROMPTS", 64, "Held-out prompts per evaluation, one completion each, sampled in one request.", at_least(1))
    reward_funcs: tuple[str, ...] = setting("REWARD_FUNCS", ("accuracy", "boxed_format"), "Comma-separated reward names (accuracy, final_number, boxed_format, think_format) or dotted paths module.func.")
    reward_weights: tuple[float, ...] = setting("REWARD_WEIGHTS", (), "Comma-separated weights, one per reward; empty means all 1.")
    # --- GRPO ---
    num_generations: int = setting("NUM_GENERATIONS", 8, "Completions sampled per prompt (the GRPO group).", at_least(2))
    micro_batch_size: int = setting("MICRO_BATCH_SIZE", 1, "Sequences per forward/backward micro-step; 1 is sequential backprop.", at_least(1))
    gradient_accumulation_steps: int = setting("GRADIENT_ACCUMULATION_STEPS", 128, "Micro-steps per optimizer step, shared evenly by the trainer processes; sequences per step = micro batch x this, whatever the number of processes. The default's 128 sequences (16 prompts x 8) are one request the server decodes at once: its tokens/s grow with the sequences decoded together (BENCHMARKS.md).", at_least(1))
    generation_batch_size: int = setting("GENERATION_BATCH_SIZE", 0, "Sequences sampled in one generation round, one request to the server (TRL's generation_batch_size): a multiple of the sequences per step, which several optimizer steps then train on in turn; 0 means one step's sequences.", at_least(0))
    max_off_policy_steps: int = setting("MAX_OFF_POLICY_STEPS", 0, "Optimizer steps the adapter that sampled a round may lag the policy when the round starts training; above 0 the next round is sampled while the trainer trains (docs/overlap.md). 0 samples each round with the newest adapter, waiting for it: where the server and the trainer share a GPU, their kernels take turns on it and sampling ahead saves no time (docs/overlap.md, when it pays).", between(0, 64))
    max_prompt_length: int = setting("MAX_PROMPT_LENGTH", 512, "Most prompt tokens (chat template applied); longer prompts are skipped, not cut, and counted in the log.", at_least(1))
    max_completion_length: int = setting("MAX_COMPLETION_LENGTH", 3584, "Most tokens sampled per completion; one that hits it counts as clipped.", at_least(1))
    temperature: float = setting("TEMPERATURE", 1.0, "Sampling temperature.", between(0.01, 10.0))
    top_p: float = setting("TOP_P", 1.0, "Nucleus sampling threshold.", between(0.01, 1.0))
    loss_type: str = setting("LOSS_TYPE", "dapo", "TRL loss aggregation.", one_of(*LOSS_TYPES))
    beta: float = setting("BETA", 0.0, "KL coefficient (0 keeps no reference model in memory).", at_least(0.0))
    importance_sampling: str = setting("IMPORTANCE_SAMPLING", "token_truncate", "Correction for vLLM's and the trainer's logprobs differing (TRL's vllm_importance_sampling_mode, ratios capped at 3): token_* weigh each token by its own ratio; sequence_* (TRL's default: sequence_mask) by the product over the completion, which bf16's small per-token gaps drive toward 0 on long completions (BENCHMARKS.md, \"Do vLLM and the trainer compute the same policy?\"); off applies none.", one_of(*IMPORTANCE_SAMPLING_MODES))
    learning_rate: float = setting("LEARNING_RATE", 1e-5, "Peak learning rate.", between(0.0, 1.0))
    lr_scheduler: str = setting("LR_SCHEDULER", "constant_with_warmup", "Learning-rate schedule.", one_of(*LR_SCHEDULERS))
    warmup_steps: int = setting("WARMUP_STEPS", 5, "Optimizer steps of linear warmup.", at_least(0))
    max_steps: int = setting("MAX_STEPS", 500, "Optimizer steps in the run.", at_least(1))
    seed: int = setting("SEED", 42, "Seed of sampling order, LoRA init, dropout and the server's sampling (each step's requests carry it plus the step, so a step sampled again samples the same completions).", between(0, 2**32 - 1))
    # --- run, checkpoints, logs ---
    run_name: str = setting("RUN_NAME", "grpo_gptoss20b_lora4_tes", "Name of the run; its files go to RUNS_DIR/RUN_NAME.")
    runs_dir: Path = setting("RUNS_DIR", Path("runs"), "Directory of all runs (the shared volume in the stack; the server reads adapters from it).")
    save_steps: int = setting("SAVE_STEPS", 25, "Checkpoint every this many optimizer steps (and always on SIGTERM).", at_least(1))
    save_total_limit: int = setting("SAVE_TOTAL_LIMIT", 3, "Checkpoints kept; older ones are deleted.", at_least(2))
    samples_steps: int = setting("SAMPLES_STEPS", 10, "Write sample completions with their rewards to samples.jsonl every this many steps (0: never).", at_least(0))
    samples_per_step: int = setting("SAMPLES_PER_STEP", 2, "Completions written each time.", at_least(1))
    logging_steps: int = setting("LOGGING_STEPS", 1, "Log metrics every this many steps (times and tokens then cover all of them).", at_least(1))
    report_to: tuple[str, ...] = setting("REPORT_TO", ("tensorboard",), "Comma-separated: tensorboard, wandb, trackio, or none.", each_one_of(*REPORT_TARGETS))
    # --- trainer processes (trainer/launch.py starts them) ---
    trainer_processes: int = setting("TRAINER_PROCESSES", 0, "Trainer processes on this node. 0: one per visible GPU (one process on a host without GPU). More than one in all (this times NNODES): one per GPU, each holding whole layers, FSDP2 sharding the frozen base, each running its share of the micro-steps, the gradients averaged; each process reads the whole model into host memory (one bf16 copy per process while loading) and moves only its shard to its GPU. 1: one process, the model's layers spread over the visible GPUs, one GPU computing at a time (docs/trainer-ranks.md).", at_least(0))
    nnodes: int = setting("NNODES", 1, "Nodes the trainer's processes run on (torchrun --nnodes).", at_least(1))
    node_rank: int = setting("NODE_RANK", 0, "This node's index among NNODES, from 0 (torchrun --node-rank).", at_least(0))
    master_addr: str = setting("MASTER_ADDR", "localhost", "Address of node 0, where the processes meet (torchrun --master-addr); reachable from every node.")
    master_port: int = setting("MASTER_PORT", 29500, "Port on node 0 where the processes meet (torchrun --master-port).", between(1, 65535))

    # ---------------------------------------------------------------- derived values
    @property
    def server_url(self) -> str:
        return f"http://{self.vllm_server_host}:{self.vllm_server_port}"

    @property
    def server_urls(self) -> tuple[str, ...]:
        """Every server the trainer samples from: VLLM_SERVER_URLS, or the one at VLLM_SERVER_HOST:PORT."""
        return tuple(url.rstrip("/") for url in self.vllm_server_urls) or (self.server_url,)

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run_name

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        return self.sequences_per_step // self.num_generations

    @property
    def sequences_per_round(self) -> int:
        """Sequences one generation round samples (GENERATION_BATCH_SIZE, or one step's)."""
        return self.generation_batch_size or self.sequences_per_step

    @property
    def sequences_per_server(self) -> int:
        """Most sequences of one round a server is given: whole prompt groups, spread evenly over the servers."""
        prompts = -(-self.sequences_per_round // self.num_generations)
        return -(-prompts // len(self.server_urls)) * self.num_generations

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps that train on one generation round."""
        return max(self.sequences_per_round // self.sequences_per_step, 1)

    @property
    def chat_template_kwargs(self) -> dict:
        return {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort else {}

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        settings, problems = cls.parse(os.environ if environ is None else environ)
        if problems:
            raise SettingsError(problems)
        return settings

    @classmethod
    def parse(cls, environ: Mapping[str, str]) -> tuple["Settings", list[str]]:
        """The settings and every problem found; a wrong value is replaced by its default, so that checks of
        the other settings still run, and checks that combine settings skip the wrong ones."""
        values, problems, wrong = {}, [], set()
        types = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            env = f.metadata["env"]
            raw = environ.get(env)
            if raw is None or (raw.strip() == "" and f.default != "" and not f.metadata["empty_allowed"]):
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
                problems.append(f"{env}={raw!r}: {message}")
                wrong.add(env)
                continue
            values[f.name] = value
        settings = cls(**values)
        return settings, problems + settings._cross_checks(wrong)

    def _cross_checks(self, wrong: set[str]) -> list[str]:
        """Checks of settings together; one that involves a wrong setting is skipped (its default would mislead)."""
        problems = []

        def applies(*names: str) -> bool:
            return not wrong.intersection(names)

        if applies("MICRO_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "NUM_GENERATIONS") \
                and self.sequences_per_step % self.num_generations:
            problems.append(
                f"MICRO_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS = {self.sequences_per_step} sequences per step must be "
                f"a multiple of NUM_GENERATIONS={self.num_generations} (each prompt's whole group trains in one step)")
        if applies("NODE_RANK", "NNODES") and self.node_rank >= self.nnodes:
            problems.append(f"NODE_RANK={self.node_rank} must be below NNODES={self.nnodes} (nodes count from 0)")
        if applies("TRAINER_PROCESSES", "NNODES", "GRADIENT_ACCUMULATION_STEPS") and self.trainer_processes \
                and (problem := self.process_split_problem(self.trainer_processes)):
            problems.append(problem)
        batch = ("MICRO_BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS", "GENERATION_BATCH_SIZE")
        if applies(*batch) and self.sequences_per_round % self.sequences_per_step:
            problems.append(
                f"GENERATION_BATCH_SIZE={self.generation_batch_size} must be a multiple of MICRO_BATCH_SIZE x "
                f"GRADIENT_ACCUMULATION_STEPS = {self.sequences_per_step} sequences per step (each step trains on a "
                f"whole share of the round), or 0 for one step's sequences")
        if applies(*batch, "NUM_GENERATIONS", "VLLM_SERVER_URLS", "VLLM_MAX_NUM_SEQS") \
                and (per_server := self.sequences_per_server) > self.vllm_max_num_seqs:
            servers = len(self.server_urls)
            spread = f" per server ({self.sequences_per_round} over the {servers} VLLM_SERVER_URLS)" if servers > 1 else ""
            problems.append(
                f"a generation round asks for {per_server} sequences{spread} (GENERATION_BATCH_SIZE, or "
                f"MICRO_BATCH_SIZE x GRADIENT_ACCUMULATION_STEPS) but VLLM_MAX_NUM_SEQS={self.vllm_max_num_seqs}: "
                f"the server would decode the round in parts; raise VLLM_MAX_NUM_SEQS to at least "
                f"{per_server} or lower GENERATION_BATCH_SIZE")
        if applies("MAX_OFF_POLICY_STEPS", "VLLM_MAX_LORAS") and self.max_off_policy_steps \
                and self.vllm_max_loras < self.max_off_policy_steps + 1:
            problems.append(
                f"MAX_OFF_POLICY_STEPS={self.max_off_policy_steps} keeps up to {self.max_off_policy_steps + 1} adapter "
                f"versions in flight but VLLM_MAX_LORAS={self.vllm_max_loras}: raise VLLM_MAX_LORAS to "
                f"{self.max_off_policy_steps + 1} or lower MAX_OFF_POLICY_STEPS")
        if not RUN_NAME_PATTERN.match(self.run_name):
            problems.append(f"RUN_NAME={self.run_name!r}: use letters, digits, '.', '_' and '-' only")
        if applies("REWARD_WEIGHTS", "REWARD_FUNCS") and self.reward_weights \
                and len(self.reward_weights) != len(self.reward_funcs):
            problems.append(f"REWARD_WEIGHTS has {len(self.reward_weights)} values but REWARD_FUNCS names "
                            f"{len(self.reward_funcs)} rewards: give one weight per reward or leave it empty")
        if not self.reward_funcs:
            problems.append("REWARD_FUNCS is empty: name at least one reward")
        if applies("REPORT_TO") and "none" in self.report_to and len(self.report_to) > 1:
            problems.append("REPORT_TO: 'none' cannot be combined with other targets")
        return problems

    def process_split_problem(self, processes_per_node: int) -> str | None:
        """Why the step's micro-steps cannot be shared evenly by the processes, or None."""
        processes = processes_per_node * self.nnodes
        if self.gradient_accumulation_steps % processes:
            return (f"GRADIENT_ACCUMULATION_STEPS={self.gradient_accumulation_steps} micro-steps per step cannot be "
                    f"shared evenly by {processes} trainer processes (TRAINER_PROCESSES x NNODES): make it a multiple "
                    f"of {processes}")
        return None

    def describe(self) -> str:
        """One `NAME=value` per line, secrets masked, for the run log."""
        lines = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shown = ("<set>" if value else "<empty>") if f.metadata["env"] in SECRET_SETTINGS else _as_env(value)
            lines.append(f"{f.metadata['env']}={shown}")
        return "\n".join(lines)


def _parse(raw: str, annotation: Any) -> Any:
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if typing.get_origin(annotation) is tuple:
        item_type = typing.get_args(annotation)[0]
        return tuple(item_type(item.strip()) for item in raw.split(",") if item.strip())
    value = annotation(raw)
    if annotation is float and not math.isfinite(value):  # "nan" and "inf" parse as floats
        raise ValueError(raw)
    return value


def _as_env(value: Any) -> str:
    """A value as it is written in .env (lists comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a comma-separated list of {_type_name(typing.get_args(annotation)[0])}s"
    return {bool: "true or false", int: "an integer", float: "a finite number", Path: "a path"}.get(annotation, "text")


def help_text() -> str:
    """The table `--help` prints: every setting, its default and meaning."""
    rows = []
    for f in dataclasses.fields(Settings):
        check = f.metadata["check"]
        allowed = "; allowed: " + ", ".join(c or "(empty)" for c in check.choices) if isinstance(check, Choice) else ""
        rows.append(f"  {f.metadata['env']:<28} default: {_as_env(f.default) or '(empty)'}{allowed}\n"
                    f"      {f.metadata['help']}")
    return "Settings (environment variables, e.g. in .env):\n" + "\n".join(rows)
