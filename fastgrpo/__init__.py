"""fastgrpo: fused GRPO-family losses computed from hidden states, never from full logits."""

from .loss import LOSS_TYPES, GRPOLossParams, grpo_loss_from_logprobs
from .ops import FusedGRPOLoss, GRPOLossOutput, chunked_logprobs, fused_grpo_loss

__version__ = "0.1.0"

__all__ = [
    "LOSS_TYPES",
    "FusedGRPOLoss",
    "GRPOLossOutput",
    "GRPOLossParams",
    "chunked_logprobs",
    "fused_grpo_loss",
    "grpo_loss_from_logprobs",
]
