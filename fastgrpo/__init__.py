"""fastgrpo: fused GRPO-family losses computed from hidden states, never from full logits.

Three wings, one per use: ``fastgrpo.ops`` (the fused ops other trainers import, re-exported
here), ``fastgrpo.train`` (``fastgrpo train``) and ``fastgrpo.integrations`` (TRL, verl).
"""

from .ops import (
    LOSS_TYPES,
    FusedGRPOLoss,
    GRPOLossOutput,
    GRPOLossParams,
    chunked_logprobs,
    fused_grpo_loss,
    grpo_loss_from_logprobs,
)

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
