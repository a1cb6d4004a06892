#!/usr/bin/env python3
"""Can two processes compute on one GPU at once? A decode-like loop (a few rows times a large weight: bound by
memory bandwidth, as vLLM's decoding) and a training-like loop (large matrix products: bound by compute), each
in its own process as the server and the trainer are, timed alone and then started together.

Without NVIDIA MPS the GPU runs one process's kernels at a time, so together they take about as long as one after
the other; with MPS (`benchmarks/gpu.sh mps-on` before this) their kernels may share the GPU at once.

    python benchmarks/shared_gpu.py --label no-mps     # one JSON line: seconds alone and together
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def work(kind: str, iterations: int, start, done) -> None:
    import torch

    if kind == "decode":
        weight = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        rows = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16)
        step = lambda: rows @ weight  # noqa: E731
    else:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        step = lambda: a @ b  # noqa: E731
    for _ in range(20):  # warm up the kernels before the clock starts
        step()
    torch.cuda.synchronize()
    start.wait()
    began = time.perf_counter()
    for _ in range(iterations):
        step()
    torch.cuda.synchronize()
    done.put((kind, time.perf_counter() - began))


def timed(kinds: list[str], iterations: dict[str, int]) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    start, done = ctx.Barrier(len(kinds)), ctx.Queue()
    processes = [ctx.Process(target=work, args=(k, iterations[k], start, done)) for k in kinds]
    for p in processes:
        p.start()
    results = dict(done.get(timeout=600) for _ in kinds)
    for p in processes:
        p.join()
    return {k: round(v, 2) for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="")
    parser.add_argument("--decode-iterations", type=int, default=100_000)
    parser.add_argument("--train-iterations", type=int, default=3_000)
    args = parser.parse_args()
    iterations = {"decode": args.decode_iterations, "train": args.train_iterations}
    alone = {**timed(["decode"], iterations), **timed(["train"], iterations)}
    together = timed(["decode", "train"], iterations)
    print(json.dumps({"label": args.label, "alone_s": alone, "together_s": together,
                      "one_after_the_other_s": round(sum(alone.values()), 2),
                      "together_wall_s": max(together.values())}), flush=True)


if __name__ == "__main__":
    main()
