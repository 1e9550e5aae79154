"""The batch types that flow from sampling to the update, in the order they are made.

``Rollouts`` (what a sampler returns) -> ``Batch`` (scored, advantages, kept groups) ->
``MicroBatch`` (one backward pass's rows) -> ``PackedBatch`` (a micro-batch's real tokens in one
row, for padding-free passes: ``position_ids`` restart at 0 for every sequence, which is how
transformers recognizes packed rows). Plain data and the moves between layouts; no model here.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Rollouts:
    """Sampled sequences, groups contiguous (rows i*G .. i*G+G-1 share a prompt)."""

    prompt_ids: torch.Tensor  # (N, P) int64, left-padded
    prompt_mask: torch.Tensor  # (N, P) bool
    completion_ids: torch.Tensor  # (N, C) int64, right-padded
    completion_mask: torch.Tensor  # (N, C) bool: tokens up to and including the first EOS
    truncated: torch.Tensor  # (N,) bool: reached max_completion_length without EOS
    # (N, C) float32: the sampler's log-prob of each completion token (0 where masked), for the
    # sampler/trainer mismatch correction; None when the backend does not report them.
    sampler_logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def map(self, fn) -> Rollouts:
        """``fn`` applied to every tensor field (None stays None)."""
        return Rollouts(*(None if (x := getattr(self, f.name)) is None else fn(x) for f in dataclasses.fields(self)))

    def select(self, rows: torch.Tensor | list[int]) -> Rollouts:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.prompt_ids.device)
        return self.map(lambda x: x[rows])

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
            None if self.sampler_logprobs is None else self.sampler_logprobs[:, :width],
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
            # Only when every part has them: a mixed batch could not be corrected consistently.
            None
            if any(r.sampler_logprobs is None for r in parts)
            else torch.cat([pad(r.sampler_logprobs, C, 0.0, False) for r in parts]),
        )


@dataclasses.dataclass
class Batch:
    """A generation batch ready for the update: kept groups only."""

    rollouts: Rollouts
    loss_mask: torch.Tensor  # (N, C) bool
    advantages: torch.Tensor  # (N,) or (N, C) float32
    metrics: dict[str, float]

    def micro_batch(self, rows: list[int]) -> MicroBatch:
        """These rows, trimmed to their own longest prompt and completion, so a micro-batch costs
        what its own longest sequence costs."""
        index = torch.tensor(rows, dtype=torch.long, device=self.loss_mask.device)
        ro = self.rollouts.select(index).trim()
        width = ro.completion_ids.shape[1]
        adv = self.advantages[index.to(self.advantages.device)]
        return MicroBatch(index, ro, self.loss_mask[index][:, :width], adv if adv.dim() == 1 else adv[:, :width])


@dataclasses.dataclass
class MicroBatch:
    """The rows of one backward pass."""

    rows: torch.Tensor  # (n,) int64 rows of the generation batch
    rollouts: Rollouts  # trimmed to its own longest prompt and completion
    loss_mask: torch.Tensor  # (n, C') bool
    advantages: torch.Tensor  # (n,) or (n, C') float32


@dataclasses.dataclass
class PackedBatch:
    """A micro-batch's prompt + completion tokens, without padding, back to back in one row."""

    input_ids: torch.Tensor  # (1, L) int64: the real tokens of every sequence, back to back
    position_ids: torch.Tensor  # (1, L) int64: 0..len-1 within each sequence
    predict_index: torch.Tensor  # (M,) int64: packed position whose hidden state predicts each completion token
    num_sequences: int


def pack_rollouts(batch: Rollouts) -> PackedBatch:
    """Pack prompt + completion tokens of every row; ``predict_index`` follows the row-major
    order of ``batch.completion_mask``."""
    ids, positions, predict = [], [], []
    offset = 0
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
        completion = batch.completion_ids[i][batch.completion_mask[i]]
        seq = torch.cat([prompt, completion])
        ids.append(seq)
        positions.append(torch.arange(seq.numel(), device=seq.device))
        # Token j of the completion is predicted by the state at the token just before it.
        predict.append(offset + prompt.numel() - 1 + torch.arange(completion.numel(), device=seq.device))
        offset += seq.numel()
    return PackedBatch(torch.cat(ids)[None], torch.cat(positions)[None], torch.cat(predict), len(batch))
