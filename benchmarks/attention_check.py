#!/usr/bin/env python3
"""Which attention kernel can train GPT-OSS: forward logits and gradients against float64, and speed.

A two-layer GPT-OSS with the checkpoint's attention (gpt-oss-20b: 64 query / 8 KV heads of 64, learned sinks, a
128-token sliding window on layer 0, full attention on layer 1) and MoE, random weights, rank-4 LoRA on q/k/v/o
with both LoRA matrices random (so that every LoRA gradient is non-zero). One sequence per length, padded as TRL
pads a micro-batch (prompt padding on the left, completion padding on the right), so the padding mask is in play.

For each attention implementation, in bfloat16, against a float64 reference (an attention function written from
the definition, with the sink in the softmax denominator, computed in query chunks so that 8k tokens fit; at up
to 4k tokens eager float64 is checked against it too):
- relative error (norm of the difference / norm of the reference) of the logits on the real tokens, of the
  gradient of the input embeddings, and of each layer's LoRA gradients of q, k, v and o;
- `correct`: every error at most 2x eager bfloat16's (the trainer's reference path, the precision floor), and
  each layer's attention alone below 0.05 (`judge`);
- milliseconds of forward + backward of the two-layer model, and of each layer's attention alone; the first
  call's seconds (kernels that compile per shape); peak GPU memory.

    python benchmarks/attention_check.py CHECKPOINT_DIR [--lengths 1024,4096,8192] [--out attention-check.json]
    python benchmarks/attention_check.py --tiny --lengths 48,96     # toy shape, to check the script on the CPU

Implementations that cannot run here (not installed, no GPU, no network for a Hub kernel) are listed with their
error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_trainer import synchronize, timed  # noqa: E402
from benchmarks.build_gpt_oss_checkpoint import TINY, config_dict, two_layer_shape  # noqa: E402
from trainer.attention import FA4  # noqa: E402  (importing it registers fa4 with transformers)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REFERENCE = "float64_reference"
IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", FA4, "flash_attention_4", "kernels-community/vllm-flash-attn3")
CORRECT_VS_EAGER = 2.0  # an implementation may be at most this many times eager bfloat16's error
CORRECT_CAP = 0.05
ATTENTION_PARTS = ("attention_sliding", "attention_full")
QUERY_CHUNK = 1024


# ------------------------------------------------------------------ the float64 reference attention
def reference_attention_forward(module, query, key, value, attention_mask, scaling, sliding_window=None,
                                s_aux=None, **kwargs):
    """transformers' attention interface, float64, in chunks of queries each recomputed in backward, so that an
    8k-token layer fits. attention_mask: the 2D padding mask (batch, seq) or None."""
    batch, heads, seq, _ = query.shape
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    keep = torch.ones(batch, seq, dtype=torch.bool, device=query.device) if attention_mask is None \
        else attention_mask.to(query.device, torch.bool)
    positions = torch.arange(seq, device=query.device)

    def chunk(q, first: int, k, v, sinks):
        i = positions[first:first + q.shape[2], None]
        j = positions[None, :]
        visible = (j <= i) & ((i - j < sliding_window) if sliding_window else True)
        visible = visible[None, None] & keep[:, None, None, :]
        logits = torch.einsum("bhid,bhjd->bhij", q, k) * scaling
        sink = sinks[None, :, None, None]
        top = torch.maximum(logits.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True), sink)
        weights = torch.exp(logits - top) * visible
        probs = weights / (weights.sum(-1, keepdim=True) + torch.exp(sink - top))
        return torch.einsum("bhij,bhjd->bihd", probs, v)

    outs = [checkpoint(chunk, query[:, :, first:first + QUERY_CHUNK], first, key, value, s_aux, use_reentrant=False)
            for first in range(0, seq, QUERY_CHUNK)]
    return torch.cat(outs, dim=1), None


def register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(REFERENCE, reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE, flash_attention_mask)  # the 2D padding mask, as flash kernels get


# ------------------------------------------------------------------ models
def build(shape: dict, implementation: str, dtype: torch.dtype, state: dict | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    # small weights keep the layers' updates small next to the residual stream (build_gpt_oss_checkpoint.py)
    shape = {**shape, "initializer_range": 0.004}
    config = GptOssConfig(**{**shape, "experts_implementation": "eager"} if dtype == torch.float64 else shape)
    model = GptOssForCausalLM(config)
    if state is None:
        with torch.no_grad():
            for layer in model.model.layers:
                attention = layer.self_attn
                attention.sinks.normal_(0.0, 1.0)  # spread as a trained model's, not the init's zeros
                for projection in (attention.q_proj, attention.k_proj):  # attention as peaked as a trained one's
                    projection.weight.normal_(0.0, 0.02)
                # experts chosen by clear margins: bf16 rounding then never flips a token's top-k
                layer.mlp.router.weight.normal_(0.0, 0.1)
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
            model.lm_head.weight.normal_(0.0, 0.1)
    model = model.to(DEVICE, dtype)
    model.set_attn_implementation(implementation)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    if dtype != torch.float64:  # as the trainer runs (GRADIENT_CHECKPOINTING=true): one layer's activations at a time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora)
    model.train()
    if state is not None:
        model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()})
    return model


def padded_sequence(length: int, vocab: int):
    torch.manual_seed(length)
    ids = torch.randint(0, vocab, (1, length), device=DEVICE)
    keep = torch.ones(1, length, dtype=torch.long, device=DEVICE)
    keep[:, :length // 16] = 0  # prompt padding
    keep[:, length - length // 16:] = 0  # completion padding
    return ids, keep


def forward_backward(model, ids, keep):
    """Logits on the real tokens and the gradients the trainer's loss gives (mean log-prob of the real next
    tokens): of the input embeddings and of every LoRA matrix."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=keep).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    real = keep[:, 1:].bool() & keep[:, :-1].bool()
    (-(logp * real).sum() / real.sum()).backward()
    grads = {name.split("base_model.model.model.")[-1]: p.grad.detach().double()
             for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[keep.bool()].double(), embeds.grad.double(), grads


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def errors_against(reference, result, layers: int) -> dict:
    (ref_logits, ref_input, ref_grads), (logits, input_grad, grads) = reference, result
    errors = {"logits": relative_error(logits, ref_logits), "input": relative_error(input_grad, ref_input)}
    for layer in range(layers):
        for proj in ("q", "k", "v", "o"):
            names = [n for n in ref_grads if n.startswith(f"layers.{layer}.self_attn.{proj}_proj.lora_")]
            errors[f"L{layer}.{proj}"] = relative_error(torch.cat([grads[n].flatten() for n in names]),
                                                         torch.cat([ref_grads[n].flatten() for n in names]))
    return errors


# ------------------------------------------------------------------ timing
def attention_alone(model, implementation: str, layer: int, length: int, keep) -> dict:
    """One layer's attention function on random q, k, v with the model's mask, the layer's sinks and window:
    relative errors of the output (real tokens) and of the gradients of q, k, v and the sinks against the float64
    reference on the same bf16 inputs, and the milliseconds of forward + backward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    base = model.base_model.model
    module = base.model.layers[layer].self_attn
    make_mask = create_sliding_window_causal_mask if module.sliding_window else create_causal_mask

    def mask_for(name):
        config = base.config
        saved, config._attn_implementation = config._attn_implementation, name
        try:
            return make_mask(config=config, attention_mask=keep, past_key_values=None,
                             inputs_embeds=torch.zeros(1, length, 1, dtype=torch.bfloat16, device=DEVICE))
        finally:
            config._attn_implementation = saved
    heads, kv_heads, dim = base.config.num_attention_heads, base.config.num_key_value_heads, base.config.head_dim
    torch.manual_seed(layer)
    inputs = [torch.randn(1, h, length, dim, device=DEVICE, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    upstream = torch.randn(1, length, heads, dim, device=DEVICE, dtype=torch.bfloat16) * keep[0, :, None, None]
    real = keep[0].bool()
    module.sinks.requires_grad_(True)  # frozen under LoRA; eager reads the module's own, the others `s_aux`

    def run(attend, mask, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in inputs)  # fresh leaves on every call
        module.sinks.grad = None
        s = module.sinks if dtype == module.sinks.dtype else module.sinks.detach().to(dtype).requires_grad_(True)
        out = attend(module, q, k, v, mask, scaling=module.scaling, dropout=0.0,
                     sliding_window=module.sliding_window, s_aux=s)[0]
        out.backward(upstream.to(out.dtype))
        return [out[0, real].detach()] + [t.grad for t in (q, k, v, s)]

    attend = AttentionInterface().get_interface(implementation, eager_attention_forward)
    mask = mask_for(implementation)
    got = run(attend, mask, torch.bfloat16)
    want = run(reference_attention_forward, mask_for(REFERENCE), torch.float64)
    errors = {name: relative_error(g, w) for name, g, w in zip(("out", "dq", "dk", "dv", "dsinks"), got, want)}
    milliseconds_ = round(timed(lambda: run(attend, mask, torch.bfloat16), repeats=5) * 1000, 3)
    module.sinks.requires_grad_(False)
    return {"errors": errors, "fwd_bwd_ms": milliseconds_}


# ------------------------------------------------------------------ the check
def check_length(shape: dict, length: int, implementations: tuple[str, ...]) -> dict:
    reference_model = build(shape, REFERENCE, torch.float64)
    with torch.no_grad():  # every model then holds the same weights: only the computation differs
        for parameter in reference_model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16))
    state = {name: tensor.detach().clone() for name, tensor in reference_model.state_dict().items()}
    ids, keep = padded_sequence(length, shape["vocab_size"])
    reference = forward_backward(reference_model, ids, keep)
    layers = shape["num_hidden_layers"]
    rows = {}
    if length <= 2048:  # the reference against transformers' own eager attention, both in float64
        del reference_model
        eager64 = build(shape, "eager", torch.float64, state)
        rows["eager_float64"] = {"errors": errors_against(reference, forward_backward(eager64, ids, keep), layers)}
        del eager64
    else:
        del reference_model
    empty_cache()
    for implementation in implementations:
        row = rows[implementation] = {}
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            model = build(shape, implementation, torch.bfloat16, state)
            started = time.perf_counter()
            result = forward_backward(model, ids, keep)
            synchronize()
            row["first_call_s"] = round(time.perf_counter() - started, 2)
            row["errors"] = errors_against(reference, result, layers)
            row["model_fwd_bwd_ms"] = round(timed(lambda: forward_backward(model, ids, keep), repeats=5) * 1000, 2)
            for layer in range(layers):
                kind = "sliding" if model.base_model.model.model.layers[layer].self_attn.sliding_window else "full"
                row[f"attention_{kind}"] = attention_alone(model, implementation, layer, length, keep)
            if torch.cuda.is_available():
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            del model, result
        except Exception as exc:  # an implementation that cannot run here is reported, not fatal
            row.clear()
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        empty_cache()
        print(f"{length} {implementation}: {json.dumps(row)}", flush=True)
    judge(rows)
    return rows


def judge(rows: dict) -> None:
    """Set each row's `correct`. Each layer's attention alone: within CORRECT_VS_EAGER times eager bfloat16's error
    and below CORRECT_CAP. The whole model: within CORRECT_VS_EAGER times eager bfloat16's error only, since with
    random weights bfloat16 alone moves its logits and gradients by more than any cap (routing and softmax flips),
    the same for every kernel; the cap applies where eager could not run."""
    eager = rows.get("eager", {})
    for implementation, row in rows.items():
        if "errors" not in row or implementation == "eager_float64":
            continue
        checks = [(row[part]["errors"], eager.get(part, {}).get("errors"), True) for part in ATTENTION_PARTS
                  if part in row]
        checks.append((row["errors"], eager.get("errors"), "errors" not in eager))
        row["correct"] = all((not capped or error < CORRECT_CAP)
                             and (floor is None or error <= CORRECT_VS_EAGER * floor[name])
                             for errors, floor, capped in checks for name, error in errors.items())


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(report: dict) -> str:
    lines = []
    for length, rows in report["lengths"].items():
        names = next((list(r["errors"]) for r in rows.values() if "errors" in r), [])
        lines.append(f"\n{length} tokens. Relative error vs float64 of the model ({', '.join(names)}) and of each "
                     "layer's attention alone (out, dq, dk, dv, dsinks); ms of forward + backward")
        for implementation, row in rows.items():
            if "error" in row:
                lines.append(f"  {implementation:<36} cannot run: {row['error'][:150]}")
                continue
            verdict = {True: "correct", False: "WRONG", None: ""}[row.get("correct")]
            lines.append(f"  {implementation:<36} {verdict:<8} model " + " ".join(f"{e:.1e}" for e in row["errors"].values()))
            for part in ATTENTION_PARTS:
                if part in row:
                    errors = " ".join(f"{e:.1e}" for e in row[part]["errors"].values())
                    lines.append(f"  {'':<36} {'':<8} {part.split('_')[1]:<7} {errors} | {row[part]['fwd_bwd_ms']} ms")
            if "model_fwd_bwd_ms" in row:
                lines.append(f"  {'':<36} {'':<8} model {row['model_fwd_bwd_ms']} ms, first call {row['first_call_s']} s"
                             + (f", peak {row['peak_gib']} GiB" if "peak_gib" in row else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a gpt-oss checkpoint directory (its config.json)")
    parser.add_argument("--tiny", action="store_true", help="the toy shape of build_gpt_oss_checkpoint.py --tiny")
    parser.add_argument("--lengths", default="1024,4096,8192")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--out", type=Path, default=Path("attention-check.json"))
    args = parser.parse_args()
    if args.tiny == (args.checkpoint is not None):
        parser.error("give a checkpoint directory or --tiny")
    register_reference()
    shape = {**config_dict(TINY), "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]} \
        if args.tiny else two_layer_shape(args.checkpoint)
    shape.pop("quantization_config", None)
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "shape": {k: shape[k] for k in (
                  "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window", "hidden_size")},
              "lengths": {}}
    try:
        import flash_attn.cute  # noqa: F401
        from importlib.metadata import version
        report["flash_attn_4"] = version("flash-attn-4")
    except Exception as exc:
        report["flash_attn_4"] = f"not importable: {type(exc).__name__}"
    implementations = tuple(args.implementations.split(","))
    for length in (int(n) for n in args.lengths.split(",")):
        report["lengths"][length] = check_length(shape, length, implementations)
        args.out.write_text(json.dumps(report, indent=1))  # each length as soon as it is done
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
