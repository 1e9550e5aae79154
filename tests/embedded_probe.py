"""Probes of the embedded task's model, for the tests: decoded samples and exact answer probabilities.

Test-only code, kept out of the package: ``fastgrpo train`` never samples this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastgrpo.train.embedded import _prompt_text
from fastgrpo.train.embedded_task import addition_completion, addition_prompt
from fastgrpo.train.sampling import HFGenerator


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num_samples: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    do_sample: bool = True,
    seed: int = 0,
) -> list[list[str]]:
    """``num_samples`` decoded completions per prompt, via HF ``generate`` on left-padded chat prompts."""
    import torch

    ids, mask = HFGenerator(model, tokenizer).tokenize_prompts([_prompt_text(tokenizer, p) for p in prompts])
    enc = {"input_ids": ids, "attention_mask": mask.long()}
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0, num_return_sequences=num_samples)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    per = num_samples if do_sample else 1
    return [decoded[i * per : (i + 1) * per] for i in range(len(prompts))]


def answer_probabilities(model: Any, tokenizer: Any, a: int, b: int, max_value: int = 27) -> dict[int, float]:
    """Exact probability, under ``model``, of completing ``a+b`` with each answer ``0..max_value``.

    Each value's probability is summed over its two well-formed spellings (with and without the
    ``<think>`` block), EOS included. Exact, so unlike sample counts it can tell which answer is the
    mode when the mode holds only a third of the mass.
    """
    import torch

    prompt = tokenizer(_prompt_text(tokenizer, addition_prompt(a, b)), add_special_tokens=False)["input_ids"]
    keys, seqs = [], []
    for value in range(max_value + 1):
        for think in (False, True):
            completion = tokenizer(addition_completion(a, b, value, think), add_special_tokens=False)["input_ids"]
            keys.append(value)
            seqs.append(prompt + completion + [tokenizer.eos_token_id])
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logprobs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
    token_lp = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    # Only completion positions count; the prompt is given, and padding is not part of any sequence.
    positions = torch.arange(1, width)[None, :]
    lengths = mask.sum(1)[:, None]
    keep = (positions >= len(prompt)) & (positions < lengths)
    seq_prob = (token_lp * keep).sum(1).exp().tolist()
    out: dict[int, float] = {}
    for value, prob in zip(keys, seq_prob, strict=True):
        out[value] = out.get(value, 0.0) + prob
    return out
