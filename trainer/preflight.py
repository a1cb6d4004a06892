"""Everything the trainer can check without the vLLM server, checked before it waits for the server (up to
VLLM_WAIT_TIMEOUT): the settings, the runs directory, the reward names, the training and evaluation data and every
row of a data file, MODEL_NAME, LORA_TARGET_MODULES against the model's own modules, and ATTN_IMPLEMENTATION against
the model and the GPUs, and each reward called once on a few rows of the data with a placeholder completion (a
reward that cannot take the data's columns would score 0 on every batch). Every problem is reported at once, each
naming its setting and the fix; the entry script (and `launch.py --check`) exits 2 on any.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import numbers
import os
import re
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .attention import attention_problems, resolved_attn_implementation
from .config import Settings, SettingsError
from .data import DatasetError, eval_data_source, is_hub_name, load_prompts
from .rewards import resolve, reward_arguments, reward_problems


def checked_settings(environ: Mapping[str, str]) -> Settings:
    """The settings, if they and everything they point at are usable; else SettingsError listing every problem."""
    settings, problems = Settings.parse(environ)
    problems += problems_before_server(settings)
    if problems:
        raise SettingsError(list(dict.fromkeys(problems)))  # evaluation may read DATASET too: one line each
    return dataclasses.replace(settings, attn_implementation=resolved_attn_implementation(
        settings.attn_implementation, settings.torch_dtype))


HUB_PROBE_TIMEOUT = 5.0  # seconds
TRIAL_ROWS = 2  # rows of each data set every reward is called with before the server is waited for
PLACEHOLDER_COMPLETION = "A placeholder completion of the start-up check, not sampled: \\boxed{0}"
log = logging.getLogger(__name__)


def problems_before_server(s: Settings) -> list[str]:
    unknown_rewards = reward_problems(s.reward_funcs)
    problems = runs_dir_problems(s.runs_dir, s.run_name) + unknown_rewards
    eval_source = eval_data_source(s.dataset, s.eval_dataset) if s.eval_steps else None
    eval_setting = "EVAL_DATASET" if s.eval_dataset else "DATASET"
    on_hub = [name for name in (s.dataset, eval_source) if name is not None and is_hub_name(name)]
    on_hub += [] if is_local_path(s.model_name) else [s.model_name]
    loaded: dict[str, object] = {}  # each data set that loaded, by what it is, for the rewards' trial call
    with cache_only_if_hub_unreachable(bool(on_hub)) as unreachable:
        problems += guarded("DATASET", lambda: data_problems(s.dataset, s.dataset_config, s.dataset_split,
                                                             "DATASET", unreachable, s.system_prompt, loaded))
        if eval_source is not None:
            problems += guarded(eval_setting, lambda: data_problems(eval_source, s.dataset_config, s.eval_split,
                                                                    eval_setting, unreachable, s.system_prompt,
                                                                    loaded))
        problems += guarded("MODEL_NAME", lambda: model_problems(s.model_name, s.lora_target_modules, unreachable))
        problems += guarded("ATTN_IMPLEMENTATION", lambda: attention_problems(
            s.attn_implementation, s.torch_dtype, model_type_or_none(s.model_name)))
    if not unknown_rewards:
        problems += guarded("REWARD_FUNCS", lambda: reward_call_problems(s.reward_funcs, loaded))
    return problems


def is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


@contextmanager
def cache_only_if_hub_unreachable(needed: bool) -> Iterator[str | None]:
    """The Hub client retries a Hub it cannot reach, with backoff, for every file it asks for. If the Hub does not
    answer one quick request, look only in the local cache (as HF_HUB_OFFLINE=1 does) and yield why; else None."""
    import datasets
    from huggingface_hub import constants

    reason = hub_unreachable() if needed and not constants.HF_HUB_OFFLINE else None
    if reason is None:
        yield None
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def hub_unreachable() -> str | None:
    import requests
    from huggingface_hub import constants

    try:
        requests.head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except requests.RequestException as exc:
        return f"{constants.ENDPOINT}: {type(exc).__name__}"
    return None


def guarded(setting: str, check: Callable[[], list[str]]) -> list[str]:
    """A check that failed in a way nobody foresaw still reports its setting, not a traceback."""
    try:
        return check()
    except Exception as exc:
        return [f"{setting}: checking it failed with {type(exc).__name__}: {str(exc)[:500]}"]


def runs_dir_problems(runs_dir: Path, run_name: str) -> list[str]:
    shown = f"RUNS_DIR={str(runs_dir)!r}"
    try:
        for path in (runs_dir, runs_dir / run_name):
            if path.exists() and not path.is_dir():
                return [f"{shown}: {path} is a file, not a directory: point RUNS_DIR at a directory (the runs volume)"]
        existing = next(p for p in (runs_dir, *runs_dir.absolute().parents) if p.exists())
    except (OSError, ValueError) as exc:
        return [f"{shown}: unusable path ({exc}): point RUNS_DIR at a directory (the runs volume)"]
    if not existing.is_dir():
        return [f"{shown}: {existing} is a file, so no directory can be made under it: point RUNS_DIR elsewhere"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{shown}: {existing} is not writable by this user (uid {os.getuid()}): make it writable (the "
                "trainer image runs as uid 1000) or point RUNS_DIR elsewhere"]
    return []


def data_problems(name: str, config: str, split: str, setting: str, hub_unreachable: str | None,
                  system_prompt: str = "", loaded: dict | None = None) -> list[str]:
    try:
        dataset = load_prompts(name, config, split, system_prompt=system_prompt, setting=setting)
        if loaded is not None:
            loaded[f"{setting}={name!r} (split {split!r})"] = dataset
    except DatasetError as exc:
        if hub_unreachable and is_hub_name(name):
            return [f"{setting}={name!r}: not in the local Hugging Face cache, and the Hub cannot be reached "
                    f"({hub_unreachable}): check the network, or use a .jsonl file or 'sample'"]
        return [str(exc)]
    return []


def model_problems(model_name: str, target_modules: tuple[str, ...], hub_unreachable: str | None = None) -> list[str]:
    """MODEL_NAME is a checkpoint directory or a Hub model transformers knows, and every LoRA target is in it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    from .model import lora_target_problems

    shown = f"MODEL_NAME={model_name!r}"
    if is_local_path(model_name):
        path = Path(model_name).expanduser()
        if not path.is_dir():
            return [f"{shown}: no such directory (paths are seen from inside the trainer container): give a "
                    "checkpoint directory or a Hub name such as openai/gpt-oss-20b"]
        if not (path / "config.json").is_file():
            return [f"{shown}: the directory has no config.json: point it at a Hugging Face checkpoint directory"]
    else:
        try:
            validate_repo_id(model_name)
        except HFValidationError:
            return [f"{shown}: neither an existing directory nor a Hub name of the form owner/name"]
    try:
        config = AutoConfig.from_pretrained(model_name)
    except Exception as exc:  # the Hub and transformers raise many types; the user needs to know which case
        return [model_load_problem(shown, exc, hub_unreachable)]
    return lora_target_problems(config, target_modules)


def model_type_or_none(model_name: str) -> str | None:
    """The model's type from its config; None where the config cannot be read (MODEL_NAME's check says why)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name).model_type
    except Exception:
        return None


def model_load_problem(shown: str, exc: Exception, hub_unreachable: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    causes = []
    while exc is not None and len(causes) < 10:
        causes.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, GatedRepoError) for e in causes):
        return f"{shown}: the model is gated on the Hugging Face Hub: set HF_TOKEN to a token that was granted access"
    if any(isinstance(e, RepositoryNotFoundError) for e in causes):
        return (f"{shown}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN); check the name, "
                "e.g. openai/gpt-oss-20b")
    if hub_unreachable:
        return (f"{shown}: not in the local Hugging Face cache, and the Hub cannot be reached ({hub_unreachable}): "
                "check the network, or set MODEL_NAME to a local directory")
    if constants.HF_HUB_OFFLINE:
        return (f"{shown}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it: "
                "unset HF_HUB_OFFLINE (the container needs network once) or set MODEL_NAME to a local directory")
    message = str(causes[0]).strip().splitlines()[0][:300] if str(causes[0]).strip() else type(causes[0]).__name__
    if any(isinstance(e, (ConnectionError, TimeoutError, OSError)) for e in causes) and "connect" in message.lower():
        return (f"{shown}: the Hugging Face Hub cannot be reached to fetch the model ({message}): check the "
                "network, or set MODEL_NAME to a local directory")
    return f"{shown}: transformers cannot load its config ({type(causes[0]).__name__}: {message})"


# ---------------------------------------------------------------- the rewards' trial call
def reward_call_problems(names: tuple[str, ...], loaded: dict) -> list[str]:
    """Call each reward once on the first rows of each data set that loaded, with a placeholder completion and the
    arguments TRL gives it in training (rewards.reward_arguments). A reward that cannot be called so (TypeError: a
    parameter no column fills, or one it does not accept; KeyError: a column it reads that the data lacks), or that
    returns no score per completion, is a problem; one that raises anything else is only warned about: the
    placeholder is no real completion."""
    problems = []
    for name in dict.fromkeys(names):
        func = resolve(name)
        for source, dataset in loaded.items():
            if problem := reward_call_problem(name, func, source, dataset):
                problems.append(problem)
                break  # one line per reward: the fix is the same for the other data set
    return problems


class PlaceholderMessage(dict):
    """The placeholder's assistant message: role and content, and an empty text for any other key a model's
    completions may carry (a reward reading one must not fail the start as if a column were missing)."""

    def __missing__(self, key):
        return ""


def trial_arguments(dataset) -> dict:
    """What TRL's GRPOTrainer passes a reward function for these rows, with a placeholder completion each."""
    from transformers import TrainerState

    rows = dataset.select(range(min(TRIAL_ROWS, len(dataset))))
    prompts = rows["prompt"]
    completions = [[PlaceholderMessage(role="assistant", content=PLACEHOLDER_COMPLETION)] if isinstance(prompt, list)
                   else PLACEHOLDER_COMPLETION for prompt in prompts]
    columns = {column: rows[column] for column in rows.column_names if column != "prompt"}
    return reward_arguments(prompts, completions, [[0] for _ in prompts], columns, TrainerState())


def reward_call_problem(name: str, func, source: str, dataset) -> str | None:
    arguments = trial_arguments(dataset)
    columns = [c for c in dataset.column_names if c != "prompt"]
    given = f"it was given {', '.join(a for a in arguments if a not in columns)} and the columns of {source}: " \
            f"{', '.join(columns) or '(none but prompt)'}"
    try:
        scores = func(**arguments)
    except (TypeError, KeyError) as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        inside = Path(frame.filename).resolve() != Path(__file__).resolve()  # else: the call itself failed
        where = f" (at {Path(frame.filename).name}:{frame.lineno})" if inside else ""
        fix = call_fix(exc, columns, getattr(func, "__name__", "reward"))
        return (f"REWARD_FUNCS: reward {name!r} cannot be called with the data's columns: {type(exc).__name__}: "
                f"{exc}{where}; {given}. {fix}")
    except Exception as exc:  # the placeholder may be what it cannot score; training will tell (failures)
        log.warning("REWARD_FUNCS: reward %r raised %s on the start-up check's placeholder completion: %s; during "
                    "training a reward that raises scores 0 and is counted in rewards/<name>/failures",
                    name, type(exc).__name__, exc)
        return None
    if inspect.isawaitable(scores):
        getattr(scores, "close", lambda: None)()  # async rewards run in TRL's own event loop: not tried here
        return None
    expected = len(arguments["completions"])
    if not isinstance(scores, (list, tuple)) or len(scores) != expected or not all(
            s is None or isinstance(s, numbers.Real) or hasattr(s, "__float__") for s in scores):
        shown = repr(scores)[:200]
        return (f"REWARD_FUNCS: reward {name!r} returned {shown} for {expected} completions: a reward returns a "
                f"list of one float (or None) per completion")
    return None


def call_fix(exc: Exception, columns: list[str], func_name: str) -> str:
    """The fix for a reward that cannot be called with the data's columns, from how it failed."""
    message = str(exc)
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else None
        if isinstance(key, str) and key not in columns:
            return (f"The data has no column {key!r}: add it to the data set (every column reaches the rewards "
                    f"under its own name), or read a column it has")
        return "Fix the reward: it failed on the data's first rows"
    if missing := re.search(r"missing \d+ required (?:positional |keyword-only )?arguments?: (.+)", message):
        absent = re.findall(r"'([^']+)'", missing.group(1))
        return (f"The data has no column {' or '.join(map(repr, absent))}: add it to the data set (every column "
                f"reaches the rewards under its own name), or rename the parameter to a column it has")
    if unexpected := re.search(r"unexpected keyword argument '([^']+)'", message):
        return (f"Add **kwargs to its parameters: every reward gets TRL's arguments and every column "
                f"({unexpected.group(1)!r} here), e.g. def {func_name}(completions, <the columns it needs>, **kwargs)")
    return ("Fix the reward: write it as def reward(completions, <the columns it needs>, **kwargs), returning one "
            "float per completion")
