"""Prompts for GRPO: a Hub data set, a local JSONL file, or the bundled sample set, as chat prompts + solutions.

Rows are normalised to TRL's conversational format: `prompt` (a list of messages; the chat template, GPT-OSS's
harmony format included, is applied by the trainer) and `solution` (the final answer the rewards check).
Rows missing a question or an answer are skipped and counted, never fatal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets

log = logging.getLogger(__name__)

SAMPLE_DATASET = Path(__file__).parent / "data" / "sample_math.jsonl"
SAMPLE_EVAL_DATASET = Path(__file__).parent / "data" / "sample_math_eval.jsonl"
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution")


class DatasetError(ValueError):
    pass


def final_answer(answer: str) -> str:
    """GSM8K-style answers end with '#### <number>'; others are taken whole."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_raw(name: str, config: str, split: str) -> datasets.Dataset:
    if name == "sample":
        path = SAMPLE_EVAL_DATASET if split == "test" else SAMPLE_DATASET
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if name.endswith((".jsonl", ".json")):
        if not Path(name).is_file():
            raise DatasetError(f"DATASET={name!r}: no such file (paths are seen from inside the trainer container)")
        return datasets.load_dataset("json", data_files=name, split="train")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # the Hub raises many types; all mean the same to the user
        raise DatasetError(f"DATASET={name!r} (DATASET_CONFIG={config!r}, DATASET_SPLIT={split!r}) cannot be "
                           f"loaded: {exc}. Use a Hub data set name, a .jsonl path, or 'sample'") from exc


def to_prompts(raw: datasets.Dataset, system_prompt: str) -> tuple[datasets.Dataset, int]:
    """Return (dataset with `prompt` and `solution`, number of rows skipped for missing fields)."""
    question_field = next((f for f in QUESTION_FIELDS if f in raw.column_names), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in raw.column_names), None)
    if question_field is None or answer_field is None:
        raise DatasetError(f"the data set has columns {raw.column_names}; it needs one of {QUESTION_FIELDS} "
                           f"and one of {ANSWER_FIELDS}")

    def usable(row) -> bool:
        return isinstance(row[question_field], str) and bool(row[question_field].strip()) \
            and row[answer_field] is not None and bool(str(row[answer_field]).strip())

    kept = raw.filter(usable)
    skipped = len(raw) - len(kept)

    def convert(row):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": row[question_field].strip()})
        return {"prompt": messages, "solution": final_answer(str(row[answer_field]))}

    converted = kept.map(convert, remove_columns=kept.column_names)
    if len(converted) == 0:
        raise DatasetError("the data set has no usable rows (every row lacks a question or an answer)")
    return converted, skipped


def prompt_token_ids(tokenizer, messages: list[dict], chat_template_kwargs: dict) -> list[int]:
    """The prompt as the trainer and the server see it: the chat template applied, generation prompt added."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **chat_template_kwargs)
    return list(encoded["input_ids"])


def load_prompts(name: str, config: str, split: str, system_prompt: str) -> datasets.Dataset:
    dataset, skipped = to_prompts(load_raw(name, config, split), system_prompt)
    if skipped:
        log.warning("data set %s: skipped %d rows missing a question or an answer", name, skipped)
    log.info("data set %s: %d prompts", name, len(dataset))
    return dataset
