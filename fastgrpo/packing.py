"""Padding-free backbone passes: a micro-batch's sequences packed into one row.

Each sequence keeps only its real tokens; ``position_ids`` restart at 0 for every sequence, which
is how transformers recognizes packed rows: flash-attention varlen when installed, else our
``sdpa_varlen`` (one SDPA call per sequence; plain ``sdpa`` would build a dense block-diagonal
mask). Only the hidden states that predict completion tokens come back, scattered into the
(B, C, H) layout the fused loss takes, so loss semantics are unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from .generation import Rollouts


@dataclasses.dataclass
class PackedBatch:
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


def packed_completion_hidden(model, batch: Rollouts) -> torch.Tensor:
    """(B, C, H) hidden states predicting the completion tokens, from one packed backbone pass;
    zeros where ``batch.completion_mask`` is False."""
    if bool((batch.prompt_mask.sum(1) == 0).any()):
        raise ValueError("padding-free packing needs at least one prompt token per sequence")
    packed = pack_rollouts(batch)
    # No attention_mask: transformers then derives sequence boundaries from the restarting position ids.
    from .policy import backbone

    out = backbone(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    states = hidden[0, packed.predict_index]  # (M, H)
    B, C = batch.completion_ids.shape
    full = states.new_zeros(B, C, states.shape[-1])
    return full.index_put((*batch.completion_mask.nonzero(as_tuple=True),), states)
