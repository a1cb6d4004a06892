"""Reward functions by name: TRL's own (`trl.rewards`) plus a format reward, or any `module.function` path.

Follows TRL's `trl/scripts/grpo.py`: a registry of names, with dotted import paths for user rewards. Every reward
is wrapped so one that raises scores 0 for that batch, is counted and logged, and never stops training.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from typing import Callable

from trl.rewards import accuracy_reward, think_format_reward

log = logging.getLogger(__name__)

BOXED = re.compile(r"\\boxed\{[^{}]+\}")  # an empty box is no answer
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion) -> str:
    """Completions are message lists for chat data, plain text otherwise. For GPT-OSS the message's `content` is
    the final channel alone (its reasoning is in `thinking`), empty when the completion has no final answer."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def boxed_format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion gives exactly one final answer in \\boxed{...}, else 0.0."""
    return [1.0 if len(BOXED.findall(completion_text(c))) == 1 else 0.0 for c in completions]


def final_number_reward(completions, solution: list[str], **kwargs) -> list[float]:
    """1.0 when the answer equals the solution: the last \\boxed{...}, which must hold a number and nothing else, or,
    without a box, the last number written.

    For tasks whose answers are plain numbers. Unlike `accuracy`, which evaluates what it finds with math-verify, an
    expression is not an answer here: `\\boxed{3 + 4}` scores 0 for 7 (a policy rewarded for it learns to copy the
    question into the box instead of adding).
    """
    scores = []
    for completion, expected in zip(completions, solution):
        text = completion_text(completion).replace(",", "")
        if boxed := BOXED.findall(text):
            inner = boxed[-1][len("\\boxed{"):-1].strip(" $")
            written = inner if NUMBER.fullmatch(inner) else None
        else:
            written = next(reversed(NUMBER.findall(text)), None)
        scores.append(1.0 if written is not None and _same_number(written, expected) else 0.0)
    return scores


def _same_number(written: str, expected: str) -> bool:
    try:
        return float(written) == float(str(expected).replace(",", "").strip())
    except ValueError:
        return False


REWARD_REGISTRY: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "final_number": final_number_reward,
    "boxed_format": boxed_format_reward,
    "think_format": think_format_reward,
}


class RewardError(ValueError):
    pass


def _no_op(*args, **kwargs) -> None:
    pass


def reward_arguments(prompts: list, completions: list, completion_ids: list[list[int]], columns: dict,
                     trainer_state) -> dict:
    """The keyword arguments TRL's GRPOTrainer gives every reward function (its `_calculate_rewards`): the prompts,
    the completions and their token IDs, every data column under its own name, the trainer's state, and its two
    logging hooks (no-ops outside TRL's own call). The start-up check and evaluation call rewards with the same."""
    return dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns,
                trainer_state=trainer_state, log_extra=_no_op, log_metric=_no_op)


def tolerant(func: Callable) -> Callable:
    """Wrap `func` so an exception scores 0 for the batch and is counted in `wrapper.failures`."""
    @functools.wraps(func)
    def wrapper(completions, **kwargs):
        try:
            return func(completions=completions, **kwargs)
        except Exception as exc:  # a user's reward may raise anything; the run must go on
            wrapper.failures += 1
            log.warning("reward %s raised %s: %s; scoring 0 for %d completions", func.__name__,
                        type(exc).__name__, exc, len(completions))
            return [0.0] * len(completions)

    wrapper.failures = 0
    return wrapper


def resolve(name: str) -> Callable:
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name]
    if "." not in name:
        raise RewardError(f"REWARD_FUNCS: unknown reward {name!r}; use one of {', '.join(REWARD_REGISTRY)} "
                          "or a dotted path module.function")
    module_path, func_name = name.rsplit(".", 1)
    try:
        func = getattr(importlib.import_module(module_path), func_name)
    except Exception as exc:  # importing a user's module runs its code: any error means the same to the user
        raise RewardError(f"REWARD_FUNCS: cannot import {name!r} ({type(exc).__name__}: {exc}); check the module "
                          "is on PYTHONPATH inside the trainer container") from exc
    if not callable(func):
        raise RewardError(f"REWARD_FUNCS: {name!r} is a {type(func).__name__}, not a function")
    return func


def reward_problems(names: tuple[str, ...]) -> list[str]:
    """What is wrong with each reward name, all at once."""
    problems = []
    for name in names:
        try:
            resolve(name)
        except RewardError as exc:
            problems.append(str(exc))
    return problems


def load_rewards(names: tuple[str, ...]) -> list[Callable]:
    return [tolerant(resolve(name)) for name in names]
