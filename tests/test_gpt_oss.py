"""The trainer's model path on GPT-OSS's own architecture (MoE, attention sinks, alternating sliding window),
loaded from an MXFP4 checkpoint in the published layout, at toy size on the CPU.

vLLM's CPU build cannot run LoRA on a MoE model, so the GRPO step samples with transformers inside TRL; everything
on the training side (load with dequantization, LoRA targets, TRL's loss, the saved adapter's format) is the
stack's. A real vLLM server serves the same model without LoRA to check that both sides compute the same function.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trl import GRPOTrainer

from conftest import build_tiny_gpt_oss, start_server
from benchmarks.build_gpt_oss_checkpoint import write_dense_copy
from benchmarks.logprob_agreement import completion_logprobs
from trainer.config import Settings
from trainer.grpo import MeasuredGRPOTrainer
from trainer.harmony import pin_prompt_template
from trainer.ranks import Ranks
from trainer.data import load_prompts
from trainer.model import load_model, load_tokenizer, lora_config
from trainer.rewards import load_rewards
from trainer.recipe import grpo_config


def test_mxfp4_checkpoint_loads_dequantized_with_nothing_missing(mxfp4_checkpoint):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model, info = AutoModelForCausalLM.from_pretrained(
        mxfp4_checkpoint, quantization_config=Mxfp4Config(dequantize=True), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.abs().max() > 0


def test_one_grpo_step_with_lora_on_gpt_oss(mxfp4_checkpoint, tmp_path):
    model = load_model(str(mxfp4_checkpoint), "float32", "eager", 30, gradient_checkpointing=True)
    assert type(model).__name__ == "GptOssForCausalLM"
    tokenizer = load_tokenizer(str(mxfp4_checkpoint))
    dataset = load_prompts("sample", "", "train", "Solve it.").select(range(4))
    settings = Settings.from_env({"RUNS_DIR": str(tmp_path), "GRADIENT_ACCUMULATION_STEPS": "4",
                                  "NUM_GENERATIONS": "4", "MAX_COMPLETION_LENGTH": "8", "MAX_STEPS": "1",
                                  "LEARNING_RATE": "0.05", "WARMUP_STEPS": "0", "REPORT_TO": "none"})
    args = grpo_config(settings, use_cpu=True)  # the trainer's own TRL settings
    args.use_vllm = False  # vLLM's CPU build cannot run LoRA on a MoE: transformers samples here
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args, train_dataset=dataset,
                          reward_funcs=load_rewards(("tests.rewards.known_word_fraction", "boxed_format")),
                          peft_config=lora_config(4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    trainer.train()
    history = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(history["loss"])) and history["grad_norm"] > 0
    assert "aux_loss" not in history  # the MoE load-balancing loss TRL would add (0.9 from the config) is off

    trainer.save_model(str(tmp_path / "adapter"))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"base_model.model.model.layers.1.self_attn.{module}.lora_B.weight" in weights
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k), "the step did not move the adapter"


@pytest.fixture(scope="module")
def real_tokenizer_checkpoint(tmp_path_factory, gpt_oss_tokenizer_dir):
    return build_tiny_gpt_oss(tmp_path_factory.mktemp("models") / "tiny-gpt-oss-real-tokenizer",
                              "--tokenizer", "real", "--tokenizer-dir", str(gpt_oss_tokenizer_dir))


def test_one_grpo_step_on_gpt_oss_with_its_real_tokenizer(real_tokenizer_checkpoint, tmp_path):
    """The stack's trainer class (harmony parsing, its metrics) on GPT-OSS's architecture, real vocabulary and
    prompts; transformers samples, as above."""
    model = load_model(str(real_tokenizer_checkpoint), "float32", "eager", 30, gradient_checkpointing=True)
    assert model.config.vocab_size == 201088
    tokenizer = load_tokenizer(str(real_tokenizer_checkpoint))
    assert pin_prompt_template(tokenizer, "2026-12-07")
    dataset = load_prompts("sample", "", "train", "Solve it.").select(range(4))
    settings = Settings.from_env({"RUNS_DIR": str(tmp_path), "GRADIENT_ACCUMULATION_STEPS": "4",
                                  "NUM_GENERATIONS": "4", "MAX_COMPLETION_LENGTH": "12", "MAX_STEPS": "1",
                                  "LEARNING_RATE": "0.05", "WARMUP_STEPS": "0", "REPORT_TO": "none"})
    args = grpo_config(settings, use_cpu=True)
    args.use_vllm = False
    trainer = MeasuredGRPOTrainer(ranks=Ranks(), model=model, processing_class=tokenizer, args=args,
                                  train_dataset=dataset,
                                  reward_funcs=load_rewards(("tests.rewards.low_id_fraction", "final_number")),
                                  peft_config=lora_config(4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    trainer.train()
    history = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(history["loss"])) and history["grad_norm"] > 0
    # a random model writes no harmony: no final answer, so the answer reward scores 0 and nothing raises
    assert history["completions/no_final_ratio"] == 1.0 and history["rewards/final_number_reward/mean"] == 0.0
    assert history["completions/mean_final_length"] == 0.0
    prompt = tokenizer.decode(trainer._tokenize_prompts([dataset[0]["prompt"]])[0][0])
    assert prompt.startswith("<|start|>system<|message|>") and "Current date: 2026-12-07" in prompt
    trainer.save_model(str(tmp_path / "adapter"))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k), "the step did not move the adapter"


def test_vllm_and_the_trainer_compute_the_same_gpt_oss(mxfp4_checkpoint, tmp_path):
    """vLLM's sampling logprobs equal the trainer's model's (float32) on tokens well past the sliding window:
    sinks, sliding window, YaRN, top-k routing and the dequantized experts mean the same on both sides."""
    from trainer.vllm_client import VLLMServerClient

    model = load_model(str(mxfp4_checkpoint), "float32", "eager", 30, gradient_checkpointing=False).eval()
    # vLLM's CPU build has no MXFP4 kernels: it serves the experts the trainer dequantized, as plain weights.
    dense = write_dense_copy(mxfp4_checkpoint, tmp_path / "dense", torch.float32)
    config = json.loads((dense / "config.json").read_text())
    window = config["sliding_window"]
    server = start_server(dense, tmp_path / "vllm.log", server_args=[
        "--model", str(dense), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "256",
        "--logprobs-mode", "processed_logprobs"], VLLM_API_KEY="")
    try:
        prompts = [[5 + (7 * i + 3 * j) % 500 for j in range(2 * window)] for i in range(3)]
        completions = VLLMServerClient(server.url).complete(str(dense), prompts, n=2, max_tokens=12 * window,
                                                            temperature=1.0, top_p=1.0)
    finally:
        server.stop()
    assert sum(len(c.token_ids) for c in completions) > 20 * window

    def mean_gap(m):
        gaps = [(completion_logprobs(m, prompts[c.prompt_index], c.token_ids) - torch.tensor(c.logprobs)).abs()
                for c in completions]
        return torch.cat(gaps).mean().item(), torch.cat(gaps).max().item()

    mean, worst = mean_gap(model)
    assert mean < 1e-3 and worst < 1e-2, (mean, worst)
    # What a real mismatch looks like: the same model without attention sinks, or attending in full everywhere.
    sinks = [layer.self_attn.sinks.data.clone() for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.sinks.data.zero_()
    assert mean_gap(model)[0] > 5 * mean
    for layer, sink in zip(model.model.layers, sinks):
        layer.self_attn.sinks.data.copy_(sink)
        layer.self_attn.sliding_window = None
    model.config.layer_types = ["full_attention"] * len(model.model.layers)
    assert mean_gap(model)[0] > 50 * mean
