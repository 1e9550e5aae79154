"""A tiny TRL GRPO setup built in code: a Qwen2 from a config, a word-level tokenizer, an
in-memory dataset and a reward. Shared by tests/test_trl.py and the 2-process script
tests/trl_ddp_script.py."""

from __future__ import annotations

import random

import torch

WORDS = [f"w{i}" for i in range(60)]  # the prompts' words; tokenizers may hold more
SPECIAL = ["<pad>", "<eos>", "<unk>"]
PROMPTS = [" ".join(random.Random(i).choices(WORDS, k=3 + i % 4)) for i in range(64)]


def tokenizer(n_words=60):
    """Word-level: token i + 3 is the word ``w{i}``; prompts use the first 60 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def model(n_words=60, seed=0, tie=True, hidden_size=32, moe=False, family=None):
    """A tiny Qwen2, or (``moe``) a tiny Qwen2-MoE: 4 experts, 2 per token, a router aux loss of 0.05; or a family
    whose head transforms its logits: "gemma2" (final_logit_softcapping 0.1: tanh bends these logits, |z| ~ 0.1),
    "cohere" (logit_scale 3)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(SPECIAL) + n_words,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if family is not None:
        return _transformed_head_model(family, common)
    if moe:
        config = Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size // 2,
            shared_expert_intermediate_size=hidden_size, router_aux_loss_coef=0.05,
        )  # fmt: skip
        m = Qwen2MoeForCausalLM(config)
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    m.generation_config.pad_token_id, m.generation_config.eos_token_id = 0, 1
    return m


def dataset(n=16, fixed_length=False):
    from datasets import Dataset

    prompts = [" ".join(p.split()[:3]) for p in PROMPTS[:n]] if fixed_length else PROMPTS[:n]
    return Dataset.from_dict({"prompt": prompts})


def reward_even_words(prompts, completions, **kwargs):
    """Share of words with an even index: varies within a group, so advantages are non-zero."""
    out = []
    for c in completions:
        words = c.split()
        out.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return out


def reward_length(prompts, completions, **kwargs):
    return [min(len(c.split()), 8) / 8 for c in completions]


def config(output_dir, **overrides):
    from trl import GRPOConfig

    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=10,
        learning_rate=3e-3,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # GRPOConfig defaults to bf16 autocast, which would hide fp32-level differences
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        log_completions=False,
        disable_tqdm=True,
    )
    base.update(overrides)
    return GRPOConfig(**base)


def _transformed_head_model(family, common):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    if family == "gemma2":
        config = Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.1, sliding_window=16)
        m = Gemma2ForCausalLM(config)
    elif family == "cohere":
        m = CohereForCausalLM(CohereConfig(**common, logit_scale=3.0))
    else:
        raise ValueError(f"family must be 'gemma2' or 'cohere', got {family!r}")
    m.generation_config.pad_token_id, m.generation_config.eos_token_id = 0, 1
    return m


def save_model(path, **model_kwargs):
    """The tiny model and tokenizer on disk: TRL loads a reference model (beta > 0) by path."""
    model(**model_kwargs).save_pretrained(path)
    tokenizer(model_kwargs.get("n_words", 60)).save_pretrained(path)
    return str(path)


def trainer(cls, output_dir, model_path, trainer_kwargs=None, train_dataset=None, **overrides):
    """``cls`` (``trl.GRPOTrainer`` or ours) on the tiny setup, seeded as TRL seeds a run."""
    from transformers import AutoConfig, set_seed

    args = config(output_dir, **overrides)
    set_seed(args.seed)
    return cls(
        model=model_path,
        reward_funcs=[reward_even_words, reward_length],
        args=args,
        train_dataset=dataset() if train_dataset is None else train_dataset,
        # In memory: AutoTokenizer would map model_type qwen2 to Qwen2's BPE tokenizer class.
        processing_class=tokenizer(AutoConfig.from_pretrained(model_path).vocab_size - len(SPECIAL)),
        **(trainer_kwargs or {}),
    )
