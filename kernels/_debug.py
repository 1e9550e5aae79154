"""Output poisoning for tests: every launcher allocates its kernel outputs here.

With poisoning on, outputs start as NaN, so an element a kernel forgets to write shows up
as NaN in the result instead of as plausible leftover memory.
"""

import contextlib
import os

import torch

_poison = os.environ.get("FASTGRPO_POISON", "0") == "1"


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill kernel outputs with NaN before launch while the context is active."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def alloc_output(shape, device, dtype=torch.float32) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)
