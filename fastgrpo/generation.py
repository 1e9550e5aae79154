"""Sampling completions. ``Generator`` is the interface a faster backend (vLLM, SGLang) would
implement; ``HFGenerator`` uses transformers' ``generate`` with a KV cache."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass
class Rollouts:
    """Sampled sequences, groups contiguous (rows i*G .. i*G+G-1 share a prompt)."""

    prompt_ids: torch.Tensor  # (N, P) int64, left-padded
    prompt_mask: torch.Tensor  # (N, P) bool
    completion_ids: torch.Tensor  # (N, C) int64, right-padded
    completion_mask: torch.Tensor  # (N, C) bool: tokens up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool: reached max_completion_length without EOS

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> Rollouts:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return Rollouts(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def trim(self) -> Rollouts:
        """Drop prompt columns that are padding in every row and completion columns past the
        longest completion, so a micro-batch costs what its own longest sequence costs."""
        has_prompt = self.prompt_mask.any(0)
        start = int(has_prompt.int().argmax()) if bool(has_prompt.any()) else self.prompt_ids.shape[1] - 1
        width = max(int(self.completion_mask.sum(1).max()), 1) if len(self) else 1
        return Rollouts(
            self.prompt_ids[:, start:],
            self.prompt_mask[:, start:],
            self.completion_ids[:, :width],
            self.completion_mask[:, :width],
            self.truncated,
        )

    @staticmethod
    def cat(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
        """Concatenate, left-padding prompts and right-padding completions to common widths."""
        P = max(r.prompt_ids.shape[1] for r in parts)
        C = max(r.completion_ids.shape[1] for r in parts)

        def pad(x, width, value, left):
            extra = width - x.shape[1]
            if extra == 0:
                return x
            fill = x.new_full((x.shape[0], extra), value)
            return torch.cat([fill, x] if left else [x, fill], dim=1)

        return Rollouts(
            torch.cat([pad(r.prompt_ids, P, pad_token_id, True) for r in parts]),
            torch.cat([pad(r.prompt_mask, P, False, True) for r in parts]),
            torch.cat([pad(r.completion_ids, C, pad_token_id, False) for r in parts]),
            torch.cat([pad(r.completion_mask, C, False, False) for r in parts]),
            torch.cat([r.truncated for r in parts]),
        )


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
