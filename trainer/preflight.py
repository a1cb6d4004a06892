"""Everything the trainer can check without the vLLM server, checked before it waits for the server (up to
VLLM_WAIT_TIMEOUT): the settings, the runs directory, the reward names, the training and evaluation data and every
row of a data file, MODEL_NAME, LORA_TARGET_MODULES against the model's own modules, and ATTN_IMPLEMENTATION against
the model and the GPUs. Every problem is reported at once, each naming its setting and the fix; the entry script
exits 2 on any.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .attention import attention_problems, resolved_attn_implementation
from .config import Settings, SettingsError
from .data import DatasetError, eval_data_source, is_hub_name, load_prompts
from .rewards import reward_problems


def checked_settings(environ: Mapping[str, str]) -> Settings:
    """The settings, if they and everything they point at are usable; else SettingsError listing every problem."""
    settings, problems = Settings.parse(environ)
    problems += problems_before_server(settings)
    if problems:
        raise SettingsError(list(dict.fromkeys(problems)))  # evaluation may read DATASET too: one line each
    return dataclasses.replace(settings, attn_implementation=resolved_attn_implementation(
        settings.attn_implementation, settings.torch_dtype))


HUB_PROBE_TIMEOUT = 5.0  # seconds


def problems_before_server(s: Settings) -> list[str]:
    problems = runs_dir_problems(s.runs_dir, s.run_name) + reward_problems(s.reward_funcs)
    eval_source = eval_data_source(s.dataset, s.eval_dataset) if s.eval_steps else None
    eval_setting = "EVAL_DATASET" if s.eval_dataset else "DATASET"
    on_hub = [name for name in (s.dataset, eval_source) if name is not None and is_hub_name(name)]
    on_hub += [] if is_local_path(s.model_name) else [s.model_name]
    with cache_only_if_hub_unreachable(bool(on_hub)) as unreachable:
        problems += guarded("DATASET", lambda: data_problems(s.dataset, s.dataset_config, s.dataset_split,
                                                             "DATASET", unreachable))
        if eval_source is not None:
            problems += guarded(eval_setting, lambda: data_problems(eval_source, s.dataset_config, s.eval_split,
                                                                    eval_setting, unreachable))
        problems += guarded("MODEL_NAME", lambda: model_problems(s.model_name, s.lora_target_modules, unreachable))
        problems += guarded("ATTN_IMPLEMENTATION", lambda: attention_problems(
            s.attn_implementation, s.torch_dtype, model_type_or_none(s.model_name)))
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


def data_problems(name: str, config: str, split: str, setting: str, hub_unreachable: str | None) -> list[str]:
    try:
        load_prompts(name, config, split, system_prompt="", setting=setting)
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
