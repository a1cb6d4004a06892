#!/usr/bin/env python3
"""The LoRA gradients of one batch computed by the trainer's two layouts, to compare them:

    python benchmarks/grad_agreement.py CKPT split OUT.pt                 # one process, layers over the GPUs
    torchrun --nproc-per-node=2 benchmarks/grad_agreement.py CKPT ranks OUT.pt   # FSDP2 ranks
    python benchmarks/grad_agreement.py compare A.pt B.pt

Both load the model as the trainer does (trainer.model.load_model; for ranks, trainer.ranks.shard_frozen_base and
DDP over the LoRA parameters, as accelerate wraps it), with the same LoRA weights (lora_B seeded to non-zero values,
so lora_A's gradients are not all zero), and run the same batch: --sequences random sequences of --tokens tokens,
one per micro-step (a rank runs its share), loss -advantage * mean token logprob, normalised by the batch's tokens
as TRL's dapo loss is. `compare` prints each tensor's largest difference relative to its largest element.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.model import load_model, lora_config  # noqa: E402
from trainer.ranks import shard_frozen_base, start_ranks  # noqa: E402


def batch(vocab_size: int, sequences: int, tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab_size - 10, (sequences, tokens), generator=generator)
    advantages = torch.randn(sequences, generator=generator)
    return ids, advantages


def gradients(args):
    from peft import get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    ranks = start_ranks(3600)
    model = load_model(args.checkpoint, args.dtype, args.attn_implementation, args.gpu_memory_budget_gib,
                       gradient_checkpointing=True, for_ranks=ranks.distributed, experts_format=args.experts_format)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(0)  # lora_A's initialisation: the same in both layouts
    model = get_peft_model(model, lora_config(args.lora_rank, 2 * args.lora_rank, 0.0,
                                              ("q_proj", "k_proj", "v_proj", "o_proj")))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    wrapped = model
    if ranks.distributed:
        shard_frozen_base(model, ranks.device())
        wrapped = DistributedDataParallel(model, device_ids=[ranks.local_rank] if torch.cuda.is_available() else None)
    ids, advantages = batch(model.config.vocab_size, args.sequences, args.tokens)
    total_tokens = ids[:, 1:].numel()
    mine = range(ranks.rank, args.sequences, ranks.world_size)
    input_device = ranks.device() if ranks.distributed else model.get_input_embeddings().weight.device
    for i, index in enumerate(mine):
        last = i == len(mine) - 1
        with nullcontext() if last or not ranks.distributed else wrapped.no_sync():
            sequence = ids[index:index + 1].to(input_device)
            logits = wrapped(input_ids=sequence).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits, -1).gather(-1, sequence[:, 1:, None].to(logits.device))
            # DDP averages over ranks: scale by their number so the result is the batch's sum, as TRL does
            loss = -advantages[index] * logprobs.sum() / total_tokens * ranks.world_size
            loss.backward()
        print(f"rank {ranks.rank}: sequence {index} done", flush=True)
    if ranks.is_main:
        peak = {d: torch.cuda.max_memory_allocated(d) / 2**30 for d in range(torch.cuda.device_count())}
        print("peak GiB per device:", {d: round(g, 1) for d, g in peak.items()}, flush=True)
    return {n: p.grad.detach().float().cpu() for n, p in trainable.items()}, ranks


def compare(a: Path, b: Path) -> None:
    first, second = torch.load(a), torch.load(b)
    assert first.keys() == second.keys(), "different LoRA tensors"
    worst = 0.0
    for name in first:
        scale = first[name].abs().max().clamp_min(1e-30)
        difference = ((second[name] - first[name]).abs().max() / scale).item()
        worst = max(worst, difference)
        print(f"{difference:.2e}  {name}")
    print(f"largest relative difference over {len(first)} LoRA tensors: {worst:.2e}")


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("layout", choices=["split", "ranks"])
    parser.add_argument("out")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn-implementation", default="eager")
    parser.add_argument("--gpu-memory-budget-gib", type=float, default=30.0)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--experts-format", default="auto", help="EXPERTS_FORMAT: auto, mxfp4 (ranks hold the model "
                                                                 "whole) or bf16 (ranks shard it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # how the ranks hold the model
    grads, ranks = gradients(args)
    if (args.layout == "ranks") != ranks.distributed:
        raise SystemExit(f"layout {args.layout} with {ranks.world_size} processes: ranks runs under torchrun")
    if ranks.is_main:
        torch.save(grads, args.out)
        print(f"wrote the gradients of {len(grads)} LoRA tensors to {args.out}")


if __name__ == "__main__":
    main()
