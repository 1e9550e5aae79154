"""The ``graph`` backend: a decode loop of our own over a slot KV cache, replayed from CUDA graphs.

Why (benchmarks/NOTES.md, 2026-12-06): eager ``generate`` issues ~1,100 kernel launches per decode step
of a 1.5B model, ~70 ms of host time against ~3 ms of GPU work; transformers' continuous batching
without flash-attn attends every query to the whole batch's keys under a dense mask, a cost that grows
as the square of the sequences in flight. Here:

- Prompts are run once each (``slot_forward`` over the prompt, T tokens per slot), and the slot's keys and
  values are forked to its G completions.
- One decode step is: sample from the last logits (repetition penalty, temperature, top-k, top-p, in
  transformers' order; Gumbel-max draw), record the token and its log-prob under the processed
  distribution, mark EOS, then run the model on the new token. All on the device, no host sync: on CUDA
  the step is captured once per batch size as a CUDA graph and replayed.
- Every ``check_every`` steps the host reads how many rows are still running (one sync). When at most half
  of the slots are, the running rows are moved to the front (keys, values and state, in place) and the
  next steps run the graph of the smaller batch (sizes halve: S, S/2, ..., 1), so finished rows stop
  costing.

CPU runs the same step eagerly (the tests: greedy rows equal ``hf``'s, sampled log-probs equal the
policy's). Model families: ``slot_model.SUPPORTED``.
"""

from __future__ import annotations

import math

import torch

from ..memory import kv_bytes_per_token, release_cached_memory
from ..policy import unwrap
from ..rollouts import Rollouts
from .base import SamplingParams, completion_mask_and_truncation, eos_and_pad, tokenize_prompts
from .slot_model import SlotCache, check_supported, slot_forward


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """(b, V) float32 logits -> the logits sampled from, as transformers' processors make them: repetition
    penalty on ``seen`` (b, V) bool tokens, temperature, top-k, top-p (removed tokens at -inf)."""
    x = logits
    if params.repetition_penalty != 1.0 and seen is not None:
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if params.temperature != 1.0:
        x = x / params.temperature
    if params.top_k > 0:
        kth = torch.topk(x, min(params.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        ascending, order = torch.sort(x, dim=-1)
        cumulative = ascending.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[:, -1] = False  # the most likely token always stays
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return x


def draw(processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from ``softmax(processed)`` by the Gumbel-max trick (no host sync, capturable),
    and its log-prob under that distribution: (b,) int64, (b,) float32."""
    logp = processed.log_softmax(-1)
    u = torch.rand_like(logp).clamp_(min=torch.finfo(torch.float32).tiny)
    token = (logp - torch.log(-torch.log(u))).argmax(-1)
    return token, logp.gather(1, token[:, None])[:, 0]


class _Batch:
    """The device state of ``S`` slots decoding together: the last logits, next positions, done flags,
    recorded tokens and log-probs (``S``, ``C``), tokens seen (for the repetition penalty), and the shared
    step index; plus the slot -> row map, kept on the host."""

    def __init__(self, logits, positions, cache, C, pad, seen, rows, limits=None):
        S, device = logits.shape[0], logits.device
        self.logits, self.positions, self.cache, self.seen, self.limits = logits, positions, cache, seen, limits
        self.done = torch.zeros(S, dtype=torch.bool, device=device)
        self.tokens = torch.full((S, C), pad, dtype=torch.long, device=device)
        self.logprobs = torch.zeros((S, C), dtype=torch.float32, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.rows, self.size = rows, S

    def keep(self, slots: torch.Tensor) -> None:
        """Slots ``slots`` (k,) to the front, in place; ``size`` becomes k."""
        for x in (self.logits, self.positions, self.done, self.tokens, self.logprobs, self.seen, self.limits):
            if x is not None:
                x[: slots.numel()] = x.index_select(0, slots)
        self.cache.select_(slots)
        self.rows = self.rows[slots.cpu()]
        self.size = slots.numel()


class GraphGenerator:
    """Decoding of our own, CUDA-graph replayed on CUDA (see the module docstring).

    ``model``: the training policy (peft allowed), a ``slot_model.SUPPORTED`` family; ``check_every``:
    decode steps between the host's looks at how many rows run (the only syncs of the loop)."""

    def __init__(self, model, tokenizer, max_prompt_length: int | None = None, check_every: int = 16):
        check_supported(model, 0)
        self.model, self.tokenizer, self.max_prompt_length = model, tokenizer, max_prompt_length
        self.eos_token_ids, self.pad_token_id = eos_and_pad(model, tokenizer)
        self.check_every = check_every
        self._graphs: dict = {}
        self.computed_tokens = 0  # slot-steps the last generate call ran (finished rows until compacted included)

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    def release(self) -> None:
        self._graphs.clear()  # their pools hold the batch's buffers
        release_cached_memory(next(self.model.parameters()).device)

    def update_weights(self) -> None:
        pass  # samples from the training model itself; optimizer steps update the weights in place

    # ---- one decode step, the unit a CUDA graph captures

    def _step(self, b: _Batch, n: int, params: SamplingParams, eos: torch.Tensor) -> None:
        seen = None if b.seen is None else b.seen[:n]
        token, logp = draw(process_logits(b.logits[:n], seen, params))
        done = b.done[:n]
        token = token.masked_fill(done, self.pad_token_id)
        column = b.t.view(1, 1).expand(n, 1)
        b.tokens[:n].scatter_(1, column, token[:, None])
        b.logprobs[:n].scatter_(1, column, logp.masked_fill(done, 0.0)[:, None])
        done |= (token[:, None] == eos).any(-1)  # not isin: with many ids it sorts, which syncs
        if b.limits is not None:
            done |= b.t + 1 >= b.limits[:n]
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = slot_forward(self.model, token[:, None], b.positions[:n, None], b.cache)
        b.logits[:n] = logits[:, 0].float()
        b.positions[:n] += 1
        b.t += 1

    def _run_step(self, b: _Batch, params: SamplingParams, eos: torch.Tensor) -> None:
        n = b.size
        if b.logits.device.type != "cuda":
            self._step(b, n, params, eos)
            return
        graph = self._graphs.get(n)
        if graph is None:
            # A real step on the capture's own stream first: it compiles the kernels and sets up that stream's
            # library workspaces (cuBLAS), which a capture must not do; then the capture records, runs nothing.
            stream = self._graphs.setdefault("stream", torch.cuda.Stream())
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step(b, n, params, eos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            pool = self._graphs.setdefault("pool", torch.cuda.graph_pool_handle())
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._step(b, n, params, eos)
            self._graphs[n] = graph
            return
        graph.replay()

    # ---- a call

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, L: int, G: int, seen_needed: bool):
        """Prompts (n, P) left-padded -> (first logits (n*G, V) float32, next positions (n*G,), cache of
        n*G slots, seen (n*G, V) bool or None)."""
        device = next(self.model.parameters()).device
        lengths = mask.sum(1)
        P = int(lengths.max())
        # Left-aligned: token j of a prompt at position j; the right padding is written, then overwritten.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        tokens = ids.gather(1, order)[:, :P].to(device)
        dtype = next(p for p in unwrap(self.model).parameters() if p.is_floating_point()).dtype
        cache = SlotCache.empty(self.model, ids.shape[0], L, device, dtype)
        positions = torch.arange(P, device=device).expand(ids.shape[0], P)
        last = slot_forward(self.model, tokens, positions, cache, logits_at=lengths.to(device) - 1).float()
        seen = None
        if seen_needed:  # the prompt's own tokens, not its padding
            real = (torch.arange(P, device=device) < lengths.to(device)[:, None]).int()
            seen = torch.zeros(last.shape, dtype=torch.int32, device=device).scatter_add_(1, tokens, real) > 0
            seen = seen.repeat_interleave(G, 0)
        return last.repeat_interleave(G, 0), lengths.to(device).repeat_interleave(G), cache.repeat(G), seen

    def _decode(self, ids, mask, params: SamplingParams, limits=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions (N, C) and their log-probs for prompts (n, P): rows i*G..i*G+G-1 of prompt i; a row
        with a ``limits`` (N,) entry stops after that many tokens."""
        G, C = params.num_generations, params.max_completion_length
        L = int(mask.sum(1).max()) + C
        check_supported(self.model, L)
        logits, positions, cache, seen = self._prefill(ids, mask, L, G, params.repetition_penalty != 1.0)
        N = logits.shape[0]
        if limits is not None:
            limits = torch.as_tensor(limits, dtype=torch.long, device=logits.device)
        b = _Batch(logits, positions, cache, C, self.pad_token_id, seen, torch.arange(N), limits)
        eos = torch.tensor(self.eos_token_ids, device=logits.device)
        tokens = torch.full((N, C), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((N, C), dtype=torch.float32)
        self._graphs = {k: v for k, v in self._graphs.items() if isinstance(k, str)}  # new buffers: new graphs
        for t in range(C):
            self._run_step(b, params, eos)
            self.computed_tokens += b.size
            if (t + 1) % self.check_every and t + 1 < C:
                continue
            done = b.done[: b.size].cpu()
            running = int((~done).sum())
            if running == 0 or t + 1 == C:
                break
            size = shrink(b.size, running)
            if size < b.size:
                # The running rows, then finished ones to fill the smaller batch (they record padding).
                order = torch.argsort(done.to(torch.int8), stable=True)
                dropped = order[size:]
                tokens[b.rows[dropped]] = b.tokens[: b.size].cpu()[dropped]
                logprobs[b.rows[dropped]] = b.logprobs[: b.size].cpu()[dropped]
                b.keep(order[:size].to(b.tokens.device))
        tokens[b.rows] = b.tokens[: b.size].cpu()
        logprobs[b.rows] = b.logprobs[: b.size].cpu()
        return tokens, logprobs

    def _prompts_per_call(self, n: int, longest_prompt: int, params: SamplingParams) -> int:
        """``batch_size // G`` prompts per call when set; else all of them, or on CUDA as many as fit in 80 %
        of the free memory: per row its slot's keys and values (2 x layers x KV x (prompt + cap) x D) and
        a few (V,) float32 rows of logits."""
        G = params.num_generations
        if params.batch_size is not None:
            return max(1, params.batch_size // G)
        device = next(self.model.parameters()).device
        if device.type != "cuda":
            return n
        per_row = (longest_prompt + params.max_completion_length) * kv_bytes_per_token(self.model)
        per_row += 4 * 4 * unwrap(self.model).config.vocab_size + 12 * params.max_completion_length
        rows = int(0.8 * torch.cuda.mem_get_info(device)[0]) // per_row
        return max(1, min(n, rows // G))

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams, row_limits=None) -> Rollouts:
        """``params.num_generations`` completions per prompt, groups contiguous; completions (N, C) right-padded
        with the pad id, C the longest; ``sampler_logprobs`` (N, C) float32, 0 where masked.
        ``row_limits``: N ints, row j stops after that many tokens without an EOS (``fastgrpo bench generate``
        imposes its long-tailed lengths so), marked truncated."""
        ids, mask = self.tokenize_prompts(prompts)
        self.computed_tokens = 0
        G = params.num_generations
        per_call = self._prompts_per_call(len(prompts), int(mask.sum(1).max()), params)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        parts = []
        try:
            for start in range(0, len(prompts), per_call):
                rows = slice(start, start + per_call)
                limits = None if row_limits is None else row_limits[rows.start * G : rows.stop * G]
                tokens, logprobs = self._decode(ids[rows], mask[rows], params, limits)
                cmask, truncated = completion_mask_and_truncation(tokens, self.eos_token_ids)
                if limits is not None:
                    cmask &= torch.arange(tokens.shape[1]) < torch.as_tensor(limits)[:, None]
                width = max(int(cmask.sum(1).max()), 1)
                parts.append(
                    Rollouts(
                        ids[rows].repeat_interleave(G, 0), mask[rows].repeat_interleave(G, 0),
                        torch.where(cmask, tokens, self.pad_token_id)[:, :width], cmask[:, :width],
                        truncated, torch.where(cmask, logprobs, 0.0)[:, :width],
                    ).map(lambda x, device=device: x.to(device))
                )  # fmt: skip
        finally:
            self.model.train(was_training)
        return Rollouts.cat(parts, self.pad_token_id)


def shrink(size: int, running: int) -> int:
    """The batch size to run ``running`` rows at, from ``size``: halved (rounding up) while the rows fit
    in half of it, so a call of S slots runs at most log2(S) + 1 sizes (one CUDA graph each)."""
    while size > 1 and running <= size // 2:
        size = math.ceil(size / 2)
    return size
