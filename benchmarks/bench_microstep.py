#!/usr/bin/env python3
"""One trainer micro-step of gpt-oss-20b's exact shape, its frozen experts held three ways, side by side.

gpt-oss-20b's layout with random weights built on the GPU (no checkpoint read), bf16, rank-4 LoRA on q/k/v/o,
gradient checkpointing, one sequence of --seq tokens; a micro-step is forward + log-softmax gather + backward, as
the trainer runs it. The experts' weights are random MXFP4 blocks and scales; the bf16 path holds them dequantized
by the CPU-exact reference (trainer/experts.py), so the MXFP4 paths, which dequantize with the Triton kernel inside
each layer's forward, are checked against weights the kernel did not make. Variants:

  bf16_grouped_mm        transformers 5.17's default experts (grouped_mm), bf16 weights: the stack before
  bf16_lean              the lean experts forward (no expert-parallel masking), bf16 weights
  mxfp4_grouped_mm       experts kept in MXFP4, dequantized per layer, transformers' grouped_mm forward
  mxfp4_lean             experts kept in MXFP4, the lean forward
  mxfp4_fused            experts kept in MXFP4, the fused forward (trainer/fused_experts.py)
  mxfp4_fused_lora_bf16  the same with the LoRA matrices in bf16 (PEFT keeps them in float32)
  no_grad_forward        a no-grad forward of the fused path: what TRL's old-logprob pass costs per sequence
  mxfp4_lean_compiled    the lean forward under torch.compile (reported as failed if it fails)
  mxfp4_fused_compiled_layers
                         the fused path with every decoder layer under torch.compile (likewise)

Each is timed (median of --repeats after warm-up), with its peak memory, and compared with bf16_grouped_mm on the
same tokens: the relative error of the sampled tokens' logprobs and of a slice of the logits, and of every LoRA
gradient. The variants named by --profile get one more micro-step under torch.profiler: the GPU time of the
kernels, by name, the costliest first. The bf16 variants run first, with the MXFP4 copies also resident; the bf16 weights are then freed, so
the MXFP4 variants' memory is the model as the trainer holds it.

    python benchmarks/bench_microstep.py --out microstep.json            # one H100: about 3 minutes
    python benchmarks/bench_microstep.py --tiny --out /tmp/smoke.json    # the CPU: a check of the script

Needs torch, transformers, peft and (on a GPU) triton; FlashAttention 4 (flash-attn-4) is used where it can run
(--attn auto), else eager attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import attention, experts, fused_experts  # noqa: E402,F401  (register fa4, lean and fused)
from benchmarks.build_gpt_oss_checkpoint import GPT_OSS_20B, TINY  # noqa: E402  (the same shapes)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LOGIT_SLICE = 64  # positions whose whole logits row is compared (all 4,096 would take 3 GiB in float32)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def build(shape: dict, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """The model on `device` with random weights, its experts holding both their MXFP4 blocks and scales and the
    reference's dequantization of them; LoRA on top."""
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    layers = shape["num_hidden_layers"]
    scale_exp = -7 if shape["hidden_size"] < 1024 else -9
    config = GptOssConfig(**shape, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(layers)])
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    torch.set_default_dtype(previous)
    model.to_empty(device=device)
    model.model.rotary_emb = GptOssRotaryEmbedding(config).to(device)  # its buffers are computed, not loaded
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            # benchmarks/build_gpt_oss_checkpoint.py's conditioning: with larger layers the random model is
            # chaotic, bf16 rounding alone moves its logprobs by nats, and no comparison of paths means anything
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif "sinks" in name or "embed_tokens" in name:
                p.normal_(0, 1.0, generator=g)
            elif "lm_head" in name or "router.weight" in name:
                p.normal_(0, 0.1, generator=g)
            else:
                p.normal_(0, 0.004, generator=g)
        for _, module in experts.experts_modules(model):
            weights = {}
            for proj in experts.PROJECTIONS:
                dense = getattr(module, proj)  # [E, in, out]
                E, cols, rows = dense.shape
                blocks = torch.randint(0, 256, (E, rows, cols // 32, 16), dtype=torch.uint8, device=device,
                                       generator=g)
                # 2^-9 (2^-7 at toy size, as the checkpoint builder has it) times codes up to 6
                scales = torch.full((E, rows, cols // 32), 127 + scale_exp, dtype=torch.uint8, device=device)
                for e in range(E):  # one expert at a time: the reference's temporaries stay small
                    dense[e].copy_(experts.dequantize_reference(blocks[e], scales[e], dtype).transpose(0, 1))
                weights[proj] = (blocks, scales)
            experts.attach_mxfp4(module, weights, dtype, drop_dense=False)
    for name, module in model.named_modules():  # as from_pretrained keeps them (_keep_in_fp32_modules)
        if name.endswith("layernorm") or name == "model.norm":
            module.float()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero, which leaves A without a gradient: a policy away from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=g)
    model.train()
    return model


def set_variant(model, weights: str, implementation: str) -> None:
    """`weights`: bf16 (the dense parameters) or mxfp4 (the blocks and scales); the experts' forward by name."""
    for _, module in experts.experts_modules(model):
        mxfp4_class = experts._mxfp4_class(type(module))
        module.__class__ = mxfp4_class if weights == "mxfp4" else mxfp4_class.__mro__[1]
    model.get_base_model().set_experts_implementation(implementation)


def micro_step(model, ids, backward: bool = True):
    logits = model(input_ids=ids).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    if backward:
        (-logps.mean()).backward()
    return logps.detach(), logits[0, -LOGIT_SLICE:].detach().float()


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def kernel_profile(model, ids, device, backward: bool, top: int = 40) -> dict:
    """One micro-step under torch.profiler: GPU time per kernel name, the costliest `top`, and the total."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.set_grad_enabled(backward):
            micro_step(model, ids, backward)
        synchronize(device)
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us() / 1e3
            entry[1] += 1
    ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
    return {"gpu_ms": round(sum(ms for ms, _ in kernels.values()), 2), "kernels": len(kernels),
            "launches": sum(n for _, n in kernels.values()),
            "top": [{"ms": round(ms, 3), "calls": n, "name": name[:160]} for name, (ms, n) in ranked[:top]]}


def run(model, name: str, ids, device, repeats: int, reference: dict | None, backward: bool = True,
        profile: bool = False) -> dict:
    row = {"variant": name}
    try:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            logps, logits = micro_step(model, ids, backward)
        synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - start, 2)
        grads = lora_grads(model) if backward else {}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = []
        for i in range(repeats + 1):  # one more warm-up
            model.zero_grad(set_to_none=True)
            synchronize(device)
            start = time.perf_counter()
            with torch.set_grad_enabled(backward):
                micro_step(model, ids, backward)
            synchronize(device)
            if i:
                times.append(time.perf_counter() - start)
        times.sort()
        median = times[len(times) // 2]
        row.update(tokens=ids.numel(), s_median=round(median, 4), s_min=round(times[0], 4),
                   s_max=round(times[-1], 4), tok_per_s=round(ids.numel() / median))
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            row.update(allocated_before_gib=gib(before), peak_gib=gib(peak), peak_over_before_gib=gib(peak - before))
        if reference is not None:
            row["logprobs_rel_error"] = relative(logps, reference["logps"])
            row["logprobs_max_abs_diff"] = (logps - reference["logps"]).abs().max().item()
            row["logits_rel_error"] = relative(logits, reference["logits"])
            if backward:
                errors = sorted(relative(grads[n], g) for n, g in reference["grads"].items())
                row.update(lora_grad_rel_error_max=errors[-1], lora_grad_rel_error_median=errors[len(errors) // 2],
                           lora_grads=len(errors))
        row["loss"] = -logps.mean().item()
        if profile and device.type == "cuda":
            row["profile"] = kernel_profile(model, ids, device, backward)
        row["_outputs"] = {"logps": logps, "logits": logits, "grads": grads}
    except Exception as exc:  # a variant that cannot run here is reported, not fatal
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    printable = {k: v for k, v in row.items() if k not in ("_outputs", "profile")}
    print(json.dumps(printable), flush=True)
    return row


def kernel_check(model, device) -> dict:
    """The Triton kernel against the reference on every layer's first expert, and its speed on a whole layer."""
    modules = [m for _, m in experts.experts_modules(model)]
    equal = True
    for module in modules:
        for proj in experts.PROJECTIONS:
            blocks, scales = getattr(module, f"{proj}_blocks")[:1], getattr(module, f"{proj}_scales")[:1]
            equal &= torch.equal(experts.dequantize(blocks, scales, module.dequantized_dtype),
                                 experts.dequantize_reference(blocks, scales, module.dequantized_dtype))
    module = modules[0]

    def layer():
        for proj in experts.PROJECTIONS:
            experts.dequantize(getattr(module, f"{proj}_blocks"), getattr(module, f"{proj}_scales"),
                               module.dequantized_dtype)

    layer()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        layer()
    synchronize(device)
    seconds = (time.perf_counter() - start) / 10
    read = sum(getattr(module, f"{p}_{k}").numel() for p in experts.PROJECTIONS for k in ("blocks", "scales"))
    written = sum(getattr(module, f"{p}_blocks").numel() * 2 * torch.finfo(module.dequantized_dtype).bits // 8
                  for p in experts.PROJECTIONS)
    result = {"kernel_equals_reference": bool(equal), "uses_triton": device.type == "cuda" and experts.triton is not None,
              "one_layer_ms": round(seconds * 1e3, 3), "GB_per_s": round((read + written) / seconds / 1e9, 1)}
    print(json.dumps({"dequantize": result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the JSON report goes")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, to check the script")
    parser.add_argument("--seq", type=int, help="tokens per micro-step (default 4096; 64 with --tiny)")
    parser.add_argument("--layers", type=int, help="decoder layers (default the model's 24)")
    parser.add_argument("--attn", default="auto", help="ATTN_IMPLEMENTATION: auto (fa4 where it runs, else "
                                                       "eager), fa4, eager")
    parser.add_argument("--repeats", type=int, default=4, help="timed micro-steps per variant")
    parser.add_argument("--skip", default="", help="comma-separated variants to leave out")
    parser.add_argument("--profile", default="mxfp4_lean,mxfp4_fused",
                        help="comma-separated variants whose kernels are profiled (GPU only)")
    args = parser.parse_args()

    device = torch.device("cuda") if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
    dtype = torch.bfloat16
    shape = dict(TINY if args.tiny else GPT_OSS_20B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    seq = args.seq or (64 if args.tiny else 4096)
    attn = attention.resolved_attn_implementation(args.attn, "bfloat16") if device.type == "cuda" else "eager"
    skip = set(filter(None, args.skip.split(",")))
    profiled = set(filter(None, args.profile.split(",")))

    import peft
    import transformers
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "triton": getattr(experts.triton, "__version__", None), "attention": attn, "seq": seq,
              "layers": shape["num_hidden_layers"], "shape": "tiny" if args.tiny else "gpt-oss-20b",
              "lora": {"rank": 4, "alpha": 8, "targets": LORA_TARGETS}, "gradient_checkpointing": True}
    start = time.perf_counter()
    model = build(shape, device, dtype, attn)
    synchronize(device)
    report["build_s"] = round(time.perf_counter() - start, 1)
    if device.type == "cuda":
        report["allocated_after_build_gib"] = gib(torch.cuda.memory_allocated(device))
    print(json.dumps(report), flush=True)
    report["dequantize"] = kernel_check(model, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, shape["vocab_size"], (1, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(2))

    rows, reference = [], None

    def variant(name, weights, implementation, **kwargs):
        nonlocal reference
        if name in skip:
            return
        set_variant(model, weights, implementation)
        row = run(model, name, ids, device, args.repeats, reference, profile=name in profiled, **kwargs)
        if reference is None and "error" not in row:
            reference = row["_outputs"]
        row.pop("_outputs", None)
        rows.append(row)
        report["rows"] = rows
        args.out.write_text(json.dumps(report, indent=1))  # so far: a later variant may outrun the time limit

    variant("bf16_grouped_mm", "bf16", "grouped_mm")
    variant("bf16_lean", "bf16", "lean")
    # the model as the trainer holds it: the dense expert weights go
    for _, module in experts.experts_modules(model):
        for proj in experts.PROJECTIONS:
            module._parameters.pop(proj, None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        report["allocated_mxfp4_model_gib"] = gib(torch.cuda.memory_allocated(device))
    report["experts_mxfp4_gib"] = gib(sum(b.numel() for n, b in model.named_buffers()
                                          if n.endswith(("_blocks", "_scales"))))
    variant("mxfp4_grouped_mm", "mxfp4", "grouped_mm")
    variant("mxfp4_lean", "mxfp4", "lean")
    variant("mxfp4_fused", "mxfp4", "fused")
    if "mxfp4_fused_lora_bf16" not in skip:
        lora = [p for p in model.parameters() if p.requires_grad]
        kept = [p.data for p in lora]  # restored as they were: a round trip through bf16 would change the model
        for p in lora:
            p.data = p.data.to(torch.bfloat16)
        variant("mxfp4_fused_lora_bf16", "mxfp4", "fused")
        for p, data in zip(lora, kept):
            p.data = data
    variant("no_grad_forward", "mxfp4", "fused", backward=False)
    # compiled last: a compiler failure or a long compile leaves the rows above measured
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if "mxfp4_lean_compiled" not in skip:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register("lean_compiled", torch.compile(experts.lean_experts_forward, dynamic=True))
        variant("mxfp4_lean_compiled", "mxfp4", "lean_compiled")
    if "mxfp4_fused_compiled_layers" not in skip:
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
        variant("mxfp4_fused_compiled_layers", "mxfp4", "fused")
    print(f"\n{'variant':24s} {'tok/s':>8s} {'s':>7s} {'peak GiB':>9s} {'logp err':>9s} {'grad err max':>12s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:24s} {r['error'][:90]}")
            continue
        print(f"{r['variant']:24s} {r['tok_per_s']:8d} {r['s_median']:7.3f} {r.get('peak_gib', float('nan')):9.2f} "
              f"{r.get('logprobs_rel_error', 0.0):9.2e} {r.get('lora_grad_rel_error_max', 0.0):12.2e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
