"""What other trainers import: the fused ops, their loss epilogue and hyper-parameters.

- ``api``: ``fused_grpo_loss``, ``chunked_logprobs``, ``FusedGRPOLoss``, ``masked_entropy``; checks, then dispatch
  (``IMPLS``, ``route``) to the chunked 3-GEMM path, the fused kernels or the torch twin.
- ``checks``: argument checks, each error naming its argument; ``head_transform`` (a model's logit scale and
  softcap, as the loss's head fields).
- ``loss``: ``GRPOLossParams``, the loss family's registry (``LOSS_SPECS``: each type's policy term,
  normalizer and micro-batch scaling) and the O(N) epilogue on per-token log-probs.
- ``chunked``: the 3-GEMM path (``impl="chunked"``): cuBLAS GEMMs through a bounded workspace,
  row kernels in ``fastgrpo.kernels.logits_rows`` or their torch twins.
- ``twin``: the pure-PyTorch twin of the fused kernels (``impl="torch"``).
- ``tensors``: ``LossTensors``, the tensors of one loss call (built by ``api``, read by ``chunked``).
- ``reference``: the materialized float64 reference that tests and benchmarks hold both to.

Nothing here imports ``fastgrpo.train`` or ``fastgrpo.integrations``.
"""

from .api import IMPLS, ROUTES, FusedGRPOLoss, GRPOLossOutput, chunked_logprobs, fused_grpo_loss, masked_entropy, route
from .checks import head_transform
from .loss import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_SPECS,
    LOSS_TYPES,
    GRPOLossParams,
    LossSpec,
    grpo_loss_from_logprobs,
    loss_spec,
)

__all__ = [
    "IMPLS",
    "ROUTES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_SPECS",
    "LOSS_TYPES",
    "LossSpec",
    "FusedGRPOLoss",
    "GRPOLossOutput",
    "GRPOLossParams",
    "chunked_logprobs",
    "fused_grpo_loss",
    "grpo_loss_from_logprobs",
    "head_transform",
    "loss_spec",
    "masked_entropy",
    "route",
]
