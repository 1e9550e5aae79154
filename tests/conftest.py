"""Test setup: without CUDA, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time. FASTGRPO_POISON makes every kernel output start as NaN, so an element a
kernel forgets to write cannot pass as leftover memory.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTGRPO_POISON", "1")
