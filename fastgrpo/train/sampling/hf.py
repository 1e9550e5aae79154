"""The ``hf`` backend: transformers ``generate`` with a dense KV cache on left-padded prompt batches.
Every row of a call waits for the longest one; simple, and the fastest on CPU at short lengths."""

from __future__ import annotations

import torch

from ..memory import release_cached_memory
from ..rollouts import Rollouts
from .base import SamplingParams, completion_mask_and_truncation, eos_and_pad, tokenize_prompts


class HFGenerator:
    """transformers ``generate`` with a KV cache on left-padded prompt batches."""

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None):
        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        self.eos_token_ids, self.pad_token_id = eos_and_pad(model, tokenizer)

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    def release(self) -> None:
        release_cached_memory(next(self.model.parameters()).device)

    def update_weights(self) -> None:
        pass  # samples from the training model itself

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
