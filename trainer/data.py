"""Prompts for GRPO: a Hub data set, a local JSONL file, the bundled sample set or generated sums, as chat prompts +
solutions.

Rows are normalised to TRL's conversational format: `prompt` (a list of messages, from a question text or a
conversation as written; the chat template, GPT-OSS's harmony format included, is applied by the trainer) and
`solution` (the final answer the rewards check). Every other column of the data stays, and reaches the reward
functions as a keyword argument of its own name (TRL's contract), from a Hub data set and a JSONL file alike.
Rows missing a question or an answer are skipped and counted, never fatal; data without any answer column loads
without `solution`, for rewards that need none.
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
# Names TRL gives reward functions itself (or drops from the columns): a column so named cannot reach a reward.
RESERVED_COLUMNS = ("prompts", "completions", "completion", "completion_ids", "trainer_state", "log_extra",
                    "log_metric", "environments")
MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


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
    """Every field of `rows` as a column, as a Hub data set has them. The question and answer fields are read as
    text (a conversation, too, for `prompt`); a value of the wrong type there becomes missing, so that its row is
    skipped and counted like one without the field. Any other field whose values no one column type can hold (text
    in one row, a number in another) is left out with a warning naming it."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    question_field = next((f for f in QUESTION_FIELDS if f in names), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in names), None)
    if question_field is None:
        shown = ", ".join(repr(n[:40]) for n in sorted(names)[:10]) or "none"
        raise DatasetError(f"{setting}: the rows have the fields {shown}; they need one of {QUESTION_FIELDS} (and "
                           f"one of {ANSWER_FIELDS} for the rewards that compare with an answer)")

    questions = [text_or_none(row.get(question_field), numbers_too=False) for row in rows]
    if question_field == "prompt":
        conversations = [as_messages(row.get("prompt")) for row in rows]
        if any(conversations):  # one column type: every text prompt becomes a user message
            questions = [c or ([{"role": "user", "content": q.strip()}] if q is not None else None)
                         for q, c in zip(questions, conversations)]
    columns: dict[str, list] = {question_field: questions}
    features = {question_field: MESSAGES if any(isinstance(q, list) for q in questions) else datasets.Value("string")}
    if answer_field is not None:
        columns[answer_field] = [text_or_none(row.get(answer_field), numbers_too=True) for row in rows]
        features[answer_field] = datasets.Value("string")
    left_out = []
    for name in names:
        if name in columns:
            continue
        values = [row.get(name) for row in rows]
        try:
            features.update(datasets.Dataset.from_dict({name: values}).features)
        except Exception:  # pyarrow says why in its own terms; the user needs the column's name
            left_out.append(name)
            continue
        columns[name] = values
    if left_out:
        log.warning("%s: left out the field(s) %s: their values differ in type from row to row (e.g. text in "
                    "one, a number in another), so no column can hold them and no reward gets them; give each "
                    "field one type", setting, ", ".join(repr(n[:40]) for n in left_out[:10]))
    return datasets.Dataset.from_dict(columns, features=datasets.Features({n: features[n] for n in columns}))


def text_or_none(value, numbers_too: bool) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and numbers_too:
        return str(value)
    if not isinstance(value, str) or not encodable(value):
        return None
    return value


def encodable(text: str) -> bool:
    """JSON's \\ud800-style escapes can make text no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_messages(value) -> list[dict] | None:
    """A conversational prompt (TRL's format: a list of {"role", "content"} messages, the last one not from the
    assistant, at least one with text), keeping role and content; else None."""
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for message in value:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if not (isinstance(role, str) and role.strip() and isinstance(content, str)
                and encodable(role) and encodable(content)):
            return None
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant" or not any(m["content"].strip() for m in messages if m["role"] != "system"):
        return None
    return messages


def to_prompts(raw: datasets.Dataset, system_prompt: str, setting: str = "DATASET") -> tuple[datasets.Dataset, int]:
    """Return (the data set with `prompt` as messages and `solution` as the normalised answer, every other column as
    it was; the number of rows skipped for a missing question or answer)."""
    question_field = next((f for f in QUESTION_FIELDS if f in raw.column_names), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in raw.column_names), None)
    if question_field is None:
        raise DatasetError(f"{setting}: the data set has columns {raw.column_names}; it needs one of "
                           f"{QUESTION_FIELDS} (and one of {ANSWER_FIELDS} for the rewards that compare with an "
                           "answer)")
    reserved = [c for c in raw.column_names if c in RESERVED_COLUMNS]
    if reserved:
        log.warning("%s: left out the column(s) %s: TRL gives rewards arguments of these names itself; rename "
                    "them for a reward to get them", setting, ", ".join(map(repr, reserved)))

    def question(row):
        value = row[question_field]
        if isinstance(value, str):
            return value.strip() if value.strip() and encodable(value) else None
        return as_messages(value) if question_field == "prompt" else None

    def usable(row) -> bool:
        return question(row) is not None and (answer_field is None or (
            row[answer_field] is not None and bool(str(row[answer_field]).strip())))

    kept = raw.filter(usable)
    skipped = len(raw) - len(kept)

    def convert(row):
        asked = question(row)
        if isinstance(asked, str):
            messages = [{"role": "user", "content": asked}]
        else:
            messages = asked
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        converted = {"prompt": messages}
        if answer_field is not None:
            converted["solution"] = final_answer(str(row[answer_field]))
        return converted

    replaced = [c for c in kept.column_names if c in ("prompt", "solution", *RESERVED_COLUMNS)]
    converted = kept.map(convert, remove_columns=replaced)
    if len(converted) == 0:
        raise DatasetError(f"{setting}: the data set has no usable rows (every row lacks a question or an answer, "
                           "or has one that is neither text nor, for `prompt`, a list of messages)")
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
    log.info("data set %s: %d prompts; columns the rewards get: %s", name, len(dataset),
             ", ".join(c for c in dataset.column_names if c != "prompt"))
    return dataset
