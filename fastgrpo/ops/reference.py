"""Naive materialized reference: full logits, log_softmax, gather, then the loss as TRL writes it.

This is the yardstick for tests (in float64) and the "naive PyTorch" row of the benchmarks (in
the input dtype). It shares no code with the fused path on purpose: a bug in one is caught by
the other. It builds the whole (B, T, V) logits tensor, so keep it to small shapes on CPU.
"""

from __future__ import annotations

import math

import torch

from .loss import GRPOLossParams


def reference_logprobs(
    hidden, weight, targets, bias=None, temperature=1.0, compute_dtype=None, with_entropy=True, logit_scale=1.0,
    final_logit_softcapping=None,
):  # fmt: skip
    """log p(target) and entropy through materialized logits, with the model's head transform as transformers
    writes it (Cohere's scale, Gemma 2's softcap), then the temperature as TRL applies it.

    Args:
        hidden: (..., H); weight: (V, H); targets: (...) integer; bias: (V,) or None.
        compute_dtype: dtype of the matmul and softmax (default: hidden's dtype; logits are
            upcast to fp32 for the softmax unless this is float64).
        with_entropy: False skips the entropy (one less (..., V) temporary), returned as None.
        logit_scale, final_logit_softcapping: logits * logit_scale; then cap * tanh(logits / cap) (None: none).

    Returns:
        (logp, entropy) with ``targets.shape``, float32 (float64 if ``compute_dtype`` is).
    """
    dt = compute_dtype or hidden.dtype
    logits = hidden.to(dt) @ weight.to(dt).T
    if bias is not None:
        logits = logits + bias.to(dt)
    logits = logits.to(torch.float64 if dt == torch.float64 else torch.float32) * logit_scale
    if final_logit_softcapping is not None:
        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    logits = logits / temperature
    logprobs = logits.log_softmax(-1)
    logp = logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, None
    # A -inf logit (a banned token) has p = 0: count p * log p as 0 there, gradient included.
    finite = torch.where(torch.isfinite(logprobs), logprobs, 0.0)
    entropy = -(logprobs.exp() * finite).sum(-1)
    return logp, entropy


def reference_grpo_loss(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    *,
    old_logprobs=None,
    ref_logprobs=None,
    bias=None,
    params: GRPOLossParams | None = None,
    num_items_in_batch=None,
    compute_dtype=None,
    importance_sampling_ratio=None,
    sampling_logprobs=None,
    entropy_mask=None,
):
    """TRL ``_compute_loss`` transcribed (one process, no accumulation), logits materialized.

    Shapes as in ``fastgrpo.fused_grpo_loss``. Returns (loss, logp, entropy, metrics).
    ``luspo`` sums masked tokens per row, as TRL 1.16 does (1.1x multiplied the unmasked
    per-token loss by the row length, which counted padding once the KL term was on).
    """
    p = GRPOLossParams() if params is None else params
    per_token_logps, entropies = reference_logprobs(
        hidden, weight, targets, bias, p.temperature, compute_dtype, True, p.logit_scale, p.final_logit_softcapping
    )
    f = per_token_logps.dtype
    mask = mask.to(f)
    advantages = advantages.to(f)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_logprobs is None else old_logprobs.to(f)
    coef_1 = _importance_weights(per_token_logps - old, mask, p.importance_sampling_level)
    per_token_kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.to(f)
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        if p.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    # The policy term returns the ratio its clip metrics see: PPO's is capped by ``delta``.
    phi_seq = None
    if p.loss_type == "vespo":
        phi_seq = _gamma_weights(advantages, per_token_logps - old, mask, importance_sampling_ratio, p)
        importance_sampling_ratio = None  # TRL: VESPO's weight takes the correction in; it does not multiply
        per_token_loss = -phi_seq * advantages * per_token_logps
    else:
        per_token_loss, coef_1 = _policy_term(coef_1, advantages, per_token_logps, p)
    if p.off_policy_mask_threshold is not None:
        sampling = old if sampling_logprobs is None else sampling_logprobs.to(f)
        per_token_loss = per_token_loss * _off_policy_mask(advantages, per_token_logps, sampling, mask, p)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask.to(f)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio.to(f)
    if p.beta != 0.0:
        per_token_loss = per_token_loss + p.beta * per_token_kl
    loss = _aggregate(per_token_loss, mask, p, num_items_in_batch)
    with torch.no_grad():
        metrics = _metrics(entropies, per_token_kl, coef_1, advantages, mask, p)
        if phi_seq is not None:
            metrics["vespo/phi_seq_mean"] = (
                phi_seq.mean() if phi_seq.shape[1] == 1 else (phi_seq * mask).sum() / (mask.sum().clamp(min=1.0))
            )
    if p.entropy_coef != 0.0:  # TRL's entropy bonus: a token mean over the effective mask, for every loss type
        metrics["policy_loss"] = loss.detach()
        effective_mask = mask if entropy_mask is None else mask * entropy_mask.to(f)
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        loss = loss - p.entropy_coef * entropy_loss
    return loss, per_token_logps, entropies, metrics


def _off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, p):
    """TRL's ``get_off_policy_mask``: keep a row with advantage >= 0 or mean forward KL <= the threshold."""
    kl_div = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
    avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg_seq_kl <= p.off_policy_mask_threshold)).to(mask.dtype)


@torch.no_grad()
def _gamma_weights(advantages, log_ratio_per_token, mask, importance_sampling_ratio, p):
    """TRL's ``get_gamma_weights`` (VESPO): phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio, in log
    space. The sampling correction's logs are summed over the loss tokens (TRL sums every position; its ratio is 1
    on padding) or taken as they are for a (B, 1) correction."""
    floor = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio_per_token, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), floor, 20.0)
        if log_is_ratio.shape[1] != 1:
            log_is_ratio = torch.sum(log_is_ratio * mask, dim=-1, keepdim=True)
        seq_log_ratio = seq_log_ratio + log_is_ratio
    log_w_seq = torch.clamp(seq_log_ratio, floor, 20.0)
    is_nonneg_adv = advantages >= 0
    k_seq = torch.where(is_nonneg_adv, p.vespo_k_pos, p.vespo_k_neg)
    lambda_seq = torch.where(is_nonneg_adv, p.vespo_lambda_pos, p.vespo_lambda_neg).clamp(min=1e-4)
    log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * torch.exp(log_w_seq)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _importance_weights(log_ratio, mask, level):
    """TRL's ``coef_1``: exp of the per-token log-ratio, or of its masked row mean (GSPO) as (B, 1)."""
    if level == "token":
        return torch.exp(log_ratio)
    log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return torch.exp(log_importance_weights.unsqueeze(-1))


def _policy_term(coef_1, advantages, per_token_logps, p):
    """(per-token policy loss, the ratio after ``delta``'s cap), TRL's branches transcribed."""
    f = per_token_logps.dtype
    if p.loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=p.epsilon_high_resolved).detach()
        return -clamped_ratios * advantages * per_token_logps, coef_1
    if p.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, p.sapo_temperature_pos, p.sapo_temperature_neg).to(f)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        return -soft_coef_1 * advantages, coef_1
    coef_2 = torch.clamp(coef_1, 1 - p.epsilon_low, 1 + p.epsilon_high_resolved)
    if p.delta is not None:
        coef_1 = torch.clamp(coef_1, max=p.delta)
    return -torch.min(coef_1 * advantages, coef_2 * advantages), coef_1


def _aggregate(per_token_loss, mask, p, num_items_in_batch):
    """The loss from the per-token losses, each type's normalizer written out as TRL does."""
    if p.loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if p.loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if p.loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * p.max_completion_length)
    if p.loss_type in ("cispo", "dapo", "vespo"):
        norm = mask.sum().clamp(min=1.0) if num_items_in_batch is None else num_items_in_batch
        return (per_token_loss * mask).sum() / norm
    return (per_token_loss * mask).sum(-1).mean()


def _metrics(entropies, per_token_kl, coef_1, advantages, mask, p):
    """TRL's logged means (call under no_grad): sequence-level (B, 1) tensors over rows, the rest over tokens."""
    f = mask.dtype
    count = mask.sum().clamp(min=1.0)

    def masked_batch_mean(x):
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / count

    metrics = {"entropy": masked_batch_mean(entropies)}
    if per_token_kl is not None:
        metrics["kl"] = masked_batch_mean(per_token_kl)
    is_low = (coef_1 < 1 - p.epsilon_low) & (advantages < 0)
    is_high = (coef_1 > 1 + p.epsilon_high_resolved) & (advantages > 0)
    metrics["clip_ratio/low_mean"] = masked_batch_mean(is_low.to(f))
    metrics["clip_ratio/high_mean"] = masked_batch_mean(is_high.to(f))
    metrics["clip_ratio/region_mean"] = masked_batch_mean((is_low | is_high).to(f))
    if p.loss_type == "cispo":
        capped = (coef_1 > p.epsilon_high_resolved) & (advantages > 0)
        metrics["cispo_clip_ratio"] = masked_batch_mean(capped.to(f))
    return metrics
