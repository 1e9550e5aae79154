"""The ``continuous`` backend: transformers' continuous batching over the training model itself.

A paged KV cache holds only the sequences in flight, each request finishes at its own EOS and its
slot goes to the next one, and the G completions of a prompt are forks of one prefill
(``num_return_sequences``). The sampler's log-probs come back with the tokens.

What transformers' continuous batching (``transformers.generation.continuous_batching``) does and
does not do, as read in the installed source and relied on here:

- ``ContinuousBatchingConfig(return_logprobs=True)`` returns, per token, ``log(softmax(scores))``
  at the sampled token, where ``scores`` are the logits after every logits processor
  (repetition penalty, temperature, top-k, top-p, in ``generate``'s order): the log-prob under the
  distribution the token was actually drawn from. ``HFGenerator`` reports the same quantity.
- Temperature, top-k and top-p are the very ``generate`` warpers, so they mean the same here.
  ``RepetitionPenaltyLogitsProcessor`` is marked unsupported and *dropped with a warning*; this
  backend refuses ``repetition_penalty != 1`` instead (and any other processor the manager drops).
- ``max_requests_per_batch`` bounds the sequences in one forward; it is what ``batch_size`` sets.
  Decoding requests have priority over new ones, so it also bounds the sequences in flight.
- The loop runs in a background thread and seeds the process-wide torch RNG with
  ``torch.manual_seed(config.seed)`` (a random draw when the seed is None). The seed is drawn here
  from the caller's RNG, and the whole call runs inside ``torch.random.fork_rng``, so sampling is a
  function of the caller's RNG state (a resumed run repeats), and the caller's stream only advances
  by that one draw.
- ``paged|sdpa`` / ``paged|flash_attention_2`` are deprecated names in this version: plain ``sdpa``
  and ``flash_attention_2`` already run over the paged cache, so those are what is set.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from ..memory import release_cached_memory
from ..rollouts import Rollouts
from .base import SamplingParams, eos_and_pad, rollouts_from_token_rows, tokenize_prompts

# With SDPA, continuous batching runs a step's sequences as one packed row under a dense
# (batch tokens x cached tokens) mask, whose planned size grows with the square of the sequences in
# flight: 4000 in flight asked for 8.7 GB on CPU and failed. Without a ``batch_size`` at most this many
# are in flight (on CPU, 256 in flight ran 256 x 128 tokens 1.8x faster than 64; raise it with
# ``batch_size``). Flash-attention is varlen, and there every sequence of the call is in flight.
SDPA_IN_FLIGHT = 64
# transformers' default page (tokens per cache block); flash's paged decode path wants a multiple of 256.
_CUDA_PAGE_SIZE = 256


def _attention_for(model) -> str:
    """The paged-cache attention to sample with: flash-attention 2 on CUDA in half precision when
    installed (it needs no dense mask), else SDPA (which works on CPU and in float32)."""
    device = next(model.parameters()).device
    half = model.dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class ContinuousGenerator:
    """transformers continuous batching (paged KV cache) over the training model.

    ``return_logprobs``: fill ``Rollouts.sampler_logprobs`` (N, C) float32 with the sampler's own
    log-prob of each completion token, 0 where masked; costs one gather per token, so on by default.
    """

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None, return_logprobs: bool = True):
        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        self.return_logprobs = return_logprobs
        self.eos_token_ids, self.pad_token_id = eos_and_pad(model, tokenizer)
        self._manager = None  # only set while a generate call runs

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    @staticmethod
    def check_params(params: SamplingParams) -> None:
        """Raise ``ValueError`` for a setting continuous batching cannot honour, rather than ignore it."""
        if params.repetition_penalty != 1.0:
            raise ValueError(
                f"repetition_penalty={params.repetition_penalty} is not supported by generation_backend='continuous' "
                "(transformers' continuous batching drops RepetitionPenaltyLogitsProcessor); use "
                "generation_backend='hf' or repetition_penalty=1.0"
            )
        if params.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {params.max_completion_length}")

    def release(self) -> None:
        # Each generate call builds its manager and paged cache and destroys them before it returns; this
        # only makes sure of it (e.g. after an interrupted call) and hands the cached blocks back on CUDA.
        self._destroy_manager()
        release_cached_memory(next(self.model.parameters()).device)

    def update_weights(self) -> None:
        # Samples from the training model itself, so new weights are seen at once. Nothing that depends on
        # the weights outlives a generate call: the manager, its paged cache (whose prefix-sharing blocks
        # hold KV computed with the old weights) and any CUDA graphs it captured are destroyed at its end.
        self._destroy_manager()

    def _destroy_manager(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            if manager.is_running():
                manager.stop(block=True)
            manager.destroy()
        # A manager kept with ``persistent_manager=True`` elsewhere would be reused by init_continuous_batching.
        if getattr(self.model, "_cached_continuous_batching_manager", None) is not None:
            self.model.destroy_cached_continuous_batching_manager()

    def _cb_config(self, params: SamplingParams, n_seqs: int, prompt_width: int, seed: int):
        """Size the paged cache to this call's workload instead of to the free memory (which on CPU
        means most of the RAM, seconds to allocate)."""
        from transformers import ContinuousBatchingConfig

        model = self.model
        device = next(model.parameters()).device
        G = params.num_generations
        limit = params.batch_size or (n_seqs if _attention_for(model) != "sdpa" else SDPA_IN_FLIGHT)
        in_flight = min(n_seqs, limit)
        length = prompt_width + params.max_completion_length
        # Small pages on CPU: a short sequence then holds one small block, not one of 256 tokens.
        page = _CUDA_PAGE_SIZE if device.type == "cuda" else min(256, max(16, 1 << (length - 1).bit_length()))
        per_seq = math.ceil(length / page) + 1  # +1: a fork copies the partly filled last block
        # The in-flight sequences plus a group of forks, with room for the scheduler's safety margin (15%).
        num_blocks = math.ceil(1.3 * (in_flight + G) * per_seq) + 2
        if device.type == "cuda":
            text = model.config.get_text_config()
            kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            block_bytes = 2 * text.num_hidden_layers * kv_heads * head_dim * page * model.dtype.itemsize
            free, _ = torch.cuda.mem_get_info(device)
            if num_blocks * block_bytes > 0.7 * free:
                num_blocks = None  # let transformers size the cache to memory; requests then queue for blocks
        return ContinuousBatchingConfig(
            page_size=page,
            num_blocks=num_blocks,
            # Enough to prefill every in-flight prompt in one forward, within transformers' default.
            max_batch_tokens=min(8192, max(256, in_flight * (prompt_width + 1))),
            max_requests_per_batch=in_flight,
            return_logprobs=self.return_logprobs,
            seed=seed,
            auto_switch_to_flash=False,  # the attention is chosen (and restored) here
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """``params.num_generations`` completions per prompt, groups contiguous (rows i*G..i*G+G-1 share
        prompt i). Prompts (N, P) left-padded, completions (N, C) right-padded with the pad id, C the
        longest completion; ``sampler_logprobs`` (N, C) float32 (0 where masked) when ``return_logprobs``."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        self.check_params(params)
        model = self.model
        device = next(model.parameters()).device
        G = params.num_generations
        ids, mask = self.tokenize_prompts(prompts)
        inputs = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
        if any(len(x) < 2 for x in inputs):
            # A fork keeps one prompt token back for the children's first step; a shorter prompt cannot fork.
            raise ValueError("generation_backend='continuous' needs prompts of at least 2 tokens")
        N = len(inputs) * G
        # One draw from the caller's RNG seeds the sampler thread (see the module docstring).
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        cb_config = self._cb_config(params, N, ids.shape[1], seed)
        hints = WorkloadHints(
            max_prompt_length=ids.shape[1], max_generated_length=params.max_completion_length, num_requests=N
        )
        rows = self._run(inputs, params, cb_config, hints, device)
        tokens = [list(o.generated_tokens) for o in rows]
        logprob_rows = [list(o.logprobs or []) for o in rows] if self.return_logprobs else None
        eos, pad = self.eos_token_ids, self.pad_token_id
        return rollouts_from_token_rows(tokens, logprob_rows, ids, mask, G, eos, pad, device)

    def _generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_completion_length,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            num_return_sequences=params.num_generations,
        )

    def _run(self, inputs: list[list[int]], params: SamplingParams, cb_config, hints, device) -> list:
        """The finished outputs of every request, in row order (prompt i's parent, then its G - 1 forks),
        under the attention continuous batching accepts, the caller's RNG state and training mode kept."""
        model, G = self.model, params.num_generations
        N = len(inputs) * G
        original_attn = model.config._attn_implementation
        was_training = model.training
        rng_devices = []  # fork_rng always covers the CPU generator; the CUDA one of this device too
        if device.type == "cuda":
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            with torch.random.fork_rng(devices=rng_devices):
                target = _attention_for(model)
                if original_attn != target:
                    # Training attention (sdpa_varlen, packed flash) is not one continuous batching accepts.
                    model.set_attn_implementation(target)
                self._destroy_manager()
                self._manager = manager = model.init_continuous_batching(
                    generation_config=self._generation_config(params),
                    continuous_batching_config=cb_config,
                    workload_hints=hints,
                )
                _check_processors(manager, params)
                # Every request is queued before the loop starts, so its first step takes them all and the
                # schedule (hence which random draw goes to which row) does not depend on thread timing.
                request_ids = manager.add_requests(inputs, max_new_tokens=params.max_completion_length)
                results, error = _collect(manager, N)
                self._destroy_manager()
        finally:
            self._destroy_manager()
            if model.config._attn_implementation != original_attn:
                model.set_attn_implementation(original_attn)
            model.train(was_training)
        if error is not None or len(results) < N:
            raise RuntimeError(f"continuous batching stopped early ({len(results)}/{N} completions): {error}")
        # Forks are named "<parent>__child#k": the group of prompt i is its parent then its G - 1 children.
        rows = [results[r] for rid in request_ids for r in (rid, *(f"{rid}__child#{k}" for k in range(G - 1)))]
        failed = [o.error for o in rows if o.error is not None]
        if failed:
            raise RuntimeError(f"continuous batching failed {len(failed)} of {N} requests: {failed[0]}")
        return rows


def _check_processors(manager, params: SamplingParams) -> None:
    """Each sampling setting in use has its logits processor in the manager (an older transformers may lack
    one and would silently sample from another distribution)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    wanted = {
        "temperature": (TemperatureLogitsWarper, params.temperature != 1.0),
        "top_k": (TopKLogitsWarper, params.top_k != 0),
        "top_p": (TopPLogitsWarper, params.top_p < 1.0),
    }
    kept = {type(p) for p in manager.logit_processor.logits_processor}
    for name, (cls, needed) in wanted.items():
        if needed and cls not in kept:
            raise ValueError(f"{name} is not supported by this transformers' continuous batching")


def _collect(manager, n: int) -> tuple[dict, BaseException | None]:
    """Start the manager and wait for ``n`` finished requests: (request id -> output, the background
    thread's fatal error or None). Returns early if the thread stops."""
    results = {}
    manager.start()
    while len(results) < n:
        out = manager.get_result(timeout=1.0)
        if out is None:
            if not manager.is_running():
                break
            continue
        if out.is_finished():
            results[out.request_id] = out
    return results, manager.background_thread_status.fatal_error
