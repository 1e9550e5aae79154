"""Triton kernels of fastgrpo, installed as ``fastgrpo.kernels``.

Importing this package imports triton; ``TRITON_INTERPRET=1`` must be set before that to
run the kernels on CPU tensors through the Triton interpreter.
"""

from ._debug import poison_outputs
from .linear_logprobs import linear_logprobs_triton

__all__ = ["linear_logprobs_triton", "poison_outputs"]
