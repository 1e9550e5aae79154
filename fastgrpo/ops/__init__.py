"""What other trainers import: the fused ops, their loss epilogue and hyper-parameters.

- ``api``: ``fused_grpo_loss``, ``chunked_logprobs``, ``FusedGRPOLoss``; checks, then dispatch
  (``IMPLS``, ``route``) to the chunked 3-GEMM path, the fused kernels or the torch twin.
- ``checks``: argument checks, each error naming its argument.
- ``loss``: ``GRPOLossParams`` and the O(N) GRPO-family epilogue on per-token log-probs.
- ``chunked``: the 3-GEMM path (``impl="chunked"``): cuBLAS GEMMs through a bounded workspace,
  row kernels in ``fastgrpo.kernels.logits_rows`` or their torch twins.
- ``twin``: the pure-PyTorch twin of the fused kernels (``impl="torch"``).
- ``reference``: the materialized float64 reference that tests and benchmarks hold both to.

Nothing here imports ``fastgrpo.train`` or ``fastgrpo.integrations``.
"""

from .api import IMPLS, ROUTES, FusedGRPOLoss, GRPOLossOutput, chunked_logprobs, fused_grpo_loss, route
from .loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, GRPOLossParams, grpo_loss_from_logprobs

__all__ = [
    "IMPLS",
    "ROUTES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "LOSS_TYPES",
    "FusedGRPOLoss",
    "GRPOLossOutput",
    "GRPOLossParams",
    "chunked_logprobs",
    "fused_grpo_loss",
    "grpo_loss_from_logprobs",
    "route",
]
