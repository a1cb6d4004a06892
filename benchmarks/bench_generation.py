#!/usr/bin/env python3
"""Generation throughput and adapter-registration latency against a running vLLM server, through the trainer's
own client (the same requests a training step sends).

1. Register ADAPTER_DIR under a new name five times (as each optimizer step does) and time each call.
2. For each concurrency C: C prompts of --prompt-len random token IDs, one request, --max-tokens new tokens
   each, through the adapter and through the base model: generated tokens per second of wall time.

    python benchmarks/bench_generation.py ADAPTER_DIR --url http://127.0.0.1:8000 --concurrency 16 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig  # noqa: E402

from trainer.vllm_client import VLLMServerClient  # noqa: E402


def registration_latency(client: VLLMServerClient, adapter: Path, repeats: int = 5) -> list[float]:
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        client.load_lora_adapter(f"bench-v{i}", str(adapter))
        seconds.append(time.perf_counter() - start)
        if i:
            client.unload_lora_adapter(f"bench-v{i - 1}")
    return seconds


def throughput(client: VLLMServerClient, model: str, concurrency: int, prompt_len: int, max_tokens: int,
               vocab: int) -> dict:
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(concurrency)]
    start = time.perf_counter()
    completions = client.complete(model, prompts, n=1, max_tokens=max_tokens, temperature=1.0, top_p=1.0)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    return {"model": model, "concurrency": concurrency, "prompt_len": prompt_len, "new_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="a saved PEFT adapter (adapter_config.json + weights)")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--label", default="", help="written into every result row (e.g. the server's mode)")
    args = parser.parse_args()

    client = VLLMServerClient(args.url, request_timeout=1800)
    base = client.served_model()["id"]
    vocab = AutoConfig.from_pretrained(base).vocab_size  # the served model: a local path or a cached Hub name
    latency = registration_latency(client, args.adapter)
    print(json.dumps({"label": args.label, "adapter_registration_s": [round(s, 3) for s in latency]}), flush=True)
    adapter = "bench-v4"
    throughput(client, adapter, 4, 32, 16, vocab)  # warm-up
    for concurrency in args.concurrency:
        for model in (adapter, base):
            row = throughput(client, model, concurrency, args.prompt_len, args.max_tokens, vocab)
            print(json.dumps({"label": args.label, **row, "model": "adapter" if model == adapter else "base"}),
                  flush=True)


if __name__ == "__main__":
    main()
