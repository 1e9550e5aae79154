"""Test setup: without CUDA, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at
collection time. FASTGRPO_POISON makes every kernel output start as NaN, so an element a
kernel forgets to write cannot pass as leftover memory.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTGRPO_POISON", "1")


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """(model_dir, dataset_path) of the embedded task, built once per session in a private cache
    that the embedded-default code path (FASTGRPO_CACHE) also finds."""
    from fastgrpo.train.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FASTGRPO_CACHE")
    os.environ["FASTGRPO_CACHE"] = str(cache)
    model_dir, data = prepare_embedded(cache / "embedded", seed=0)
    yield str(model_dir), str(data)
    if old is None:
        os.environ.pop("FASTGRPO_CACHE")
    else:
        os.environ["FASTGRPO_CACHE"] = old
