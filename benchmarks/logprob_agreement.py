#!/usr/bin/env python3
"""Do vLLM and the trainer compute the same logprobs on the GPU, and where do they part? (BENCHMARKS.md,
"vLLM vs the trainer".)

0. The trainer's weights: the experts of the first and last layer on each GPU, as the trainer's load dequantized
   them, against the checkpoint's MXFP4 blocks dequantized on the CPU (max |difference|, expected 0).
1. transformers' MoE kernels on this GPU: a 2-layer model with the checkpoint's shapes in float32, experts `eager`
   (the per-expert loop) vs `grouped_mm` (the default on CUDA): max |logprob difference|.
2. The stack: completions sampled from each running vLLM server (base model, no adapter), scored by the checkpoint
   loaded exactly as the trainer loads it: with each experts implementation, through TRL's fused LM head as TRL
   calls it and as the trainer calls it (from the head's GPU), and with `--dtypes bfloat16,float32` also in
   float32, which measures what bf16 alone moves on this checkpoint. Servers of the same checkpoint started with
   other flags (`gpu.sh serve-variant`: LoRA off, another attention backend, TP 1, the dense copy) tell vLLM's
   paths apart in one run.

    python benchmarks/logprob_agreement.py CHECKPOINT_DIR [--url LABEL=http://127.0.0.1:8000 ...]
        [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from trl.trainer.utils import add_fused_lm_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.build_gpt_oss_checkpoint import two_layer_shape  # noqa: E402
from trainer.model import load_model, output_head_device_guard  # noqa: E402
from trainer.vllm_client import VLLMServerClient  # noqa: E402

# TRL's fused LM head as TRL 1.16 calls it, and as the trainer calls it (from the head's GPU)
FUSED_HEAD = ("grouped_mm+trl_fused_head", "grouped_mm+trl_fused_head+head_device_guard")
EXPERTS = ("grouped_mm", "eager")  # batched_mm gathers every token's expert weights: more than a GPU holds at this size
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to check this script end to end


def completion_logprobs(model, prompt: list[int], completion: list[int], fused_head: bool = False) -> torch.Tensor:
    """The model's logprob of each completion token after the prompt (what vLLM reports for a sampled token), on
    the CPU. With `fused_head`, through TRL's fused LM head as TRL scores: labels -100 on the prompt."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad():
        if fused_head:
            labels = ids.clone()
            labels[:, :len(prompt)] = -100
            return model(ids, labels=labels, fused_lm_head=True).log_probs[0, len(prompt) - 1:].float().cpu()
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None].to(logits.device))[:, 0].cpu()


def dequantized_weights(model, checkpoint: Path) -> dict:
    """First and last layer on each GPU: a wrong placement or a device-dependent dequantization shows there."""
    from safetensors import safe_open
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    worst = {}
    layers = list(model.model.layers)
    devices = [next(layer.parameters()).device for layer in layers]
    edges = sorted({i for i in range(len(layers)) if i in (0, len(layers) - 1) or devices[i] != devices[i - 1]
                    or devices[i] != devices[i + 1]})
    for i in edges:
        layer = layers[i]
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            with safe_open(checkpoint / index[name + "_blocks"], "pt") as f:
                reference = convert_moe_packed_tensors(f.get_tensor(name + "_blocks"), f.get_tensor(name + "_scales"))
            loaded = getattr(layer.mlp.experts, proj).detach()
            worst[f"{i}.{proj}@{loaded.device}"] = (loaded.cpu().float() - reference.float()).abs().max().item()
    bad = {k: v for k, v in worst.items() if v > 0}
    return {"tensors_checked": len(worst), "tensors_differing": len(bad), "largest": max(worst.values()),
            "differing": dict(list(bad.items())[:8])}


def experts_kernels(checkpoint: Path) -> dict:
    from transformers import GptOssConfig, GptOssForCausalLM

    shape = two_layer_shape(checkpoint)
    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(**shape, _attn_implementation="eager")).to(DEVICE, torch.float32).eval()
    ids = torch.randint(0, 4096, (1, 1024), device=DEVICE)
    logps = {}
    for experts in EXPERTS:
        model.set_experts_implementation(experts)
        with torch.no_grad():
            logps[experts] = torch.log_softmax(model(ids).logits.float(), -1)
    return {f"{e}_vs_eager_max_abs_logprob_gap": (logps[e] - logps["eager"]).abs().max().item()
            for e in EXPERTS if e != "eager"}


def gap_summary(logps: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    gaps = [(a - b).abs() for a, b in zip(logps, reference)]
    gap = torch.cat(gaps)
    return {"mean_abs_logprob_gap": gap.mean().item(), "max_abs_logprob_gap": gap.max().item(),
            "first_16_tokens_mean": torch.cat([g[:16] for g in gaps]).mean().item(),
            "last_16_tokens_mean": torch.cat([g[-16:] for g in gaps]).mean().item()}


def stack(checkpoint: Path, urls: dict[str, str], prompts: int, tokens: int, dtypes: list[str]) -> dict:
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    prompt_ids = [torch.randint(3, vocab, (64,), generator=generator).tolist() for _ in range(prompts)]
    sampled = {}
    for label, url in urls.items():
        client = VLLMServerClient(url, request_timeout=1800)
        completions = client.complete(client.served_model()["id"], prompt_ids, n=1, max_tokens=tokens,
                                      temperature=1.0, top_p=1.0)
        sampled[label] = [(prompt_ids[c.prompt_index], c.token_ids, torch.tensor(c.logprobs)) for c in completions]
    results, eager_logps = {}, {}
    for dtype in dtypes:
        model = load_model(str(checkpoint), dtype, "eager", 70, gradient_checkpointing=False).eval()
        model = model.to(getattr(torch, dtype))  # transformers dequantizes MXFP4 experts to bf16 whatever the dtype
        if dtype == "bfloat16":
            results["dequantized_weights"] = dequantized_weights(model, checkpoint)
            print("trainer's dequantized experts vs CPU:", json.dumps(results["dequantized_weights"]), flush=True)
        variants = (*EXPERTS, *FUSED_HEAD) if dtype == "bfloat16" else ("eager",)
        for variant in variants:
            model.set_experts_implementation(variant.split("+")[0])
            if variant == FUSED_HEAD[0]:
                add_fused_lm_head(model, outputs=("log_probs", "entropy"))
            for label, sequences in sampled.items():
                with output_head_device_guard(model) if variant == FUSED_HEAD[1] else nullcontext():
                    logps = [completion_logprobs(model, p, c, fused_head=variant in FUSED_HEAD) for p, c, _ in sequences]
                if variant == "eager":
                    eager_logps[dtype, label] = logps
                results[f"{label} vs trainer {dtype} {variant}"] = gap_summary(logps, [lp for *_, lp in sequences])
                print(f"{label} vs trainer {dtype} {variant}", json.dumps(results[f"{label} vs trainer {dtype} {variant}"]), flush=True)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for label in sampled:  # the trainer against itself: what bf16 alone moves on this model
        if ("float32", label) in eager_logps and ("bfloat16", label) in eager_logps:
            key = f"trainer bfloat16 vs trainer float32 on {label}'s samples"
            results[key] = gap_summary(eager_logps["bfloat16", label], eager_logps["float32", label])
            print(key, json.dumps(results[key]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--url", action="append", metavar="LABEL=URL",
                        help="a vLLM server to compare (repeatable; default compose=http://127.0.0.1:8000)")
    parser.add_argument("--dtypes", default="bfloat16",
                        help="trainer dtypes to score with, comma-separated; float32 (39 GiB per GPU) tells "
                             "what bf16 alone moves")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    print("experts kernels (float32):", json.dumps(experts_kernels(args.checkpoint)), flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    urls = dict(u.split("=", 1) if "=" in u else (u, u) for u in args.url or ["compose=http://127.0.0.1:8000"])
    print("stack:", json.dumps(stack(args.checkpoint, urls, args.prompts, args.tokens, args.dtypes.split(","))), flush=True)


if __name__ == "__main__":
    main()
