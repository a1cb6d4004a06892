"""GRPO + LoRA fine-tuning of GPT-OSS against a vLLM server, configured by environment variables.

    python train_grpo_vllm.py            # settings from the environment (.env in the compose stack)
    python train_grpo_vllm.py --help     # every setting, its default and meaning

The container starts it through launch.py, which starts one process per GPU (TRAINER_PROCESSES) with torchrun.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # Python puts the script's own folder first on sys.path, where trainer/rewards.py, data.py, model.py would
    # shadow a user's module of the same name (REWARD_FUNCS=rewards.my_fn): the package's folder instead.
    HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from transformers import ProgressCallback

from trainer.checkpoints import checkpoints_newest_first, latest_intact_checkpoint
from trainer.config import Settings, SettingsError, help_text
from trainer.data import DatasetError
from trainer.evaluation import Evaluator
from trainer.generation import ServerGeneration, ServerRecovery
from trainer.grpo import AdapterSyncGRPOTrainer
from trainer.harmony import HarmonyTokens, pin_prompt_template, run_prompt_date
from trainer.model import load_model, load_tokenizer, lora_config
from trainer.preflight import checked_settings
from trainer.ranks import Ranks, start_ranks
from trainer.rewards import RewardError, load_rewards
from trainer.recipe import collective_timeout, grpo_config, load_eval_prompts, training_prompts
from trainer.run_log import QuietProgress, RunLogger, SampleWriter, setup_logging
from trainer.shutdown import GracefulStop
from trainer.server_pool import server_backend
from trainer.vllm_client import AdapterUnreadable, ServerError, StopRequested

log = logging.getLogger("trainer")


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip() + "\n\n" + help_text())
        return 0
    try:
        if os.environ.get("TRAINER_SETTINGS_CHECKED") == "1":  # by launch.py, once for all processes
            settings = Settings.from_env(os.environ)
        else:
            settings = checked_settings(os.environ)  # all that needs no server, before waiting for it
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ranks = start_ranks(collective_timeout(settings))
    setup_logging(settings.run_dir, ranks.rank, ranks.world_size)
    stop = GracefulStop(ranks)
    if ranks.is_main:
        log.info("resolved settings:\n%s", settings.describe())
    try:
        return train(settings, stop, ranks)
    except (SettingsError, DatasetError, RewardError) as exc:  # found only later: still the settings' fault
        log.error("%s", exc)
        return 2
    except ServerError as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:
        if not disk_full(exc):
            raise
        log.error("the runs volume is full (%s): %s. Free space there and restart; training resumes from the "
                  "newest complete checkpoint, which a failed save never replaces", settings.runs_dir, exc)
        return 1


def disk_full(exc: BaseException | None) -> bool:
    """True if `exc` or anything that caused it is 'No space left on device' (torch and safetensors rewrap it)."""
    while exc is not None:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def train(s: Settings, stop: GracefulStop, ranks: Ranks = Ranks()) -> int:
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(s.run_dir / "tb"))
    reward_funcs = load_rewards(s.reward_funcs)  # unknown names fail before anything slow
    client = server_backend(s)
    log.info("Generation config: use_vllm=True, vllm_mode=server, server=%s, weight_sync=lora_adapter, "
             "num_generations=%d, prompts_per_step=%d, max_completion_length=%d, temperature=%s, top_p=%s, "
             "sequences_per_round=%d (%d step(s) each), max_off_policy_steps=%d (%s)",
             ", ".join(s.server_urls), s.num_generations, s.prompts_per_step, s.max_completion_length, s.temperature, s.top_p,
             s.sequences_per_round, s.steps_per_round, s.max_off_policy_steps,
             "the next round is sampled while a step trains" if s.max_off_policy_steps else "synchronous")
    tokenizer = load_tokenizer(s.model_name)
    if HarmonyTokens.of(tokenizer) is not None:
        date = ranks.on_main(lambda: run_prompt_date(s.run_dir))
        if pin_prompt_template(tokenizer, date):
            log.info("prompts in GPT-OSS's harmony format as openai-harmony renders them, dated %s (the run's "
                     "first start); completions reach the rewards as their final channel", date)
        else:
            log.warning("the tokenizer has harmony's tokens but not the gpt-oss chat template: prompts are rendered "
                        "with its own template, dated as it dates them; completions reach the rewards as their "
                        "final channel")
    dataset = training_prompts(s, tokenizer)  # prompts too long for MAX_PROMPT_LENGTH are found before the wait
    ranks.on_main(lambda: check_server(s, ServerRecovery(client, s.vllm_wait_timeout, lambda: stop.requested)))

    model = load_model(s.model_name, s.torch_dtype, s.attn_implementation, s.gpu_memory_budget_gib,
                       s.gradient_checkpointing, for_ranks=ranks.distributed, experts_format=s.experts_format,
                       experts_forward=s.experts_forward)
    trainer = AdapterSyncGRPOTrainer(ranks=ranks,
        client=client, adapters_dir=s.run_dir / "adapters", wait_timeout=s.vllm_wait_timeout,
        stop_requested=lambda: stop.requested, max_off_policy_steps=s.max_off_policy_steps,
        model=model, processing_class=tokenizer, reward_funcs=reward_funcs, train_dataset=dataset,
        args=grpo_config(s, use_cpu=not torch.cuda.is_available(), processes=ranks.world_size),
        peft_config=lora_config(s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_target_modules))
    check_adapter_registration(trainer.vllm_generation)
    add_callbacks(trainer, s, reward_funcs, stop, ranks)

    checkpoint = ranks.on_main(lambda: latest_intact_checkpoint(s.run_dir))
    log.info("resuming from %s", checkpoint) if checkpoint else log.info("starting a new run in %s", s.run_dir)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except StopRequested as exc:  # the step in flight cannot finish without the server: keep the last checkpoint
        saved = checkpoints_newest_first(s.run_dir)
        log.warning("%s; exiting without finishing step %d (restart resumes from %s)", exc,
                    trainer.state.global_step + 1, saved[0].name if saved else "the start")
        return 0
    if stop.requested:
        log.info("stopped at step %d; checkpoint saved, restart to resume", trainer.state.global_step)
        return 0
    final = s.run_dir / "final_adapter"
    trainer.save_model(str(final))
    ranks.barrier()
    log.info("finished %d steps; final adapter (PEFT, loadable by transformers and vLLM) in %s",
             trainer.state.global_step, final)
    try:
        ranks.on_main(lambda: trainer.vllm_generation.publisher.publish_final(s.run_name, final))
        log.info("the vLLM server at %s serves the final adapter as model %r", client.base_url, s.run_name)
    except ServerError as exc:  # the adapter is saved; serving it is a convenience that must not fail the run
        log.warning("could not register the final adapter with the vLLM server as %r: %s", s.run_name, exc)
    return 0


def check_server(s: Settings, recovery: ServerRecovery) -> None:
    """Wait for the server, then check it can serve what the settings ask for."""
    recovery.client.wait_until_healthy(s.vllm_wait_timeout)
    served = recovery.call("start-up probe (served model)", recovery.client.served_model)
    max_model_len = served.get("max_model_len")
    if max_model_len and s.max_prompt_length + s.max_completion_length > max_model_len:
        raise SettingsError(f"MAX_PROMPT_LENGTH + MAX_COMPLETION_LENGTH = {s.max_prompt_length + s.max_completion_length} "
                            f"exceeds the server's --max-model-len {max_model_len}: lower them or raise VLLM_MAX_MODEL_LEN")
    kv_tokens = recovery.client.kv_cache_tokens()
    round_tokens = s.sequences_per_round * (s.max_prompt_length + s.max_completion_length)
    if kv_tokens and round_tokens > kv_tokens:
        log.warning("one generation round may need KV cache for %d tokens (%d sequences x MAX_PROMPT_LENGTH + "
                    "MAX_COMPLETION_LENGTH) but the server holds %d: long rounds will be preempted and recomputed. "
                    "Raise VLLM_GPU_MEMORY_UTILIZATION or lower GENERATION_BATCH_SIZE", round_tokens,
                    s.sequences_per_round, kv_tokens)
    if served["id"] != s.model_name:
        log.warning("the server serves %r but MODEL_NAME is %r: adapters are trained on MODEL_NAME", served["id"], s.model_name)


def add_callbacks(trainer: AdapterSyncGRPOTrainer, s: Settings, reward_funcs, stop: GracefulStop,
                  ranks: Ranks) -> None:
    metrics = trainer.step_metrics
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress())
    if s.eval_steps and (eval_dataset := load_eval_prompts(s)) is not None:
        trainer.add_callback(Evaluator(trainer.vllm_generation, trainer.processing_class, eval_dataset, reward_funcs,
                                       s.reward_weights, s.eval_steps, metrics, s.chat_template_kwargs))
    if ranks.is_main:
        trainer.add_callback(SampleWriter(metrics, s.run_dir, s.samples_steps, s.samples_per_step))
    trainer.add_callback(RunLogger(s.run_dir, trainer.vllm_generation, trainer.memory, lambda: {
        f"rewards/{f.__name__}/failures": f.failures for f in reward_funcs}, metrics, ranks))
    trainer.add_callback(stop)


def check_adapter_registration(generation: ServerGeneration) -> None:
    """Register the untrained adapter once before training, so a server that cannot take it fails the start."""
    try:
        generation.check_server_accepts_adapter()
    except AdapterUnreadable:  # its message names the fix
        raise
    except ServerError as exc:
        raise ServerError(f"{exc}\nthe vLLM server must run with --enable-lora, --max-lora-rank >= LORA_RANK and "
                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (VLLM_MAX_LORA_RANK in .env)") from exc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
