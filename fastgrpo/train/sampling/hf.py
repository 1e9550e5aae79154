"""The ``hf`` backend: transformers ``generate`` with a dense KV cache on left-padded prompt batches.
Every row of a call waits for the longest one; simple, and the fastest on CPU at short lengths."""

from __future__ import annotations

import torch

from ..memory import release_cached_memory
from ..rollouts import Rollouts
from .base import SamplingParams, completion_mask_and_truncation, eos_and_pad, tokenize_prompts


class _SampledLogprobs:
    """The last logits processor: records ``log_softmax(scores)`` at the sampled token, where ``scores``
    are the logits after every other processor, i.e. the distribution ``generate`` samples from.

    The token of step t is only known at step t + 1 (in ``input_ids``), so one step's (n, V)
    log-softmax is kept, never (n, C, V) as ``output_scores`` would; the last step's token is gathered
    by ``finish``. Cost: one (n, V) log-softmax and gather per step, next to a full forward. A plain
    callable: ``LogitsProcessorList`` needs no base class, and transformers stays unimported until used."""

    def __init__(self):
        self.last = None  # (n, V) fp32 log-softmax of the previous step's processed scores
        self.values = []  # per step, (n,) fp32

    def __call__(self, input_ids, scores):
        if self.last is not None:
            self.values.append(self.last.gather(1, input_ids[:, -1:])[:, 0])
        self.last = scores.float().log_softmax(-1)
        return scores

    def finish(self, completion: torch.Tensor) -> torch.Tensor:
        """(n, C) fp32 log-probs of ``completion`` (n, C), the tokens generate returned."""
        C = completion.shape[1]
        if self.last is not None and len(self.values) < C:
            self.values.append(self.last.gather(1, completion[:, len(self.values)][:, None])[:, 0])
        values = self.values[:C]
        out = completion.new_zeros(completion.shape, dtype=torch.float32)
        if values:
            out[:, : len(values)] = torch.stack(values, 1)
        return out


class HFGenerator:
    """transformers ``generate`` with a KV cache on left-padded prompt batches.

    ``return_logprobs``: fill ``Rollouts.sampler_logprobs`` (N, C) float32 with the sampler's log-prob of
    each completion token, 0 where masked. "Sampler log-prob" means the log-prob under the distribution
    the token was drawn from: ``log_softmax`` of the logits after repetition penalty, temperature, top-k
    and top-p (``generate``'s processors, in its order). With ``top_p=1, top_k=0, repetition_penalty=1``
    it is ``log_softmax(logits / temperature)[token]``, what the policy recomputes for the loss
    (``policy.completion_logprobs``); the ``continuous`` backend reports the same quantity. Cheap (one
    (N, V) log-softmax per step, no (N, C, V) history), so on by default.
    """

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None, return_logprobs: bool = True):
        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        self.return_logprobs = return_logprobs
        self.eos_token_ids, self.pad_token_id = eos_and_pad(model, tokenizer)

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    def release(self) -> None:
        release_cached_memory(next(self.model.parameters()).device)

    def update_weights(self) -> None:
        pass  # samples from the training model itself

    def _processors(self, params: SamplingParams):
        """(generation config, extra logits processors, recorder or None). With log-probs, the warpers
        (temperature, top-k, top-p) are passed as custom processors, so the recorder can follow them:
        ``generate`` puts custom processors before the warpers it builds itself. The resulting list, and
        so the samples for a given seed, are the same as without."""
        import transformers
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        record = self.return_logprobs
        warpers = LogitsProcessorList()
        if record:
            # The same conditions and order as GenerationMixin._get_logits_processor.
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k != 0:
                warpers.append(TopKLogitsWarper(top_k=params.top_k, min_tokens_to_keep=1))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
        gen_config = transformers.GenerationConfig(
            do_sample=True,
            temperature=1.0 if record else params.temperature,
            top_p=1.0 if record else params.top_p,
            top_k=0 if record else params.top_k,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_completion_length,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            use_cache=True,
        )
        recorder = _SampledLogprobs() if record else None
        if recorder is not None:
            warpers.append(recorder)
        return gen_config, warpers, recorder

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """``params.num_generations`` completions per prompt, groups contiguous (rows i*G..i*G+G-1 share
        prompt i). Prompts (N, P) left-padded, completions (N, C) right-padded with the pad id;
        ``sampler_logprobs`` (N, C) float32 (0 where masked) when ``return_logprobs``, else None."""
        model = self.model
        device = next(model.parameters()).device
        ids, mask = self.tokenize_prompts(prompts)
        ids = ids.repeat_interleave(params.num_generations, 0).to(device)
        mask = mask.repeat_interleave(params.num_generations, 0).to(device)
        was_training = model.training
        model.eval()
        step = params.batch_size or ids.shape[0]
        parts = []
        try:
            for start in range(0, ids.shape[0], step):
                rows = slice(start, start + step)
                gen_config, processors, recorder = self._processors(params)
                out = model.generate(
                    input_ids=ids[rows],
                    attention_mask=mask[rows].long(),
                    generation_config=gen_config,
                    logits_processor=processors,
                )
                completion = out[:, ids.shape[1] :]
                if completion.shape[1] == 0:
                    completion = ids.new_full((out.shape[0], 1), self.pad_token_id)
                cmask, truncated = completion_mask_and_truncation(completion, self.eos_token_ids)
                completion = torch.where(cmask, completion, self.pad_token_id)
                logprobs = None
                if recorder is not None:
                    logprobs = torch.where(cmask, recorder.finish(completion), 0.0)
                parts.append(Rollouts(ids[rows], mask[rows], completion, cmask, truncated, logprobs))
        finally:
            model.train(was_training)
        return Rollouts.cat(parts, self.pad_token_id)
