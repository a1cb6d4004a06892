"""Sums of two numbers from 1 to 9, generated: the bundled task a small instruct model learns in minutes (DATASET=sums).

Held out for real: the unordered pairs {a, b} are split once, by a fixed seed, into training pairs and evaluation
pairs, so evaluation asks only sums the policy never trained on (in either order). Each split then draws its rows,
phrasings included, with its own seed. The answer is the bare number, which the `accuracy` reward compares with
math-verify; that reward reads only a marked answer, so each question asks for one: a 135M model follows an
instruction in the question far more often than one in the system prompt.
"""

from __future__ import annotations

import random

PHRASINGS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "{a} + {b} = ?",
)
ANSWER_INSTRUCTION = " Answer with \\boxed{}."
SPLITS = {"train": (1, 1000), "test": (2, 64)}  # split: (seed of its rows, number of rows)
EVAL_PAIR_COUNT = 9  # of the 45 unordered pairs
PAIR_SPLIT_SEED = 0


def pairs(split: str) -> list[tuple[int, int]]:
    """The unordered pairs (a <= b) whose sums `split` asks."""
    unordered = [(a, b) for a in range(1, 10) for b in range(a, 10)]
    random.Random(PAIR_SPLIT_SEED).shuffle(unordered)
    return sorted(unordered[:EVAL_PAIR_COUNT] if split == "test" else unordered[EVAL_PAIR_COUNT:])


def single_digit_sums(split: str) -> list[dict]:
    """Rows {"question", "answer"} of `split` ("train" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"the generated data set has the splits {', '.join(SPLITS)}, not {split!r}")
    seed, count = SPLITS[split]
    rng = random.Random(seed)
    choices = pairs(split)
    rows = []
    for _ in range(count):
        a, b = rng.choice(choices)
        if rng.random() < 0.5:
            a, b = b, a
        rows.append({"question": rng.choice(PHRASINGS).format(a=a, b=b) + ANSWER_INSTRUCTION, "answer": str(a + b)})
    return rows
