"""What every sampling backend shares: the settings, the interface, prompt tokenization and EOS
handling. A backend returns ``Rollouts`` (``..rollouts``), so the update never comes back here."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from ..rollouts import Rollouts
from ..text_tail import text_tail


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """The same meaning in every backend."""

    num_generations: int  # G: completions per prompt
    max_completion_length: int  # new tokens per completion; a completion that reaches it without EOS is truncated
    temperature: float = 1.0  # logits / temperature before sampling
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p; 1 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL penalty on tokens already in prompt or completion; 1 = off
    batch_size: int | None = None  # sequences per backend call (hf) or in flight (continuous); None = all


class Generator(Protocol):
    """A sampling backend. ``eos_token_ids`` and ``pad_token_id`` are what its completions use."""

    eos_token_ids: list[int]
    pad_token_id: int

    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """Sample ``params.num_generations`` completions for each prompt text, groups contiguous.
        ``Rollouts.sampler_logprobs`` holds the sampler's own per-token log-probs where it has them."""
        ...

    def release(self) -> None:
        """Sampling is over until the next ``generate``: give back its memory (KV cache, paged blocks,
        or put an engine to sleep) before the update needs it."""
        ...

    def update_weights(self) -> None:
        """The policy's weights changed (an optimizer step): the next ``generate`` must sample from them."""
        ...


def eos_and_pad(model, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, pad id): the tokenizer's EOS plus every EOS of the model's generation config; pad
    falls back to the first EOS."""
    eos = tokenizer.eos_token_id
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    eos_token_ids = sorted({eos, *extra} - {None})
    if not eos_token_ids:
        raise ValueError("the tokenizer has no eos_token; generation could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]
    return eos_token_ids, pad


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), (N, P) int64 / bool, left-padded; a prompt over ``max_prompt_length`` tokens
    keeps its end (only its end is tokenized: see ``text_tail``)."""
    if max_prompt_length is not None:
        prompts = [text_tail(tokenizer, p, max_prompt_length) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    trunc_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        enc = tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,  # the chat template already holds any BOS
            truncation=max_prompt_length is not None,
            max_length=max_prompt_length,
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc_side
    return enc["input_ids"], enc["attention_mask"].bool()


def completion_mask_and_truncation(completion_ids: torch.Tensor, eos_token_ids: list[int]):
    """(mask, truncated): the mask covers tokens up to and including the first EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    C = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], C, dtype=torch.long))
    positions = torch.arange(C, device=completion_ids.device)
    mask = positions[None, :] <= first[:, None]
    return mask, ~is_eos.any(1)


def rollouts_from_token_rows(
    rows: list[list[int]],
    logprob_rows: list[list[float]] | None,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_generations: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    device: torch.device | str,
) -> Rollouts:
    """``Rollouts`` from an engine's sampled token lists (N = n * G of them, groups contiguous), laid out as
    ``hf`` lays them out: completions (N, C) right-padded with ``pad_token_id``, C the longest (at least 1),
    the mask up to and including the first EOS, ``truncated`` where none came; ``sampler_logprobs`` (N, C)
    float32, 0 where masked, or None. ``prompt_ids`` / ``prompt_mask``: (n, P), what was sent."""
    N = len(rows)
    C = max([len(r) for r in rows] + [1])
    completion = torch.full((N, C), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros((N, C), dtype=torch.float32)
    for j, tokens in enumerate(rows):
        completion[j, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        if logprob_rows is not None and logprob_rows[j]:
            logprobs[j, : len(logprob_rows[j])] = torch.tensor(logprob_rows[j], dtype=torch.float32)
    # EOS is searched among the returned tokens only (-1 is no id): with a pad id that is also an EOS id, a row
    # cut short without EOS stays truncated.
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    returned = torch.arange(C)[None, :] < lengths[:, None]
    cmask, truncated = completion_mask_and_truncation(torch.where(returned, completion, -1), list(eos_token_ids))
    cmask &= returned
    ro = Rollouts(
        prompt_ids.repeat_interleave(num_generations, 0),
        prompt_mask.repeat_interleave(num_generations, 0),
        torch.where(cmask, completion, pad_token_id),
        cmask,
        truncated,
        None if logprob_rows is None else torch.where(cmask, logprobs, 0.0),
    )
    return ro.map(lambda x: x.to(device))


def completion_texts(rollouts: Rollouts, tokenizer, eos_token_ids: list[int]) -> tuple[list[list[int]], list[str]]:
    """What the rewards see of each completion: its token ids (masked-in, the EOS kept) and its text (EOS
    ids dropped, special tokens skipped), in row order."""
    ids = [row[m].tolist() for row, m in zip(rollouts.completion_ids, rollouts.completion_mask, strict=True)]
    eos = set(eos_token_ids)
    texts = tokenizer.batch_decode([[t for t in x if t not in eos] for x in ids], skip_special_tokens=True)
    return ids, texts
