"""Random-weight checkpoints for tests and benchmarks where no weights can be downloaded: a tiny dense model, and
the word-level tokenizer (used by benchmarks/build_gpt_oss_checkpoint.py too) that covers the whole vocabulary,
so every sampled ID decodes, and carries a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("0 1 2 3 4 5 6 7 8 9 10 12 15 20 + - * = . , ? ! { } what is plus minus times compute "
         "the answer a of and to how many there are with each boxes pens apples crate holds add remove "
         "multiply by now solve problem put final in system user assistant boxed \\").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_word_tokenizer(path: Path, vocab_size: int, chat_template: str = CHAT_TEMPLATE) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = chat_template
    fast.save_pretrained(path)
    # Without an explicit class, AutoTokenizer picks the model type's tokenizer and rebuilds its byte-level pipeline.
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=1))


def save_tiny_dense(path: Path, vocab_size: int = 256, seed: int = 0, init_std: float = 0.1) -> Path:
    """A 2-layer Llama (dense: LoRA runs on vLLM's CPU backend for it), float32, with spread-out logits.

    Llama rather than Qwen2: transformers replaces a Qwen2 checkpoint's tokenizer with its byte-level one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         initializer_range=init_std, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
                         bos_token_id=None, dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path)
    save_word_tokenizer(path, vocab_size)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    return path


# The stop tokens of harmony's assistant turn: the final answer's end and a tool call's.
HARMONY_STOPS = (200002, 200012)


def save_tiny_harmony(path: Path, tokenizer_dir: Path, seed: int = 0, stop_logit: float = 9.0) -> Path:
    """A 2-layer Llama over GPT-OSS's real vocabulary, tokenizer, chat template and generation config
    (scripts/gpt_oss_tokenizer.py), so that vLLM samples real token IDs and stops at harmony's stop tokens.

    A random model over 201,088 tokens would almost never sample a stop token: every embedding carries a constant
    first component that the residual stream keeps, and only the stop tokens' output rows read it, which gives
    them logits near `stop_logit` and ends a completion within a few dozen tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.gpt_oss_tokenizer import copy_into

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=201088, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
                         initializer_range=0.02, tie_word_embeddings=False, bos_token_id=199998,
                         eos_token_id=200002, pad_token_id=199999, dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        # after the final RMSNorm the constant component is about sqrt(hidden_size)
        model.lm_head.weight[list(HARMONY_STOPS), 0] = stop_logit / config.hidden_size ** 0.5
    model.save_pretrained(path)
    copy_into(path, tokenizer_dir)
    return path
