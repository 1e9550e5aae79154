"""The embedded default's task, in code: a character-level tokenizer with a chat template, and the
addition of two digits with the noisy answers the base model is warmed up on.

The user message is ``"a+b"``; a correct, well-formatted completion is
``<think>a+b</think><answer>a+b's value</answer>`` followed by EOS. Whether a completion is right or
well formatted is decided by the trainer's own ``accuracy`` and ``format`` rewards.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from .rewards import accuracy_reward, format_reward

if TYPE_CHECKING:
    import transformers

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|end|>"
# Only reached by characters outside the alphabet below; without it BPE would silently drop them.
UNK_TOKEN = "<|unk|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
ROLE_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS)
# Plain added tokens, not special: decode(skip_special_tokens=True) must keep them, since the
# format reward reads them from the decoded completion.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# Printable ASCII plus newline and tab, one token each.
ALPHABET = tuple(chr(i) for i in range(32, 127)) + ("\n", "\t")

# Every message is `<|role|>content<|end|>`, so the assistant turn ends with the EOS token the model
# learns to emit. Unknown roles raise instead of rendering as plain characters the model never saw.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# Warm-up data noise (see answer_distribution). The data is right 35% of the time and no wrong value
# gets more than about 0.12, so the right answer is the clear mode; the fitted model comes out a bit
# flatter than its data, at a sampled accuracy of about 0.25-0.3. Half the completions have the
# <think> block, so about half are well formatted.
P_CORRECT = 0.35
P_THINK = 0.5
WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)
P_NEAR = 0.5


# --------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(padding_side: str = "left", model_max_length: int = 128) -> transformers.PreTrainedTokenizerFast:
    """Build the character-level tokenizer of the embedded task, entirely in code.

    Every character of :data:`ALPHABET` is one token; the four tags are plain added tokens; pad, EOS,
    unknown and the chat-role markers are special tokens. There is no BOS token. Left padding is the
    default because batched generation needs it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *ALPHABET):
        vocab[token] = len(vocab)
    # BPE without merges splits text into single characters and, unlike WordLevel, needs no
    # pre-tokenizer; no pre-tokenizer also means spaces are kept as ordinary characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    # Fuse joins the character tokens back without the separating spaces the default decoder inserts.
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side=padding_side,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -------------------------------------------------------------------------------------------- task


def addition_prompt(a: int, b: int) -> str:
    """The user message for ``a + b``."""
    return f"{a}+{b}"


def gold_completion(a: int, b: int) -> str:
    """The correct, well-formatted completion for ``a + b`` (without EOS)."""
    return f"<think>{a}+{b}</think><answer>{a + b}</answer>"


def make_dataset_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt": "a+b", "answer": "sum"}`` with digits drawn uniformly, reproducible per seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": addition_prompt(a, b), "answer": str(a + b)})
    return rows


def write_dataset(path: str | Path, n: int, seed: int) -> Path:
    """Write :func:`make_dataset_rows` as jsonl (one row per line) to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file plus rename, so a reader never sees a truncated dataset.
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for row in make_dataset_rows(n, seed):
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion earns the trainer's ``accuracy`` reward for ``answer``."""
    return accuracy_reward([""], [completion], answer=[answer]) == [1.0]


def is_well_formatted(completion: str) -> bool:
    """Whether the completion earns the trainer's ``format`` reward."""
    return format_reward([""], [completion]) == [1.0]


def answer_distribution(a: int, b: int, p_correct: float = P_CORRECT, p_near: float = P_NEAR) -> dict[int, float]:
    """The warm-up data's distribution of the answer to ``a + b``, as ``{value: probability}``.

    The right sum gets ``p_correct``. The rest is wrong: a share ``p_near`` goes uniformly to near
    misses (off by 1 to 3), the remainder to the sum of two random digits, conditioned on being wrong.
    Near misses are drawn among the non-negative ones rather than clipped at zero, since clipping
    would pile mass onto 0 and could make a wrong answer the mode for small sums.
    """
    total = a + b
    dist = {total: p_correct}
    near = [total + d for d in WRONG_OFFSETS if total + d >= 0]
    for value in near:
        dist[value] = dist.get(value, 0.0) + (1.0 - p_correct) * p_near / len(near)
    # Distribution of the sum of two uniform digits: (10 - |v - 9|) / 100 for v in 0..18.
    far = {v: (10 - abs(v - 9)) / 100 for v in range(19) if v != total}
    norm = sum(far.values())
    for value, q in far.items():
        dist[value] = dist.get(value, 0.0) + (1.0 - p_correct) * (1.0 - p_near) * q / norm
    return dist


def addition_completion(a: int, b: int, value: int, think: bool) -> str:
    """The completion answering ``value`` to ``a + b``, with or without the ``<think>`` block (no EOS)."""
    return (f"<think>{a}+{b}</think>" if think else "") + f"<answer>{value}</answer>"


def noisy_completion(
    a: int,
    b: int,
    rng: random.Random,
    p_correct: float = P_CORRECT,
    p_think: float = P_THINK,
    p_near: float = P_NEAR,
) -> str:
    """One completion drawn from the warm-up data distribution: answer from :func:`answer_distribution`,
    ``<think>`` block with probability ``p_think``."""
    dist = answer_distribution(a, b, p_correct, p_near)
    value = rng.choices(list(dist), weights=list(dist.values()))[0]
    return addition_completion(a, b, value, rng.random() < p_think)
