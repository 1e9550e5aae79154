"""``sdpa_varlen``: PyTorch SDPA that respects packed-sequence boundaries without a dense mask.

transformers recognizes a packed row (several sequences back to back, ``position_ids``
restarting at 0) and, with plain ``sdpa``, builds a dense block-diagonal (L, L) mask for it:
quadratic memory in the *packed* length (64K tokens -> 4 GiB of bool per layer call). Flash-attention
varlen avoids that but is an extra CUDA build. This backend instead runs one causal SDPA call per
packed sequence (flash / memory-efficient kernels, no mask), which costs sum(len_i^2) compute and
linear memory. Everything else (padded batches, generation with a KV cache, sliding windows)
goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import torch

NAME = "sdpa_varlen"


def _segments(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the packed sequences, plus the row length; one host sync per call."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return sorted({0, *starts}) + [position_ids.shape[1]]


def sdpa_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query (B, heads, T, D), key/value (B, kv_heads, S, D) -> ((B, T, heads, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] > 1
        and getattr(module, "sliding_window", None) is None
        and kwargs.get("is_causal", getattr(module, "is_causal", True))
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = _segments(position_ids)
    if len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, **kwargs)
    kwargs["is_causal"] = True
    # split, not slicing: a slice's backward scatters into a full-size zero tensor per sequence.
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    parts = [
        sdpa_attention_forward(module, q, k, v, None, dropout, scaling, **kwargs)[0]
        for q, k, v in zip(query.split(lens, 2), key.split(lens, 2), value.split(lens, 2), strict=True)
    ]
    return torch.cat(parts, dim=1), None


def _varlen_mask(*args, attention_mask=None, local_size=None, **kwargs):
    # No padding and no sliding window: causality and sequence boundaries are handled in
    # sdpa_varlen_attention, so no (L, L) mask is ever built. Anything else gets SDPA's mask.
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and local_size is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, local_size=local_size, **kwargs)


def register() -> str:
    """Make ``attn_implementation="sdpa_varlen"`` available to transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_attention)
    AttentionMaskInterface.register(NAME, _varlen_mask)
    return NAME
