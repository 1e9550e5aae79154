"""Public fused ops: ``chunked_logprobs``, ``fused_grpo_loss`` and ``FusedGRPOLoss``.

Every argument is checked here, before any kernel runs. ``impl`` picks the backend:
``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked
PyTorch, any device) or ``"auto"`` (triton on CUDA, torch elsewhere).

``grad_filter_eps`` (all three entry points) is an implementation knob, not loss semantics:
skip the backward GEMMs of vocabulary tiles whose d loss / d logits is below eps times the
token's gradient scale (Cut Cross-Entropy's gradient filtering). 0 = exact; 2**-12 suits bf16.
Only the Triton backward filters: the torch impl's dense chunk GEMMs would gain nothing from
zeroing entries, so it ignores eps and returns the exact gradient (eps bounds what *may* be
dropped; dropping nothing is within it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch

from .chunked import linear_logprobs_torch
from .loss import GRPOLossParams, grpo_loss_from_logprobs

IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. hidden, weight, bias
    logprobs: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    entropy: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    metrics: dict  # name -> detached 0-dim fp32 tensor


# ----------------------------------------------------------------------------- checks


def _check_tensor(name, x, *, dims=None, dtypes=None, integer=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    if integer and (x.dtype == torch.bool or x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def _check_same(name, x, ref_name, ref, *, shape=None, dtype=True):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def _values_checked() -> bool:
    # Value checks read data back to the host; skip them while torch.compile traces.
    return not torch.compiler.is_compiling()


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreting):
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got device {device}"
        )
    return impl


def _cast_for_autocast(hidden, weight, bias):
    """Under autocast the lm_head runs in the autocast dtype, as nn.Linear would."""
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return hidden, weight, bias


def _check_head(hidden, weight, targets, bias):
    _check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    _check_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
    _check_tensor("targets", targets, integer=True)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H), got shape {tuple(hidden.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(targets.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}) to match hidden, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    _check_same("weight", weight, "hidden", hidden)
    _check_same("targets", targets, "hidden", hidden, dtype=False)
    if bias is not None:
        _check_tensor("bias", bias, dims=(1,), dtypes=FLOAT_DTYPES)
        _check_same("bias", bias, "weight", weight, shape=(weight.shape[0],))


def _check_targets_range(targets, vocab, where=None):
    if not _values_checked() or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        t = targets[bad]
        raise ValueError(f"targets must lie in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]")


def _logprobs_impl(hidden2d, weight, bias, targets1d, active, temperature, impl, grad_filter_eps=0.0):
    if impl == "triton":
        from .kernels import linear_logprobs_triton

        return linear_logprobs_triton(hidden2d, weight, bias, targets1d, active, temperature, grad_filter_eps)
    # The torch impl ignores grad_filter_eps: exact gradients (see the module docstring).
    return linear_logprobs_torch(hidden2d, weight, bias, targets1d, active, temperature)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_grad_filter_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"grad_filter_eps must be a number, got {type(eps).__name__}")
    if not 0 <= eps < 1:  # also refuses NaN and inf
        raise ValueError(f"grad_filter_eps must be in [0, 1) (0 = exact, 2**-12 suits bf16), got {eps}")
    return float(eps)


# ----------------------------------------------------------------------------- public


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    grad_filter_eps: float = 0.0,
):
    """Per-token log p(target) from hidden states and the lm_head, without full logits.

    Args:
        hidden: (..., H) fp32/fp16/bf16 final hidden states at the positions predicting ``targets``.
        weight: (V, H) lm_head weight, same dtype and device (tied embeddings work as is).
        targets: (...) int32/int64 token ids in [0, V), shape ``hidden.shape[:-1]``.
        bias: (V,) lm_head bias or None.
        temperature: logits are divided by it before the softmax (> 0).
        return_entropy: also return the per-token entropy of the softmax.
        impl: "auto", "triton" or "torch".
        grad_filter_eps: skip the backward GEMMs of vocabulary tiles whose d loss / d logits
            is below eps times the token's gradient scale (Cut Cross-Entropy's gradient
            filtering), in [0, 1). 0 = exact; 2**-12 suits bf16. Triton only: the torch impl
            ignores it and returns exact gradients.

    Returns:
        logp (``targets.shape``, fp32), or (logp, entropy) with ``return_entropy``; both are
        differentiable w.r.t. hidden, weight and bias.
    """
    _check_temperature(temperature)
    grad_filter_eps = _check_grad_filter_eps(grad_filter_eps)
    _check_head(hidden, weight, targets, bias)
    impl = _resolve_impl(impl, hidden.device)
    _check_targets_range(targets, weight.shape[0])
    hidden, weight, bias = _cast_for_autocast(hidden, weight, bias)
    shape = targets.shape
    logp, entropy = _logprobs_impl(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(-1),
        None,
        float(temperature),
        impl,
        grad_filter_eps,
    )
    logp, entropy = logp.view(shape), entropy.view(shape)
    return (logp, entropy) if return_entropy else logp


def fused_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    impl: str = "auto",
    grad_filter_eps: float = 0.0,
) -> GRPOLossOutput:
    """GRPO-family loss straight from final hidden states and the lm_head weight.

    Semantics match TRL's ``GRPOTrainer._compute_loss`` (one process, no gradient accumulation);
    the only deliberate difference is ``luspo``, which sums masked tokens only. Masked tokens
    cost no FLOPs, and their ``logprobs``/``entropy`` are returned as 0.

    Args:
        hidden: (B, T, H) fp32/fp16/bf16 hidden states at the positions that predict ``targets``.
        weight: (V, H) lm_head weight, same dtype and device as hidden.
        targets: (B, T) int32/int64 completion token ids, in [0, V) where ``mask`` is set.
        mask: (B, T) bool, integer or float with 0/1 values: completion tokens that count.
        advantages: (B,) per sequence or (B, T) per token, float, finite.
        old_logprobs: (B, T) float log-probs of the sampling policy; None = current (ratio 1).
        ref_logprobs: (B, T) float reference-policy log-probs; required when ``beta > 0``.
        bias: (V,) lm_head bias or None.
        temperature: logits are divided by it before the softmax (> 0).
        beta: weight of the k3 KL term (>= 0).
        epsilon, epsilon_high: clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high None = epsilon.
        delta: cap on the unclipped ratio (two-sided clipping) or None.
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo" or "luspo".
        importance_sampling_level: "token", or "sequence" (GSPO: masked mean log-ratio per row).
        max_completion_length: dr_grpo's normalizer (required for dr_grpo).
        num_items_in_batch: dapo/cispo normalizer, e.g. completion tokens of the whole generation
            batch when it is split into micro-batches (default: masked tokens here).
        use_bias_correction_kl: multiply the KL by the importance ratio.
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures.
        impl: "auto", "triton" or "torch".
        grad_filter_eps: skip the backward GEMMs of vocabulary tiles whose d loss / d logits
            is below eps times the token's gradient scale (Cut Cross-Entropy's gradient
            filtering), in [0, 1). 0 = exact; 2**-12 suits bf16. Triton only: the torch impl
            ignores it and returns exact gradients.

    Returns:
        GRPOLossOutput(loss, logprobs, entropy, metrics); metrics has ``entropy``,
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``kl``
        (when ``ref_logprobs`` is given) and ``cispo_clip_ratio`` (cispo).
    """
    grad_filter_eps = _check_grad_filter_eps(grad_filter_eps)
    params = GRPOLossParams(
        beta=beta,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        delta=delta,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
        use_bias_correction_kl=use_bias_correction_kl,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
        temperature=temperature,
    )
    return _fused_grpo_loss(
        hidden,
        weight,
        targets,
        mask,
        advantages,
        old_logprobs,
        ref_logprobs,
        bias,
        params,
        num_items_in_batch,
        impl,
        grad_filter_eps,
    )


def _fused_grpo_loss(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    old_logprobs,
    ref_logprobs,
    bias,
    params,
    num_items_in_batch,
    impl,
    grad_filter_eps=0.0,
) -> GRPOLossOutput:
    _check_tensor("hidden", hidden, dims=(3,))
    _check_head(hidden, weight, targets, bias)
    B, T = targets.shape
    _check_tensor("mask", mask)
    _check_same("mask", mask, "targets", targets, shape=(B, T), dtype=False)
    _check_tensor("advantages", advantages, dims=(1, 2))
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    _check_same("advantages", advantages, "hidden", hidden, dtype=False)
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            _check_tensor(name, x)
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
            _check_same(name, x, "targets", targets, shape=(B, T), dtype=False)
    if params.beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={params.beta} > 0 needs ref_logprobs (B, T)")
    if num_items_in_batch is not None:
        n = num_items_in_batch
        if isinstance(n, bool) or not isinstance(n, (int, float, torch.Tensor)):
            raise TypeError(f"num_items_in_batch must be a number or tensor, got {type(n).__name__}")
        if isinstance(n, torch.Tensor):
            num_items_in_batch = n.to(device=hidden.device, dtype=torch.float32)
        elif not n > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {n}")
    impl = _resolve_impl(impl, hidden.device)

    active = mask != 0
    if _values_checked():
        if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 and 1")
        adv_live = advantages if advantages.dim() == 1 else advantages[active]
        if not bool(torch.isfinite(adv_live).all()):
            raise ValueError("advantages must be finite (where mask is set)")
        if isinstance(num_items_in_batch, torch.Tensor) and not bool((num_items_in_batch > 0).all()):
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    _check_targets_range(targets, weight.shape[0], where=active)

    hidden, weight, bias = _cast_for_autocast(hidden, weight, bias)
    logp, entropy = _logprobs_impl(
        hidden.reshape(B * T, hidden.shape[-1]),
        weight,
        bias,
        targets.reshape(-1),
        active.reshape(-1),
        params.temperature,
        impl,
        grad_filter_eps,
    )
    logp, entropy = logp.view(B, T), entropy.view(B, T)
    loss, metrics = grpo_loss_from_logprobs(
        logp, entropy, active, advantages, old_logprobs, ref_logprobs, params, num_items_in_batch
    )
    return GRPOLossOutput(loss, logp.detach(), entropy.detach(), metrics)


class FusedGRPOLoss(torch.nn.Module):
    """``fused_grpo_loss`` with its hyper-parameters held by the module.

    Keyword arguments are those of ``fused_grpo_loss`` after ``advantages`` (less the tensors).
    ``impl`` and ``grad_filter_eps`` (implementation knobs, not loss semantics) are kept on the
    module; the loss hyper-parameters go into ``self.params``.
    """

    def __init__(self, *, impl: str = "auto", grad_filter_eps: float = 0.0, **hyper):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.grad_filter_eps = _check_grad_filter_eps(grad_filter_eps)
        unknown = set(hyper) - {f.name for f in dataclasses.fields(GRPOLossParams)}
        if unknown:
            valid = sorted(f.name for f in dataclasses.fields(GRPOLossParams))
            raise TypeError(f"unknown FusedGRPOLoss arguments {sorted(unknown)}; valid: {valid}")
        self.params = GRPOLossParams(**hyper)
        self.impl = impl

    def forward(
        self,
        hidden,
        weight,
        targets,
        mask,
        advantages,
        old_logprobs=None,
        ref_logprobs=None,
        bias=None,
        num_items_in_batch=None,
    ) -> GRPOLossOutput:
        return _fused_grpo_loss(
            hidden,
            weight,
            targets,
            mask,
            advantages,
            old_logprobs,
            ref_logprobs,
            bias,
            self.params,
            num_items_in_batch,
            self.impl,
            self.grad_filter_eps,
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}, grad_filter_eps={self.grad_filter_eps}, {self.params}"
