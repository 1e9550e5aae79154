"""Sampling completions behind one interface, ``Generator`` (``base``), chosen by the config field
``generation_backend``:

- ``hf`` (``hf.py``): transformers' padded ``generate``, a dense KV cache per call.
- ``continuous`` (``continuous.py``): transformers' continuous batching, a paged KV cache, requests
  finishing independently, the sampler's log-probs returned.
- ``vllm`` (``vllm.py``, ``pip install fastgrpo[vllm]``): vLLM colocated in the training process,
  asleep during the update, weights pushed after every optimizer step.

``auto`` is ``continuous`` on CUDA and ``hf`` on CPU (measured faster there; benchmarks/NOTES.md).
"""

from __future__ import annotations

import importlib.util

import torch

from ..config import GENERATION_BACKENDS
from .base import Generator, SamplingParams, completion_mask_and_truncation, eos_and_pad, tokenize_prompts
from .hf import HFGenerator

__all__ = [
    "GENERATION_BACKENDS",
    "Generator",
    "HFGenerator",
    "SamplingParams",
    "build_generator",
    "check_backend",
    "completion_mask_and_truncation",
    "eos_and_pad",
    "resolve_backend",
    "tokenize_prompts",
]


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend ``generation_backend=name`` runs on ``device``."""
    if name not in GENERATION_BACKENDS:
        raise ValueError(f"generation_backend must be one of {'/'.join(GENERATION_BACKENDS)}, got {name!r}")
    if name == "auto":
        return "continuous" if device.type == "cuda" else "hf"
    return name


def check_backend(name: str, device: torch.device) -> str:
    """Resolve and check that the backend can run here, before any model loads; returns its name."""
    backend = resolve_backend(name, device)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "generation_backend='vllm' needs vLLM: pip install 'fastgrpo[vllm]' (CUDA only); "
                "or use generation_backend='continuous'"
            )
        if device.type != "cuda":
            raise ValueError(f"generation_backend='vllm' needs a CUDA device, got device {str(device)!r}")
    return backend


def build_generator(backend: str, model, tokenizer, cfg) -> Generator:
    """The ``Generator`` for a resolved ``backend`` over the training ``model``; ``cfg`` is the run's
    ``Config``."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, cfg.max_prompt_length)
    if backend == "continuous":
        from .continuous import ContinuousGenerator

        return ContinuousGenerator(model, tokenizer, cfg.max_prompt_length)
    if backend == "vllm":
        from .vllm import VLLMGenerator

        return VLLMGenerator(model, tokenizer, cfg)
    raise ValueError(f"unknown resolved generation backend {backend!r}")
