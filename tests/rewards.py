"""A reward for tests, loaded by dotted path (REWARD_FUNCS=tests.rewards.known_word_fraction) as a user's would be.

A random model rarely solves arithmetic; this one varies across its completions, so GRPO has advantages to learn.
"""

import re

FILLER = re.compile(r"^w\d+$")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def known_word_fraction(completions, **kwargs):
    """Fraction of completion words that are real words (not the tokenizer's filler `w<N>` entries)."""
    scores = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        words = [w for w in text.split() if w not in SPECIAL]
        scores.append(sum(not FILLER.match(w) for w in words) / max(len(words), 1))
    return scores


def always_raises(completions, **kwargs):
    raise RuntimeError("broken reward")


def low_id_fraction(completions, completion_ids, **kwargs):
    """Fraction of a completion's token IDs below 100,000: varies across a random model's completions over GPT-OSS's
    vocabulary, whose harmony format a random model never writes (so its final channel is always empty)."""
    return [sum(t < 100_000 for t in ids) / max(len(ids), 1) for ids in completion_ids]
