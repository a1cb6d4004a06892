"""One forward less per sequence: an on-policy round takes its old logprobs from the training forward
(trainer/old_logprobs.py) and trains as with TRL's extra no-grad pass: the same loss, LoRA gradients and sampling
metrics, with one forward per sequence instead of two. No server: a stand-in backend returns fixed completions with
sampling logprobs far enough from the trainer's that the importance-sampling weights are clamped, masked and not."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo
from transformers import TrainerCallback

from trainer.config import Settings
from trainer.data import load_prompts
from trainer.grpo import MeasuredGRPOTrainer
from trainer.model import load_model, load_tokenizer, lora_config
from trainer.ranks import Ranks
from trainer.recipe import grpo_config

SAMPLING_METRICS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                    "sampling/importance_sampling_ratio/max")


class FixedCompletions:
    """TRL's vLLM backend interface: each prompt's completion and its logprobs depend on the prompt alone."""

    vllm_client = property(lambda self: self)

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        completions, logprobs = [], []
        for i, prompt in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(prompt) + i)
            length = 3 + i % 5  # completions of several lengths: padding in every micro-batch but the longest
            completions.append([int(t) for t in torch.randint(3, 250, (length,), generator=g)])
            # the tiny model's logprobs are near -log(256) = -5.5: ratios from e^-3 to e^3, some past the clamp
            lps = [[float(v)] for v in -5.5 + 3 * (2 * torch.rand(length, generator=g) - 1)]
            if i == 1:
                lps[0] = [None]  # a token vLLM could not score
            logprobs.append(lps)
        return prompts, completions, logprobs, None


def length_reward(completions, **kwargs):
    return [float(len(str(c))) for c in completions]


class Capture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_step(tiny_model, tmp_path, loss_type: str, mode: str, reuse: bool):
    settings = Settings.from_env({"RUNS_DIR": str(tmp_path), "GRADIENT_ACCUMULATION_STEPS": "4",
                                  "NUM_GENERATIONS": "4", "MAX_COMPLETION_LENGTH": "8", "MAX_STEPS": "1",
                                  "LOSS_TYPE": loss_type, "IMPORTANCE_SAMPLING": mode, "LEARNING_RATE": "0.05",
                                  "WARMUP_STEPS": "0", "REPORT_TO": "none"})
    args = grpo_config(settings, use_cpu=True)
    args.max_grad_norm = 0.0  # the gradients as the loss gives them
    model = load_model(str(tiny_model), "float32", "eager", 30, gradient_checkpointing=True)
    torch.manual_seed(0)
    config = lora_config(4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    config.init_lora_weights = False  # a policy away from the base: every LoRA matrix gets a gradient
    capture = Capture()
    with mock.patch.object(trl_grpo, "VLLMGeneration", lambda *a, **k: FixedCompletions()):
        trainer = MeasuredGRPOTrainer(
            ranks=Ranks(), model=model, processing_class=load_tokenizer(str(tiny_model)), args=args,
            train_dataset=load_prompts("sample", "", "train", "Solve it.").select(range(4)),
            reward_funcs=[length_reward], peft_config=config, callbacks=[capture])
    trainer.reuse_training_logprobs = reuse
    forwards = {"grad": 0, "no_grad": 0}
    trainer.model.get_base_model().model.register_forward_pre_hook(
        lambda *_: forwards.__setitem__("grad" if torch.is_grad_enabled() else "no_grad",
                                        forwards["grad" if torch.is_grad_enabled() else "no_grad"] + 1))
    trainer.train()
    return trainer, trainer.state.log_history[0], capture.grads, forwards


@pytest.mark.parametrize("loss_type,mode", [("dapo", "token_truncate"), ("grpo", "sequence_mask"),
                                            ("dapo", "token_mask")])
def test_on_policy_step_without_the_old_logprob_pass_trains_the_same(tiny_model, tmp_path, loss_type, mode):
    _, with_pass, grads_with, forwards_with = one_step(tiny_model, tmp_path / "pass", loss_type, mode, reuse=False)
    trainer, skipped, grads_skipped, forwards_skipped = one_step(tiny_model, tmp_path / "skip", loss_type, mode,
                                                                 reuse=True)
    # TRL's pass is a no-grad forward of each sequence; without it each is run once, by the training forward
    assert forwards_with == {"grad": 4, "no_grad": 4}
    assert forwards_skipped == {"grad": 4, "no_grad": 0}
    assert skipped["loss"] == pytest.approx(with_pass["loss"], rel=1e-5, abs=1e-7)
    assert with_pass["loss"] != 0
    assert grads_with.keys() == grads_skipped.keys() and len(grads_with) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    for name, grad in grads_with.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_skipped[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for key in SAMPLING_METRICS:  # TRL's names, the same values
        assert skipped[key] == pytest.approx(with_pass[key], rel=1e-5), key
    if mode.endswith("truncate"):
        assert with_pass["sampling/importance_sampling_ratio/max"] == pytest.approx(3.0)  # some ratios clamped
    assert with_pass["sampling/importance_sampling_ratio/min"] < 0.5

    # where the old logprobs are not the current ones, TRL's pass stays
    assert trainer.skips_old_logprob_pass() is True
    for attribute, value in (("max_off_policy_steps", 1), ("num_iterations", 2)):
        with mock.patch.object(trainer, attribute, value):
            assert trainer.skips_old_logprob_pass() is False, attribute
    with mock.patch.object(trainer.args, "steps_per_generation", 8):  # two optimizer steps per round
        assert trainer.skips_old_logprob_pass() is False
