"""Public fused ops: ``chunked_logprobs``, ``fused_grpo_loss`` and ``FusedGRPOLoss``.

Every argument is checked (``checks``) before any kernel runs. ``impl`` picks the backend:
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

from . import checks as C
from .chunked import linear_logprobs_torch
from .loss import GRPOLossParams, grpo_loss_from_logprobs

IMPLS = ("auto", "triton", "torch")


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. hidden, weight, bias
    logprobs: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    entropy: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    metrics: dict  # name -> detached 0-dim fp32 tensor


# ----------------------------------------------------------------------------- dispatch


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


def _logprobs_impl(hidden2d, weight, bias, targets1d, active, temperature, impl, grad_filter_eps=0.0):
    if impl == "triton":
        from ..kernels import linear_logprobs_triton

        return linear_logprobs_triton(hidden2d, weight, bias, targets1d, active, temperature, grad_filter_eps)
    # The torch impl ignores grad_filter_eps: exact gradients (see the module docstring).
    return linear_logprobs_torch(hidden2d, weight, bias, targets1d, active, temperature)


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
    C.check_temperature(temperature)
    grad_filter_eps = C.check_grad_filter_eps(grad_filter_eps)
    C.check_head(hidden, weight, targets, bias)
    impl = _resolve_impl(impl, hidden.device)
    C.check_targets_range(targets, weight.shape[0])
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
    grad_filter_eps = C.check_grad_filter_eps(grad_filter_eps)
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
    num_items_in_batch = C.check_loss_inputs(
        hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias, params.beta, num_items_in_batch
    )
    B, T = targets.shape
    impl = _resolve_impl(impl, hidden.device)
    active = mask != 0
    C.check_loss_values(mask, active, advantages, num_items_in_batch)
    C.check_targets_range(targets, weight.shape[0], where=active)

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
        self.grad_filter_eps = C.check_grad_filter_eps(grad_filter_eps)
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
