"""The synthetic workload the benchmarks share: model shapes of public checkpoints, a Qwen2 built from
one with random weights, a word-level tokenizer whose every id decodes, prompts of random words and a
reward that varies within a group. No weights, no hub."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C

SPECIAL = ["<pad>", "<eos>", "<unk>"]

# Shapes of public checkpoints' config.json files (the weights are never needed).
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip


def qwen2_config(shape: dict, length: int):
    """A Qwen2 config of ``shape`` (a ``MODELS`` preset) for sequences of ``length`` tokens, with the ids of
    ``tokenizer``: pad 0, EOS 1, no BOS."""
    import transformers

    return transformers.Qwen2Config(
        **shape, max_position_embeddings=length, rope_theta=1e6, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )


def save_model(config, path: Path, dtype: torch.dtype, device: torch.device) -> int:
    """Random weights of ``config`` saved to ``path`` in ``dtype``; returns the parameter count."""
    import transformers

    torch.manual_seed(0)
    with device:
        model = transformers.Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    C.free_memory(device)
    return n


def tokenizer(vocab_size: int):
    """Word-level: id i + 3 is the word ``w{i}``, so every sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def reward_even_words(prompts, completions, **kwargs):
    """Share of words with an even index: varies within a group, so advantages are non-zero."""
    return [
        sum(int(w[1:]) % 2 == 0 for w in c.split() if w[1:].isdigit()) / max(len(c.split()), 1) for c in completions
    ]


def dataset(args, vocab_size: int, n: int):
    from datasets import Dataset

    rng = random.Random(args.seed)
    words = [f"w{i}" for i in range(min(vocab_size - len(SPECIAL), 1000))]
    return Dataset.from_dict({"prompt": [" ".join(rng.choices(words, k=args.prompt_len)) for _ in range(n)]})
