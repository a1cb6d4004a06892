#!/usr/bin/env python3
"""Build-time patch of vLLM 0.26.0: let the LoRA shrink kernel take non-contiguous inputs.

vLLM's gpt-oss MoE block returns `experts(...)[:, :hidden_size]`, a strided view (the MXFP4 kernels pad the
hidden size); without torch.compile (`--enforce-eager`, VLLM_ENFORCE_EAGER=true) it reaches the next layer's qkv
projection as is, and with LoRA enabled the Triton shrink op fails `assert inputs.is_contiguous()` on the first
request: the engine dies (seen on 2x H200, BENCHMARKS.md). A contiguous copy of the activation (tokens x 2880
values) is what the kernel needs; upstream proposes the same change (vllm-project/vllm#35889, #36187). The build
fails if the line is not found, so a vLLM upgrade forces a fresh look.

    python patch_lora_contiguous.py [SITE_PACKAGES]
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

TARGET = Path("vllm/lora/ops/triton_ops/lora_shrink_op.py")
BEFORE = "    assert inputs.is_contiguous()\n"
AFTER = "    inputs = inputs.contiguous()  # patched: MXFP4 gpt-oss passes a strided activation\n"


def patch(site_packages: Path) -> None:
    path = site_packages / TARGET
    text = path.read_text()
    if AFTER in text:
        return
    if text.count(BEFORE) != 1:
        raise SystemExit(f"{path}: expected exactly one {BEFORE.strip()!r}; re-check this patch for this vLLM")
    path.write_text(text.replace(BEFORE, AFTER))
    print(f"patched {path}")


if __name__ == "__main__":
    patch(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sysconfig.get_paths()["purelib"]))
