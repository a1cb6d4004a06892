#!/usr/bin/env python3
"""How far bf16 moves a random-weight gpt-oss model from itself in float32, by depth: why vLLM and the trainer
disagree by many nats on the random gpt-oss-20b checkpoint (BENCHMARKS.md) while agreeing to 1e-4 in float32.

The model has gpt-oss's layout at reduced width, with `build_gpt_oss_checkpoint.py`'s weight statistics scaled to
that width (so router and head logits spread as in the full-size random checkpoint). For each depth: tokens are
drawn from the float32 model's next-token distribution; reported are the mean |logprob difference| of those tokens,
bf16 vs float32, and the fraction of (token, layer) pairs whose top-k experts differ.

    python scripts/precision_sensitivity.py [--layers 2 8 24] [--tokens 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.gpu.build_gpt_oss_checkpoint import GPT_OSS_20B, build  # noqa: E402

WIDTH = 512
SCALE = (GPT_OSS_20B["hidden_size"] / WIDTH) ** 0.5  # keeps std x sqrt(fan_in) as at full width
EXPERT_SCALE_EXP = -6  # MXFP4 scales are powers of two: 2^-6 here ~ 2^-7 x SCALE (2.4) at full width


def measure(layers: int, tokens: int, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM, Mxfp4Config

    shape = dict(GPT_OSS_20B, vocab_size=8192, hidden_size=WIDTH, intermediate_size=WIDTH, num_hidden_layers=layers)
    path = folder / f"layers-{layers}"
    build(path, shape, "cpu", seed=0, init_std=0.02 * SCALE, head_std=0.1 * SCALE, router_std=0.1 * SCALE,
          expert_scale_exp=EXPERT_SCALE_EXP)
    models = {dtype: AutoModelForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                                          dtype=dtype).eval()
              for dtype in (torch.float32, torch.bfloat16)}
    ids = torch.randint(3, shape["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {dtype: m(ids, output_router_logits=True) for dtype, m in models.items()}
    reference = torch.log_softmax(out[torch.float32].logits[0, :-1].float(), -1)
    drawn = torch.multinomial(reference.exp(), 1, generator=torch.Generator().manual_seed(1))
    low = torch.log_softmax(out[torch.bfloat16].logits[0, :-1].float(), -1)
    gap = (reference.gather(1, drawn) - low.gather(1, drawn)).abs()
    k = shape["num_experts_per_tok"]
    flips = [(torch.topk(a.float(), k).indices.sort().values != torch.topk(b.float(), k).indices.sort().values)
             .any(-1).float().mean().item()
             for a, b in zip(out[torch.float32].router_logits, out[torch.bfloat16].router_logits)]
    return {"layers": layers, "mean_abs_logprob_gap": round(gap.mean().item(), 4),
            "max_abs_logprob_gap": round(gap.max().item(), 2),
            "expert_choice_changed_first_layer": round(flips[0], 3), "expert_choice_changed_last_layer": round(flips[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for layers in args.layers:
            print(measure(layers, args.tokens, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
