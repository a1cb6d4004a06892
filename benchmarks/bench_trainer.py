#!/usr/bin/env python3
"""Trainer-side GPU comparisons, run beside the live vLLM server as in production.

1. Attention for training: eager, sdpa and flex_attention (and FlashAttention 3 through `kernels`, where its
   kernel can be had) against a float64 eager reference, on a 2-layer model with gpt-oss-20b's attention
   (64 query / 8 KV heads of 64, sinks, sliding window 128 then full), 4096 tokens: relative error of the
   logits, and forward+backward time.
2. Sequential backprop vs one batched step on the full checkpoint as the trainer loads it (MXFP4 dequantized to
   bf16, layers balanced over the GPUs, gradient checkpointing, rank-4 LoRA): peak memory and time.

    python benchmarks/bench_trainer.py CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_gpt_oss_checkpoint import two_layer_shape  # noqa: E402
from trainer.model import load_model, lora_config  # noqa: E402


DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"  # the CPU only to check this script end to end


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory(stat, device) -> float:
    return stat(device) / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn, repeats=3):
    fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def attention_comparison(checkpoint: Path, seq_len: int) -> dict:
    from transformers import GptOssConfig, GptOssForCausalLM

    shape = two_layer_shape(checkpoint)
    torch.manual_seed(0)
    # float64 runs only through the plain-PyTorch paths: eager attention, eager (per-expert loop) MoE
    reference = GptOssForCausalLM(GptOssConfig(**{**shape, "_attn_implementation": "eager", "experts_implementation": "eager"}))
    reference = reference.to(DEVICE, torch.float64).eval()
    ids = torch.randint(0, 4096, (1, seq_len), device=DEVICE)
    with torch.no_grad():
        ref_logits = reference(ids).logits.float()
    results, eager_logits = {}, None
    for impl in ("eager", "sdpa", "flex_attention", "kernels-community/vllm-flash-attn3"):
        try:
            model = GptOssForCausalLM(GptOssConfig(**shape))
            model.load_state_dict(reference.state_dict())
            model = model.to(DEVICE, torch.bfloat16)
            model.set_attn_implementation(impl)
            with torch.no_grad():
                logits = model(ids).logits.float()
            rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            logp_gap = (logits.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().mean().item()

            def step(model=model):
                model.zero_grad(set_to_none=True)
                model(ids).logits.float().logsumexp(-1).mean().backward()

            results[impl] = {"rel_error_vs_float64": rel, "mean_abs_logprob_gap": logp_gap,
                             "fwd_bwd_s": timed(step)}
            if eager_logits is None:
                eager_logits = logits
            else:  # how far this kernel is from eager at the same (bf16) precision
                results[impl]["rel_error_vs_eager_bf16"] = ((logits - eager_logits).norm() / eager_logits.norm()).item()
            del model
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            results[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        torch.cuda.empty_cache()
    del reference
    torch.cuda.empty_cache()
    return results


def sequential_vs_batched(checkpoint: Path, seq_len: int, long_len: int, sequences: int = 8) -> dict:
    from peft import get_peft_model

    model = load_model(str(checkpoint), "bfloat16", "eager", 30, gradient_checkpointing=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj")))
    model.train()  # gradient checkpointing is only active in training mode, as under the Trainer
    devices = range(max(torch.cuda.device_count(), 1))
    weights = {d: memory(torch.cuda.memory_allocated, d) for d in devices}
    first = next(model.parameters()).device

    def run(batch: int, length: int, micro_steps: int) -> dict:
        try:
            return measure(batch, length, micro_steps)
        except torch.OutOfMemoryError as exc:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return {"error": f"out of memory: {str(exc)[:120]}"}

    def measure(batch: int, length: int, micro_steps: int) -> dict:
        for d in devices if torch.cuda.is_available() else ():
            torch.cuda.reset_peak_memory_stats(d)
        synchronize()
        start = time.perf_counter()
        for _ in range(micro_steps):
            ids = torch.randint(0, model.config.vocab_size, (batch, length), device=first)
            logits = model(input_ids=ids).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])
            (-logp.mean() / micro_steps).backward()
            del logits, logp
        synchronize()
        return {"seconds": time.perf_counter() - start,
                "peak_gib": {d: memory(torch.cuda.max_memory_allocated, d) for d in devices}}

    results = {"weights_gib": weights}
    for name, args in ((f"sequential_{sequences}x1x{seq_len}", (1, seq_len, sequences)),
                       (f"micro_step_1x{long_len}", (1, long_len, 1)),
                       (f"batched_1x{sequences}x{seq_len}", (sequences, seq_len, 1))):
        results[name] = run(*args)
        if "peak_gib" in results[name]:
            results[name]["peak_minus_weights_gib"] = {d: results[name]["peak_gib"][d] - weights[d] for d in devices}
        print(name, json.dumps(results[name]), flush=True)
    return results


def main() -> None:
    checkpoint = Path(sys.argv[1])
    quick = "--quick" in sys.argv  # toy lengths, for a check of the script on the CPU
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}
    if "--skip-attention" not in sys.argv:
        report["attention"] = attention_comparison(checkpoint, 64 if quick else 4096)
        print(json.dumps(report, indent=1), flush=True)
    report["sequential_vs_batched"] = sequential_vs_batched(checkpoint, 32 if quick else 2048, 64 if quick else 4096)
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
