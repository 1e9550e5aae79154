"""``LossTensors``: the tensors of one loss call, in a module of its own so that ``api`` (which builds
the record) and ``chunked`` (which ``api`` imports, and which reads it) can both import it."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossTensors(NamedTuple):
    """The tensors of one loss call, as ``fused_grpo_loss`` documents them; the optional ones may be None."""

    hidden: torch.Tensor  # (B, T, H)
    weight: torch.Tensor  # (V, H)
    targets: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B,) or (B, T)
    old_logprobs: torch.Tensor | None = None  # (B, T)
    ref_logprobs: torch.Tensor | None = None  # (B, T)
    bias: torch.Tensor | None = None  # (V,)
    importance_sampling_ratio: torch.Tensor | None = None  # (B, T) or (B, 1)
    sampling_logprobs: torch.Tensor | None = None  # (B, T)
    entropy_mask: torch.Tensor | None = None  # (B, T)
