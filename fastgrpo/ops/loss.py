"""GRPO-family loss on per-token log-probs: the O(N) epilogue shared by every implementation.

Semantics follow TRL's ``GRPOTrainer._compute_loss`` (one process, no gradient accumulation,
``steps_per_generation=1``). Masked positions are removed with ``torch.where`` at the source,
so padding values (NaN, -inf log-probs) never reach the loss or its gradient.
"""

from __future__ import annotations

import dataclasses
import math

import torch

# loss_type -> aggregation of the (B, T) per-token loss
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOLossParams:
    """Hyper-parameters of the GRPO loss family (names as in TRL's ``GRPOConfig``)."""

    beta: float = 0.0  # weight of the k3 KL to the reference policy; 0 disables it
    epsilon: float = 0.2  # lower clip: ratios below 1 - epsilon are clipped
    epsilon_high: float | None = None  # upper clip 1 + epsilon_high (DAPO clip-higher); None = epsilon
    delta: float | None = None  # two-sided clipping: cap on the unclipped ratio; None = off
    loss_type: str = "dapo"  # one of LOSS_TYPES
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    max_completion_length: int | None = None  # dr_grpo's constant normalizer per row
    use_bias_correction_kl: bool = False  # multiply the k3 KL by the importance ratio
    sapo_temperature_pos: float = 1.0  # SAPO gate temperature where the advantage is > 0
    sapo_temperature_neg: float = 1.05  # SAPO gate temperature elsewhere
    temperature: float = 1.0  # logits are divided by this before the softmax

    def __post_init__(self):
        # Plain Python floats: a numpy or 0-dim fp64 tensor here would promote the loss to fp64.
        for name in (
            "beta",
            "epsilon",
            "epsilon_high",
            "delta",
            "sapo_temperature_pos",
            "sapo_temperature_neg",
            "temperature",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                and not (isinstance(value, torch.Tensor) and value.numel() == 1)
            ):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        for name in ("beta", "epsilon", "epsilon_high"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg", "delta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.loss_type == "dr_grpo":
            mcl = self.max_completion_length
            if mcl is None or isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0:
                raise ValueError(f"loss_type='dr_grpo' needs max_completion_length > 0, got {mcl!r}")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def token_terms(
    logp: torch.Tensor,
    log_ratio: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    params: GRPOLossParams,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token loss before masking and aggregation: the formulas every path shares.

    With a token-level ``log_ratio`` each token's loss depends on its own ``logp`` only, which is
    what lets the chunked path form d loss / d logp as soon as a chunk's log-probs exist.

    Args:
        logp: (B, T) or (N,) fp32 log p(target), differentiable.
        log_ratio: log(pi / pi_old), token level (logp's shape) or sequence level (B, 1); 0 where masked.
        ref_logprobs: reference log-probs of logp's shape, or None.
        adv: advantages broadcastable to logp (fp32).
        mask: bool of logp's shape: tokens that count.
        params: the loss hyper-parameters.
        is_ratio: importance-sampling correction broadcastable to logp (fp32, 0 where masked) or
            None; it scales the policy term, not the KL (TRL's vLLM correction).

    Returns:
        (per_token, ratio, kl): the loss terms; the ratio TRL's clip metrics see (after ``delta``);
        the k3 KL (None without ``ref_logprobs``).
    """
    p = params
    ratio = torch.exp(log_ratio)
    if p.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=p.upper).detach() * adv * logp
    elif p.loss_type == "sapo":
        tau = torch.where(adv > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
        per_token = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv
    else:
        clipped = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.upper)
        if p.delta is not None:
            ratio = torch.clamp(ratio, max=p.delta)  # TRL's clip metrics see this capped ratio
        per_token = -torch.minimum(ratio * adv, clipped * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio

    kl = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.to(torch.float32) - logp, 0.0)
        kl = torch.exp(d) - d - 1
        if p.use_bias_correction_kl:
            kl = kl * torch.exp(log_ratio)
        if p.beta != 0.0:
            per_token = per_token + p.beta * kl
    return per_token, ratio, kl


def token_weights(
    mask: torch.Tensor, params: GRPOLossParams, num_items_in_batch: float | torch.Tensor | None = None
) -> torch.Tensor:
    """(B, T) fp32 weights with loss = sum(weights * per_token) for token-level importance sampling.

    They depend on the mask only, so they are known before any log-prob: the chunked path turns
    them into d loss / d logp chunk by chunk. ``grpo_loss_from_logprobs`` aggregates the same
    normalizers its own way (TRL's order of operations); tests hold the two equal.
    """
    mf = mask.to(torch.float32)
    rows = mask.shape[0]
    t = params.loss_type
    if t in ("grpo", "sapo"):
        return mf / (rows * mf.sum(-1, keepdim=True).clamp(min=1.0))
    if t == "bnpo":
        return mf / mf.sum().clamp(min=1.0)
    if t == "dr_grpo":
        return mf / (rows * params.max_completion_length)
    if t in ("dapo", "cispo"):
        return mf / (mf.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch)
    return mf / rows  # luspo


def sampling_correction(ratio: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor | None:
    """(B, T) fp32 correction, 0 where masked (a NaN the sampler left on padding never leaks)."""
    if ratio is None:
        return None
    return torch.where(mask, ratio.to(torch.float32).expand(mask.shape), 0.0)


def grpo_loss_from_logprobs(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    params: GRPOLossParams,
    num_items_in_batch: float | torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregate GRPO loss and metrics from per-token log-probs.

    Args:
        logp: (B, T) fp32 log p(target), differentiable.
        entropy: (B, T) fp32 per-token entropy (metrics only).
        mask: (B, T) bool, True on completion tokens that count.
        advantages: (B,) or (B, T) float.
        old_logprobs: (B, T) float or None (None: ratio 1, gradient still flows).
        ref_logprobs: (B, T) float or None; required when ``params.beta > 0``.
        params: the loss hyper-parameters.
        num_items_in_batch: dapo/cispo normalizer (default: number of masked-in tokens).
        importance_sampling_ratio: (B, T) or (B, 1) float or None: a per-token (or per-row)
            correction multiplying the policy term, e.g. the truncated pi_old / pi_sampler ratio.

    Returns:
        (loss, metrics): 0-dim loss; metrics are detached 0-dim fp32 tensors.
    """
    p = params
    m = mask
    mf = m.to(torch.float32)
    tokens = mf.sum()
    adv = advantages.to(torch.float32)
    adv = adv[:, None] if adv.dim() == 1 else torch.where(m, adv, 0.0)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(torch.float32)
    log_ratio = torch.where(m, logp - old, 0.0)
    if p.importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0)
    isr = sampling_correction(importance_sampling_ratio, m)
    per_token, ratio, kl = token_terms(logp, log_ratio, ref_logprobs, adv, m, p, isr)

    per_token = torch.where(m, per_token.expand_as(logp), 0.0)
    rows = m.shape[0]
    if p.loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(-1) / mf.sum(-1).clamp(min=1.0)).mean()
    elif p.loss_type == "bnpo":
        loss = per_token.sum() / tokens.clamp(min=1.0)
    elif p.loss_type == "dr_grpo":
        loss = per_token.sum() / (rows * p.max_completion_length)
    elif p.loss_type in ("dapo", "cispo"):
        norm = tokens.clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / norm
    else:  # luspo: each row's loss weighted by its length
        loss = per_token.sum(-1).mean()

    with torch.no_grad():
        count = tokens.clamp(min=1.0)

        def batch_mean(x: torch.Tensor) -> torch.Tensor:
            # TRL: sequence-level tensors (B, 1) average over rows, token-level over masked tokens.
            x = x.to(torch.float32)
            return x.mean() if x.shape[1] == 1 else torch.where(m, x, 0.0).sum() / count

        metrics = {"entropy": batch_mean(entropy)}
        if kl is not None:
            metrics["kl"] = batch_mean(kl)
        low = (ratio < 1 - p.epsilon_low) & (adv < 0)
        high = (ratio > 1 + p.upper) & (adv > 0)
        metrics["clip_ratio/low_mean"] = batch_mean(low)
        metrics["clip_ratio/high_mean"] = batch_mean(high)
        metrics["clip_ratio/region_mean"] = batch_mean(low | high)
        if p.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = batch_mean((ratio > p.upper) & (adv > 0))
    return loss, metrics
