"""GPT-OSS's harmony format on the trainer's side: what a completion says on each channel, and prompts rendered as
vLLM's own chat endpoint renders them.

A gpt-oss completion is a sequence of messages, e.g.

    <|channel|>analysis<|message|>6*7=42.<|end|><|start|>assistant<|channel|>final<|message|>\\boxed{42}<|return|>

Decoded with the special tokens stripped it reads `analysis6*7=42.assistantfinal\\boxed{42}`, and a reward would
score the reasoning. Rewards get the final channel as the message's `content` and the reasoning as its `thinking`
(TRL's names for them); a completion with no final channel (cut inside its reasoning, or not harmony at all) has
an empty `content`. The parse reads token IDs, so text that only looks like a special token is text.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from .files import write_text_atomically

# The tokens that give a completion its structure, by their names in the tokenizer.
# A header (`assistant to=functions.f<|channel|>commentary <|constrain|>json`) takes a few tokens; many more
# without a <|message|> are no header.
MAX_HEADER_TOKENS = 32
STRUCTURE = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")


@dataclass(frozen=True)
class HarmonyTokens:
    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int  # the end of the final answer: the turn is over
    call: int  # the end of a tool call: the turn waits for the tool
    special: frozenset[int]  # every special token; one outside the structure makes a completion malformed

    @classmethod
    def of(cls, tokenizer) -> "HarmonyTokens | None":
        """The tokenizer's harmony tokens, or None for a tokenizer without them (the completion is plain text)."""
        ids = [tokenizer.convert_tokens_to_ids(name) for name in STRUCTURE]
        unknown = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unknown for i in ids):
            return None
        return cls(*ids, special=frozenset(tokenizer.all_special_ids) | frozenset(
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special))


@dataclass
class HarmonyMessage:
    channel: str
    recipient: str  # "functions.name" for a tool call, else ""
    token_ids: list[int]
    ended: str  # "end", "return", "call", or "" when the completion stops inside it


@dataclass
class HarmonyCompletion:
    messages: list[HarmonyMessage] = field(default_factory=list)
    malformed: bool = False  # tokens outside harmony's structure: the message they fell in is dropped
    texts: dict[str, str] = field(default_factory=dict)  # channel -> decoded text, filled by `decode`

    def tokens_on(self, channel: str) -> int:
        return sum(len(m.token_ids) for m in self.messages if m.channel == channel and not m.recipient)

    @property
    def has_final(self) -> bool:
        return any(m.channel == "final" for m in self.messages)

    def as_message(self) -> dict:
        """The completion as TRL's conversational rewards get it: the final channel as `content`."""
        message = {"role": "assistant", "content": self.texts.get("final", ""),
                   "thinking": self.texts.get("analysis", "")}
        calls = [{"name": m.recipient.removeprefix("functions."), "arguments": self.texts.get(f"call:{i}", "")}
                 for i, m in enumerate(self.messages) if m.recipient]
        if calls:
            message["tool_calls"] = calls
        return message


def parse(token_ids: list[int], tokens: HarmonyTokens, decode) -> HarmonyCompletion:
    """The messages of a completion sampled after the prompt's `<|start|>assistant`; `decode` turns token IDs into
    text. Never raises: what is not harmony is counted as malformed."""
    parsed = HarmonyCompletion()
    position, expect_start = 0, False  # the prompt opened the first message
    while position < len(token_ids):
        if expect_start:
            if token_ids[position] != tokens.start:
                parsed.malformed = True
                break
            position += 1
        header_end = next((i for i in range(position, min(len(token_ids), position + MAX_HEADER_TOKENS + 1))
                           if token_ids[i] == tokens.message), None)
        header = token_ids[position:header_end]
        if len(header) > MAX_HEADER_TOKENS or any(
                t in tokens.special and t not in (tokens.channel, tokens.constrain) for t in header):
            parsed.malformed = True
            break
        before_channel = header[:header.index(tokens.channel)] if tokens.channel in header else header
        if not HEADER_START.fullmatch(decode(before_channel)):  # text where a header belongs: not harmony
            parsed.malformed = True
            break
        if header_end is None:  # cut inside a header: no content yet
            break
        if tokens.channel not in header:
            parsed.malformed = True
            break
        channel, recipient = _header_fields(decode(header))
        content_start = header_end + 1
        content_end = next((i for i in range(content_start, len(token_ids)) if token_ids[i] in tokens.special),
                           len(token_ids))
        stop = token_ids[content_end] if content_end < len(token_ids) else None
        ended = {tokens.end: "end", tokens.return_: "return", tokens.call: "call", None: ""}.get(stop)
        if ended is None:  # another special token inside a message's content
            parsed.malformed = True
            break
        parsed.messages.append(HarmonyMessage(channel, recipient, token_ids[content_start:content_end], ended))
        if ended in ("return", "call"):
            if content_end + 1 < len(token_ids):
                parsed.malformed = True  # the turn was over
            break
        position, expect_start = content_end + 1, True
    texts: dict[str, list[str]] = {}
    for i, m in enumerate(parsed.messages):
        key = f"call:{i}" if m.recipient else m.channel
        texts.setdefault(key, []).append(decode(m.token_ids))
    parsed.texts = {key: "\n".join(parts) for key, parts in texts.items()}
    return parsed


# What may stand before a header's <|channel|>: the role (after <|start|>) and a recipient, the recipient perhaps
# cut short.
HEADER_START = re.compile(r"\s*(assistant)?(\s*to(=\S*)?)?\s*")
HEADER_FIELDS = re.compile(r"<\|channel\|>\s*(?P<channel>[^\s<]*)")
RECIPIENT = re.compile(r"\bto=(?P<to>[^\s<]+)")


def _header_fields(header_text: str) -> tuple[str, str]:
    """Channel and recipient of a header such as `<|channel|>commentary to=functions.f <|constrain|>json`."""
    channel = HEADER_FIELDS.search(header_text)
    recipient = RECIPIENT.search(header_text)
    return (channel.group("channel") if channel else ""), (recipient.group("to") if recipient else "")


def decoder(tokenizer):
    """Token IDs to text, special tokens kept (headers are read from them)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


def parse_completions(completion_ids: list[list[int]], tokenizer, tokens: HarmonyTokens) -> list[HarmonyCompletion]:
    decode = decoder(tokenizer)
    return [parse(ids, tokens, decode) for ids in completion_ids]


def completion_sums(parsed: list[HarmonyCompletion], solutions: list | None) -> dict[str, float]:
    """Sums over `parsed` (with their count, `completions`), so that ranks can add theirs before dividing: how
    many completions have no final answer or are malformed, the reasoning's and the answer's lengths in tokens,
    and how often the expected answer appears in the reasoning but not in the final answer (a policy that
    reasons its way to the answer and then writes another, or is cut before writing it)."""
    sums = {
        "completions": float(len(parsed)),
        "completions/no_final_ratio": float(sum(not p.has_final for p in parsed)),
        "completions/malformed_ratio": float(sum(p.malformed for p in parsed)),
        "completions/mean_analysis_length": float(sum(p.tokens_on("analysis") for p in parsed)),
        "completions/mean_final_length": float(sum(p.tokens_on("final") for p in parsed)),
    }
    if solutions is not None:
        sums["completions/answer_only_in_analysis_ratio"] = float(sum(
            mentions(p.texts.get("analysis", ""), s) and not mentions(p.texts.get("final", ""), s)
            for p, s in zip(parsed, solutions)))
    return sums


def completion_metrics(parsed: list[HarmonyCompletion], solutions: list | None) -> dict[str, float]:
    """completion_sums as means over the completions."""
    sums = completion_sums(parsed, solutions)
    count = sums.pop("completions") or 1.0
    return {name: total / count for name, total in sums.items()}


def mentions(text: str, answer) -> bool:
    """`answer` appears in `text` as a whole word or number (42 is not in 142)."""
    answer = str(answer).strip()
    if not answer:
        return False
    return re.search(rf"(?<![\w.]){re.escape(answer)}(?![\w]|\.\d)", text.replace(",", "")) is not None


# ---------------------------------------------------------------------------------------------------- prompts
# The Hub's template dates every prompt with the day it is rendered and ends the developer message with two
# newlines that openai-harmony (and so vLLM's chat endpoint, which serves the trained adapter) does not write. The
# stack renders as openai-harmony does, with the date of the run's first start, so that a resumed run renders the
# same prompts and the trained policy is queried with the prompts it was trained on.
TEMPLATE_DATE = 'strftime_now("%Y-%m-%d")'
TEMPLATE_DEVELOPER_END = '{{- developer_message }}\n        {{- "\\n\\n" }}'
PROMPT_DATE_FILE = "prompt_date"


def pin_prompt_template(tokenizer, date: str) -> bool:
    """Give a harmony tokenizer's chat template the run's date and openai-harmony's developer message; False (the
    template left as it is) for a template that is not the Hub's gpt-oss one."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or TEMPLATE_DATE not in template or TEMPLATE_DEVELOPER_END not in template:
        return False
    tokenizer.chat_template = template.replace(TEMPLATE_DATE, repr(date)).replace(
        TEMPLATE_DEVELOPER_END, "{{- developer_message }}")
    return True


def run_prompt_date(run_dir: Path, today: datetime.date | None = None) -> str:
    """The date the run's prompts carry: the day of its first start, kept in the run directory."""
    path = run_dir / PROMPT_DATE_FILE
    if path.is_file():
        return path.read_text().strip()
    date = (today or datetime.date.today()).isoformat()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, date + "\n")
    return date
