"""Gradient checkpointing whose saved layer inputs live in host memory.

With checkpointing, each decoder layer keeps only its input hidden state, (B, T, H), from the
forward to the backward; at long sequence lengths those per-layer inputs are most of what is
left of activation memory. ``enable_gradient_checkpointing(model, offload=True)`` keeps them
in pinned host memory instead. The device-to-host copy runs on a side CUDA stream, so it
overlaps the next layers' compute; in the backward, the copy back of the layer that is needed
next (the one before, as backward runs layers in reverse) starts while the current layer is
recomputed.

Like reentrant ``torch.utils.checkpoint``, parameter gradients are accumulated by a nested
backward, so use ``loss.backward()``; ``torch.autograd.grad(loss, params)`` does not see them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class OffloadStats:
    """Counters since the last ``reset()``; for tests and logging."""

    tensors: int = 0  # layer inputs copied to host
    bytes: int = 0  # their total size
    reloads: int = 0  # host copies brought back to the device for a recompute
    prefetched: int = 0  # of those, the ones whose copy back was started by the layer after

    def reset(self) -> None:
        self.tensors = self.bytes = self.reloads = self.prefetched = 0


offload_stats = OffloadStats()

_side_streams: dict[int, Any] = {}
# The entry saved last, weakly: the next one links to it, so a backward can find the layer it
# will need next. Weak references keep entries from outliving their autograd graphs.
_last: weakref.ref | None = None


def _side_stream(device: torch.device):
    if device.index not in _side_streams:
        _side_streams[device.index] = torch.cuda.Stream(device)
    return _side_streams[device.index]


class _Saved:
    """One layer input held in host memory, and its way back to ``device``."""

    def __init__(self, hidden: torch.Tensor, prev: weakref.ref | None):
        self.device = hidden.device
        self.prev = prev
        self.used = False
        self.device_copy: torch.Tensor | None = None
        self.ready = None  # CUDA event: device_copy is written
        if hidden.is_cuda:
            stream = _side_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is computed
            with torch.cuda.stream(stream):
                self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                self.host.copy_(hidden, non_blocking=True)
            # Without this the caching allocator may give hidden's memory to the next layer while
            # the copy still reads it. The copy back is queued on the same stream, so it needs no
            # event to wait for this one.
            hidden.record_stream(stream)
        else:  # no streams to overlap with: a plain copy, which also makes the path testable on CPU
            self.host = hidden.detach().to("cpu", copy=True)
        offload_stats.tensors += 1
        offload_stats.bytes += self.host.numel() * self.host.element_size()

    def fetch(self) -> None:
        """Start the copy back to the device; a no-op when already started."""
        if self.device_copy is not None:
            return
        if self.device.type == "cuda":
            stream = _side_stream(self.device)
            with torch.cuda.stream(stream):
                self.device_copy = self.host.to(self.device, non_blocking=True)
                self.ready = stream.record_event()
        else:
            self.device_copy = self.host.to(self.device)

    def take(self) -> torch.Tensor:
        """The layer input on its device, usable on the current stream."""
        offload_stats.reloads += 1
        offload_stats.prefetched += self.device_copy is not None
        self.fetch()
        x, self.device_copy, self.used = self.device_copy, None, True
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            x.record_stream(current)  # allocated on the side stream, freed after use on this one
            self.ready = None
        return x


def _autocast_state(device: torch.device) -> list[tuple[str, bool, torch.dtype]]:
    types = {"cpu", device.type}
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(types)]


@contextlib.contextmanager
def _replay(ctx):
    """RNG and autocast as they were in the forward, so the recompute draws the same dropout
    masks and runs in the same dtypes; the caller's RNG is left untouched."""
    cuda = ctx.device.type == "cuda"
    with torch.random.fork_rng(devices=[ctx.device.index] if cuda else []), contextlib.ExitStack() as stack:
        torch.set_rng_state(ctx.cpu_rng)
        if cuda:
            torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
        for device_type, enabled, dtype in ctx.autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=ctx.cache))
        yield


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, dummy, hidden, *rest):
        global _last
        # Grad mode is off inside Function.forward: the layer keeps no activations.
        ctx.fn = fn
        ctx.device = hidden.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = _autocast_state(hidden.device)
        ctx.cache = torch.is_autocast_cache_enabled()
        ctx.set_materialize_grads(False)
        ctx.entry = _Saved(hidden, _last)
        _last = weakref.ref(ctx.entry)
        ctx.tensor_at = [i for i, r in enumerate(rest) if isinstance(r, torch.Tensor)]
        ctx.rest = [None if isinstance(r, torch.Tensor) else r for r in rest]
        ctx.save_for_backward(*(rest[i] for i in ctx.tensor_at))  # kept as they are: small or shared
        return fn(hidden, *rest)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.entry.take()
        prev = ctx.entry.prev() if ctx.entry.prev is not None else None
        if prev is not None and not prev.used:
            prev.fetch()  # overlaps this layer's recompute and backward
        needs = ctx.needs_input_grad
        hidden = hidden.detach().requires_grad_(needs[2])
        rest = list(ctx.rest)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors, strict=True):
            rest[i] = t.detach().requires_grad_(needs[3 + i])
        with _replay(ctx), torch.enable_grad():
            out = ctx.fn(hidden, *rest)
        outs = out if isinstance(out, tuple) else (out,)
        # Only outputs in the graph that the loss used; grads of the others are None (not materialized).
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        pairs = [(o, g) for o, g in pairs if isinstance(o, torch.Tensor) and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        rest_grads = [r.grad if isinstance(r, torch.Tensor) and r.requires_grad else None for r in rest]
        return None, None, hidden.grad if needs[2] else None, *rest_grads


def _owner(fn: Callable) -> nn.Module | None:
    """The layer behind ``fn``: transformers 5 passes ``partial(forward, layer, **kw)``, older
    versions ``layer.__call__``."""
    while isinstance(fn, functools.partial):
        if fn.args and isinstance(fn.args[0], nn.Module):
            return fn.args[0]
        fn = fn.func
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def offloaded_checkpoint(fn: Callable, hidden: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
    """``fn(hidden, *rest, **kwargs)`` with only ``hidden`` kept for the backward, in host memory.

    ``hidden``: (B, T, H) floating tensor on the model's device, the layer input. ``rest``: any
    further positional arguments, kept as they are. Returns what ``fn`` returns: a tensor or a
    tuple (non-tensor items pass through). Gradients reach ``hidden``, tensors in ``rest`` and
    parameters used by ``fn``, not tensors bound inside ``fn`` (e.g. keyword arguments of a
    ``partial``), as with reentrant ``torch.utils.checkpoint``.
    """
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    if not torch.is_grad_enabled():  # no graph: nothing to save, so nothing to offload
        return fn(hidden, *rest)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"offloaded_checkpoint needs a tensor first argument, got {type(hidden).__name__}")
    dummy = None
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (hidden, *rest)):
        layer = _owner(fn)
        if layer is not None and not any(p.requires_grad for p in layer.parameters()):
            return fn(hidden, *rest)  # frozen layer on a constant input: autograd keeps nothing anyway
        # A Function's outputs require grad only if an input does. Layer 0 of a LoRA model gets a
        # constant input from the frozen embedding, yet its adapters need gradients.
        dummy = torch.empty(0, requires_grad=True)
    return _OffloadedCheckpoint.apply(fn, dummy, hidden, *rest)


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Turn on non-reentrant gradient checkpointing of every decoder layer and disable the KV
    cache. ``model``: a transformers causal LM, possibly wrapped by peft. With ``offload``, the
    layers use :func:`offloaded_checkpoint` instead, keeping only their inputs, on the host.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False
    if offload:
        # Every module transformers gave a checkpoint function; only the checkpointed layers call it.
        modules = [m for m in base.modules() if "_gradient_checkpointing_func" in vars(m)]
        if not modules:
            raise RuntimeError(f"{type(base).__name__}: no layer took a gradient checkpointing function")
        for m in modules:
            m._gradient_checkpointing_func = offloaded_checkpoint
