"""Sampling completions. ``Generator`` is the interface a faster backend (vLLM, SGLang) would
implement; ``HFGenerator`` uses transformers' ``generate`` with a KV cache. What they return,
``Rollouts``, lives in ``rollouts`` with the other batch types, so the update never comes back here."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from .rollouts import Rollouts


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    num_generations: int
    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    batch_size: int | None = None  # sequences per backend call; None = all


class Generator(Protocol):
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """Sample ``params.num_generations`` completions for each prompt text."""
        ...


def completion_mask_and_truncation(completion_ids: torch.Tensor, eos_token_ids: list[int]):
    """(mask, truncated): the mask covers tokens up to and including the first EOS."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    C = completion_ids.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], C, dtype=torch.long))
    positions = torch.arange(C, device=completion_ids.device)
    mask = positions[None, :] <= first[:, None]
    return mask, ~is_eos.any(1)


class HFGenerator:
    """transformers ``generate`` with a KV cache on left-padded prompt batches."""

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None):
        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        eos = tokenizer.eos_token_id
        extra = getattr(model.generation_config, "eos_token_id", None)
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        self.eos_token_ids = sorted({eos, *extra} - {None})
        if not self.eos_token_ids:
            raise ValueError("the tokenizer has no eos_token; generation could never stop")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        trunc_side, tok.truncation_side = tok.truncation_side, "left"  # keep the end of a long prompt
        try:
            enc = tok(
                prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,  # the chat template already holds any BOS
                truncation=self.max_prompt_length is not None,
                max_length=self.max_prompt_length,
            )
        finally:
            tok.padding_side, tok.truncation_side = side, trunc_side
        return enc["input_ids"], enc["attention_mask"].bool()

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        import transformers

        model = self.model
        device = next(model.parameters()).device
        ids, mask = self.tokenize_prompts(prompts)
        ids = ids.repeat_interleave(params.num_generations, 0).to(device)
        mask = mask.repeat_interleave(params.num_generations, 0).to(device)
        gen_config = transformers.GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_completion_length,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        was_training = model.training
        model.eval()
        step = params.batch_size or ids.shape[0]
        parts = []
        try:
            for start in range(0, ids.shape[0], step):
                rows = slice(start, start + step)
                out = model.generate(
                    input_ids=ids[rows], attention_mask=mask[rows].long(), generation_config=gen_config
                )
                completion = out[:, ids.shape[1] :]
                if completion.shape[1] == 0:
                    completion = ids.new_full((out.shape[0], 1), self.pad_token_id)
                cmask, truncated = completion_mask_and_truncation(completion, self.eos_token_ids)
                completion = torch.where(cmask, completion, self.pad_token_id)
                parts.append(Rollouts(ids[rows], mask[rows], completion, cmask, truncated))
        finally:
            model.train(was_training)
        return Rollouts.cat(parts, self.pad_token_id)
