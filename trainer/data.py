"""Prompts for GRPO: a Hub data set, a local JSONL file, the bundled sample set or generated sums, as chat prompts +
solutions.

Rows are normalised to TRL's conversational format: `prompt` (a list of messages; the chat template, GPT-OSS's
harmony format included, is applied by the trainer) and `solution` (the final answer the rewards check).
Rows missing a question or an answer are skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from .arithmetic import single_digit_sums

log = logging.getLogger(__name__)

SAMPLE_NAME = "sample"
SAMPLE_DATASET = Path(__file__).parent / "data" / "sample_math.jsonl"
SAMPLE_EVAL_DATASET = Path(__file__).parent / "data" / "sample_math_eval.jsonl"
GENERATED_SUMS = "sums"
QUESTION_FIELDS = ("question", "problem", "prompt")
ANSWER_FIELDS = ("answer", "solution")


class DatasetError(ValueError):
    pass


def final_answer(answer: str) -> str:
    """GSM8K-style answers end with '#### <number>'; others are taken whole."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_raw(name: str, config: str, split: str, setting: str = "DATASET") -> datasets.Dataset:
    if name == SAMPLE_NAME:
        return rows_dataset(read_rows(SAMPLE_EVAL_DATASET if split == "test" else SAMPLE_DATASET, setting), setting)
    if name == GENERATED_SUMS:
        try:
            return rows_dataset(single_digit_sums(split), setting)
        except ValueError as exc:
            raise DatasetError(f"{setting}={name!r}: {exc}; set DATASET_SPLIT=train and EVAL_SPLIT=test") from exc
    if name.endswith((".jsonl", ".json")):
        path = Path(name)
        if not path.is_file():
            raise DatasetError(f"{setting}={name!r}: no such file (paths are seen from inside the trainer container)")
        return rows_dataset(read_rows(path, setting), setting)
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # the Hub raises many types; all mean the same to the user
        raise DatasetError(f"{setting}={name!r} (DATASET_CONFIG={config!r}, split {split!r}) cannot be "
                           f"loaded: {exc}. Use a Hub data set name, a .jsonl path, 'sample' or 'sums'") from exc


def read_rows(path: Path, setting: str) -> list[dict]:
    """The objects of a JSON Lines file (or of a JSON array), read here rather than by `datasets` so that a broken
    file is reported by line, in the setting's name, and rows whose fields differ in type still load."""
    shown = f"{setting}={str(path)!r}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{shown}: cannot be read ({exc.strerror or exc}): check the path and its permissions")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DatasetError(f"{shown}: line {line} is not UTF-8 text: save the file as UTF-8") from None
    if not text.strip():
        raise DatasetError(f"{shown} is empty: write one JSON object per line, with a question and an answer")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DatasetError(f"{shown}: not valid JSON ({_reason(exc)}): fix the file") from None
        numbered = list(enumerate(rows if isinstance(rows, list) else [rows], start=1))
        where = "item"
    else:
        numbered, broken = [], []
        for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON text may hold U+2028
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except (ValueError, RecursionError) as exc:
                    broken.append(f"{number} ({_reason(exc)})")
        if broken:
            more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
            raise DatasetError(f"{shown}: not valid JSON on line {', '.join(broken[:3])}{more}: fix or delete "
                               "those lines (one JSON object per line)")
        where = "line"
    not_objects = [str(number) for number, row in numbered if not isinstance(row, dict)]
    if not_objects:
        which = f"{where} {not_objects[0]} is not a JSON object" if len(not_objects) == 1 else \
            f"{where}s {', '.join(not_objects[:3])}{' ...' if len(not_objects) > 3 else ''} are not JSON objects"
        raise DatasetError(f"{shown}: {which}: each row needs the form {{\"question\": ..., \"answer\": ...}}")
    return [row for _, row in numbered]


def _reason(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}, column {exc.colno}"
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def rows_dataset(rows: list[dict], setting: str) -> datasets.Dataset:
    """The question and answer fields of `rows` as a data set; a value of the wrong type becomes missing, so that
    its row is skipped and counted like one without the field."""
    names = {key for row in rows for key in row}
    question_field = next((f for f in QUESTION_FIELDS if f in names), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in names), None)
    if question_field is None or answer_field is None:
        shown = ", ".join(repr(n[:40]) for n in sorted(names)[:10]) or "none"
        raise DatasetError(f"{setting}: the rows have the fields {shown}; they need one of {QUESTION_FIELDS} and "
                           f"one of {ANSWER_FIELDS}")

    def text_or_none(value, numbers_too: bool):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers_too:
            return str(value)
        if not isinstance(value, str):
            return None
        try:
            value.encode("utf-8")  # JSON's \ud800-style escapes can make text no tokenizer takes
        except UnicodeEncodeError:
            return None
        return value

    return datasets.Dataset.from_dict({
        question_field: [text_or_none(row.get(question_field), numbers_too=False) for row in rows],
        answer_field: [text_or_none(row.get(answer_field), numbers_too=True) for row in rows]},
        features=datasets.Features({question_field: datasets.Value("string"),
                                    answer_field: datasets.Value("string")}))


def to_prompts(raw: datasets.Dataset, system_prompt: str, setting: str = "DATASET") -> tuple[datasets.Dataset, int]:
    """Return (dataset with `prompt` and `solution`, number of rows skipped for missing fields)."""
    question_field = next((f for f in QUESTION_FIELDS if f in raw.column_names), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in raw.column_names), None)
    if question_field is None or answer_field is None:
        raise DatasetError(f"{setting}: the data set has columns {raw.column_names}; it needs one of "
                           f"{QUESTION_FIELDS} and one of {ANSWER_FIELDS}")

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
        raise DatasetError(f"{setting}: the data set has no usable rows (every row lacks a question or an answer, "
                           "or has one that is not text)")
    return converted, skipped


def prompt_token_ids(tokenizer, messages: list[dict], chat_template_kwargs: dict) -> list[int]:
    """The prompt as the trainer and the server see it: the chat template applied, generation prompt added."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            **chat_template_kwargs)
    return list(encoded["input_ids"])


def is_hub_name(name: str) -> bool:
    """A data set name the Hub resolves: not a file, not one built in."""
    return name != SAMPLE_NAME and not name.endswith((".jsonl", ".json"))


def eval_data_source(dataset: str, eval_dataset: str) -> str | None:
    """What evaluation reads: EVAL_DATASET, else DATASET's evaluation split; None for a DATASET file without an
    EVAL_DATASET (a file has no split to hold out)."""
    if eval_dataset:
        return eval_dataset
    return None if dataset.endswith((".jsonl", ".json")) else dataset


def load_prompts(name: str, config: str, split: str, system_prompt: str, setting: str = "DATASET") -> datasets.Dataset:
    dataset, skipped = to_prompts(load_raw(name, config, split, setting), system_prompt, setting)
    if skipped:
        log.warning("data set %s: skipped %d rows missing a question or an answer (or with one that is not text)",
                    name, skipped)
    log.info("data set %s: %d prompts", name, len(dataset))
    return dataset
