"""The run's recipe, from the settings: TRL's GRPO configuration and the prompts to train and evaluate on.

The entry script (train_grpo_vllm.py) and the benchmarks build their trainers from these, so a benchmark runs the
same configuration the stack does.
"""

from __future__ import annotations

import logging

from trl import GRPOConfig

from .config import Settings, SettingsError
from .data import eval_data_source, load_prompts, prompt_token_ids

log = logging.getLogger(__name__)


def grpo_config(s: Settings, use_cpu: bool) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(s.run_dir), run_name=s.run_name, seed=s.seed,
        per_device_train_batch_size=s.micro_batch_size, gradient_accumulation_steps=s.gradient_accumulation_steps,
        num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        temperature=s.temperature, top_p=s.top_p, loss_type=s.loss_type, beta=s.beta,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_steps,
        max_steps=s.max_steps, reward_weights=list(s.reward_weights) or None,
        use_vllm=True, vllm_mode="server", vllm_server_host=s.vllm_server_host, vllm_server_port=s.vllm_server_port,
        vllm_importance_sampling_correction=s.importance_sampling != "off",
        vllm_importance_sampling_mode=s.importance_sampling if s.importance_sampling != "off" else "token_truncate",
        # TRL would add gpt-oss's MoE load-balancing loss (coefficient 0.9 from its config): with the router frozen
        # and LoRA on attention only, it would only bend the adapters toward reshaping expert routing.
        router_aux_loss_coef=0.0,
        gradient_checkpointing=s.gradient_checkpointing, bf16=s.torch_dtype == "bfloat16" and not use_cpu,
        use_cpu=use_cpu, save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        logging_steps=s.logging_steps, report_to=[] if "none" in s.report_to else list(s.report_to),
        dataloader_num_workers=0, remove_unused_columns=False, chat_template_kwargs=s.chat_template_kwargs,
    )


def load_eval_prompts(s: Settings):
    name = eval_data_source(s.dataset, s.eval_dataset)
    if name is None:
        log.info("evaluation off: DATASET is a file; set EVAL_DATASET to a held-out .jsonl to evaluate")
        return None
    dataset = load_prompts(name, s.dataset_config, s.eval_split, s.system_prompt,
                           setting="EVAL_DATASET" if s.eval_dataset else "DATASET")
    return dataset.select(range(min(s.eval_max_prompts, len(dataset))))


def training_prompts(s: Settings, tokenizer):
    """The training split, less the prompts longer than MAX_PROMPT_LENGTH."""
    dataset = load_prompts(s.dataset, s.dataset_config, s.dataset_split, s.system_prompt)
    return drop_long_prompts(dataset, tokenizer, s.max_prompt_length, s.chat_template_kwargs)


def drop_long_prompts(dataset, tokenizer, max_prompt_length: int, chat_template_kwargs: dict):
    def fits(row) -> bool:
        return len(prompt_token_ids(tokenizer, row["prompt"], chat_template_kwargs)) <= max_prompt_length

    kept = dataset.filter(fits)
    if len(kept) < len(dataset):
        log.warning("skipped %d prompts longer than MAX_PROMPT_LENGTH=%d tokens", len(dataset) - len(kept),
                    max_prompt_length)
    if len(kept) == 0:
        raise SettingsError(f"no prompt fits MAX_PROMPT_LENGTH={max_prompt_length}: raise it")
    return kept
