"""GRPO-family loss on per-token log-probs: the O(N) epilogue shared by every implementation.

Semantics follow TRL's ``GRPOTrainer._compute_loss`` (one process, no gradient accumulation,
``steps_per_generation=1``). Masked positions are removed with ``torch.where`` at the source,
so padding values (NaN, -inf log-probs) never reach the loss or its gradient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

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
    # Off-policy sequence masking (DeepSeek-V3.2, TRL's OPSM): drop the policy term of a sequence whose advantage
    # is negative and whose mean log(pi_sampling / pi) exceeds this; None = off.
    off_policy_mask_threshold: float | None = None
    # Entropy bonus: the loss minus this times the mean entropy over the loss tokens (those ``entropy_mask`` keeps),
    # whatever the loss type's normalizer (TRL's documented objective); 0 = off, < 0 penalizes entropy.
    entropy_coef: float = 0.0
    # VESPO's gamma weight phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio w, (k, lambda) by the
    # advantage's sign (TRL's names and defaults).
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # The model's head, not the trainer's config (``from_config`` leaves them at their defaults; ``head_transform``
    # reads them from a model): logits = logit_scale * (h @ W^T + b) (Cohere's logit_scale, 1 / Granite's
    # logits_scaling), then final_logit_softcapping * tanh(logits / final_logit_softcapping) (Gemma 2 and 3).
    logit_scale: float = dataclasses.field(default=1.0, metadata={"from_model": True})
    final_logit_softcapping: float | None = dataclasses.field(default=None, metadata={"from_model": True})

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
            "off_policy_mask_threshold",
            "entropy_coef",
            "vespo_k_pos",
            "vespo_lambda_pos",
            "vespo_k_neg",
            "vespo_lambda_neg",
            "logit_scale",
            "final_logit_softcapping",
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
        spec = loss_spec(self.loss_type)
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        for name in ("beta", "epsilon", "epsilon_high"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "sapo_temperature_pos", "sapo_temperature_neg", "logit_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.final_logit_softcapping is not None and self.final_logit_softcapping <= 0:
            raise ValueError(f"final_logit_softcapping must be > 0 or None, got {self.final_logit_softcapping}")
        # A cap at or below 1 would clip every ratio above 1, even inside the clip region.
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta must be > 1 or None, got {self.delta}")
        if spec.normalizer.needs_max_completion_length:
            mcl = self.max_completion_length
            if mcl is None or isinstance(mcl, bool) or not isinstance(mcl, int) or mcl <= 0:
                raise ValueError(f"loss_type={self.loss_type!r} needs max_completion_length > 0, got {mcl!r}")

    @classmethod
    def from_config(cls, config) -> GRPOLossParams:
        """The loss settings of any config that uses TRL's field names: ``fastgrpo train``'s ``Config``
        or TRL's ``GRPOConfig`` (each field read by its name, the model's head fields left at their defaults),
        checked as here."""
        fields = (f for f in dataclasses.fields(cls) if not f.metadata.get("from_model"))
        return cls(**{f.name: getattr(config, f.name) for f in fields})

    @property
    def couples_rows(self) -> bool:
        """Whether a token's gradient needs its whole row's log-probs first (GSPO's sequence ratio, the
        off-policy mask's sequence mean, a loss type's row weight such as VESPO's): no 3-GEMM form, the 4-pass
        route."""
        return (
            self.importance_sampling_level == "sequence"
            or self.off_policy_mask_threshold is not None
            or loss_spec(self.loss_type).row_weight is not None
        )

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_high_resolved(self) -> float:
        """``epsilon_high``, or ``epsilon`` when it is None (TRL's ``self.epsilon_high``). TRL reads it two
        ways, and so do we: PPO-clipped losses clip the ratio to ``1 + epsilon_high_resolved``, while CISPO
        caps the ratio at ``epsilon_high_resolved`` itself (so CISPO wants values like 4 or 5, not 0.28)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# ---------------------------------------------------------------------------------------- the loss family
# A loss type is a policy term (per token, from the ratio) and a normalizer (how the masked per-token
# losses become one number, and how a generation batch split into micro-batches adds up to it). Every
# caller looks a type up here (``loss_spec``); a new type is one ``LossSpec`` in ``LOSS_SPECS``.


def _clipped_term(ratio, adv, logp, p):
    """PPO's pessimistic clipped ratio (grpo, bnpo, dr_grpo, dapo, luspo); ``delta`` caps the unclipped one."""
    clipped = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high_resolved)
    if p.delta is not None:
        ratio = torch.clamp(ratio, max=p.delta)  # TRL's clip metrics see this capped ratio
    return -torch.minimum(ratio * adv, clipped * adv), ratio


def _cispo_term(ratio, adv, logp, p):
    """CISPO: the ratio capped at ``epsilon_high_resolved``, as a detached weight on the log-prob's gradient."""
    return -torch.clamp(ratio, max=p.epsilon_high_resolved).detach() * adv * logp, ratio


def _sapo_term(ratio, adv, logp, p):
    """SAPO: a soft sigmoid gate on the ratio, its temperature by the advantage's sign."""
    tau = torch.where(adv > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
    return -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv, ratio


def _weighted_logp_term(weight, adv, logp, p):
    """A detached row weight on the log-prob's gradient (VESPO's phi): -weight * adv * logp."""
    return -weight.detach() * adv * logp, weight


# log(1e-8), TRL's lower clamp of VESPO's log ratios (the original implementation's).
_VESPO_LOG_FLOOR = math.log(1e-8)


def vespo_gamma_weight(log_ratio, mask, is_ratio, adv, p) -> torch.Tensor:
    """VESPO's (B, 1) fp32 row weight, detached: phi(w) = exp(lambda + k log w - lambda w), w the row's sequence
    ratio exp(sum of its masked log(pi / pi_old), each clamped to [-20, 20]) times its sampling correction (the
    masked sum of log ``is_ratio``, clamped to [log 1e-8, 20]), log w clamped likewise; (k, lambda) by the sign
    of the advantage (>= 0: the _pos pair), lambda >= 1e-4; NaN and infinities count 0. Per-token advantages
    (B, T), 0 where masked, give a (B, T) weight, as in TRL."""
    with torch.no_grad():
        seq = torch.where(mask, log_ratio.clamp(-20.0, 20.0), 0.0).sum(-1, keepdim=True)
        if is_ratio is not None:
            log_is = torch.log(is_ratio).clamp(_VESPO_LOG_FLOOR, 20.0)
            seq = seq + (log_is if log_is.shape[1] == 1 else torch.where(mask, log_is, 0.0).sum(-1, keepdim=True))
        log_w = seq.clamp(_VESPO_LOG_FLOOR, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, p.vespo_k_pos, p.vespo_k_neg)
        lam = torch.where(nonneg, p.vespo_lambda_pos, p.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """How the (B, T) masked per-token loss becomes the loss. ``weights(mf, p, num_items)`` gives (B, T)
    weights with loss = sum(weights * per_token) (the chunked path's d loss / d logp); ``aggregate`` the
    same in TRL's order of operations; ``micro_batch`` how micro-batches of one generation batch add up:
    ``num_items`` (each divides by the whole batch's tokens, passed as num_items_in_batch), ``tokens``
    (each by its own tokens: scaled by its share of them), ``rows`` (a mean over its rows: by its share)."""

    weights: Callable[..., torch.Tensor]
    aggregate: Callable[..., torch.Tensor]
    micro_batch: str
    needs_max_completion_length: bool = False


def _rows(mf: torch.Tensor) -> float:
    return mf.shape[0]


SEQUENCE_MEAN = Normalizer(  # each row's token mean, averaged over rows (grpo, sapo)
    weights=lambda mf, p, n: mf / (_rows(mf) * mf.sum(-1, keepdim=True).clamp(min=1.0)),
    aggregate=lambda pt, mf, p, n: (pt.sum(-1) / mf.sum(-1).clamp(min=1.0)).mean(),
    micro_batch="rows",
)
TOKEN_MEAN = Normalizer(  # the micro-batch's own token mean (bnpo)
    weights=lambda mf, p, n: mf / mf.sum().clamp(min=1.0),
    aggregate=lambda pt, mf, p, n: pt.sum() / mf.sum().clamp(min=1.0),
    micro_batch="tokens",
)
CONSTANT = Normalizer(  # rows x max_completion_length (dr_grpo)
    weights=lambda mf, p, n: mf / (_rows(mf) * p.max_completion_length),
    aggregate=lambda pt, mf, p, n: pt.sum() / (_rows(mf) * p.max_completion_length),
    micro_batch="rows",
    needs_max_completion_length=True,
)
BATCH_TOKEN_MEAN = Normalizer(  # the generation batch's token mean, num_items_in_batch (dapo, cispo)
    weights=lambda mf, p, n: mf / (mf.sum().clamp(min=1.0) if n is None else n),
    aggregate=lambda pt, mf, p, n: pt.sum() / (mf.sum().clamp(min=1.0) if n is None else n),
    micro_batch="num_items",
)
SEQUENCE_SUM = Normalizer(  # each row's token sum, averaged over rows: longer rows weigh more (luspo)
    weights=lambda mf, p, n: mf / _rows(mf),
    aggregate=lambda pt, mf, p, n: pt.sum(-1).mean(),
    micro_batch="rows",
)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss type: its per-token policy term ``term(ratio, adv, logp, params) -> (per_token, ratio)``,
    its normalizer, whether it is PPO-clipped (TRL logs clip ratios for those), and the name of its own
    clip metric, if any (``cispo_clip_ratio``: ratio above ``epsilon_high_resolved`` with a positive
    advantage). A type with a ``row_weight(log_ratio, mask, is_ratio, adv, params)`` (VESPO) hands its term
    that weight in place of the ratio; the weight takes the sampling correction in (it no longer multiplies
    the policy term) and is logged as ``row_weight_metric``."""

    term: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    normalizer: Normalizer
    clipped: bool
    clip_metric: str | None = None
    row_weight: Callable[..., torch.Tensor] | None = None
    row_weight_metric: str | None = None


LOSS_SPECS: dict[str, LossSpec] = {
    "grpo": LossSpec(_clipped_term, SEQUENCE_MEAN, clipped=True),
    "bnpo": LossSpec(_clipped_term, TOKEN_MEAN, clipped=True),
    "dr_grpo": LossSpec(_clipped_term, CONSTANT, clipped=True),
    "dapo": LossSpec(_clipped_term, BATCH_TOKEN_MEAN, clipped=True),
    "cispo": LossSpec(_cispo_term, BATCH_TOKEN_MEAN, clipped=False, clip_metric="cispo_clip_ratio"),
    "sapo": LossSpec(_sapo_term, SEQUENCE_MEAN, clipped=False),
    "luspo": LossSpec(_clipped_term, SEQUENCE_SUM, clipped=True),
    "vespo": LossSpec(
        _weighted_logp_term,
        BATCH_TOKEN_MEAN,
        clipped=False,
        row_weight=vespo_gamma_weight,
        row_weight_metric="vespo/phi_seq_mean",
    ),
}
LOSS_TYPES = tuple(LOSS_SPECS)


def loss_spec(loss_type: str) -> LossSpec:
    """The registry entry of ``loss_type``; one line naming the valid types otherwise."""
    try:
        return LOSS_SPECS[loss_type]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list) is no loss type either
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}") from None


def token_terms(
    logp: torch.Tensor,
    log_ratio: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    params: GRPOLossParams,
    is_ratio: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
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
        row_weight: the loss type's row weight (``LossSpec.row_weight``), handed to its term in place of
            the ratio, or None.

    Returns:
        (per_token, ratio, kl): the loss terms; the ratio TRL's clip metrics see (after ``delta``);
        the k3 KL (None without ``ref_logprobs``).
    """
    p = params
    ratio = torch.exp(log_ratio)
    if row_weight is None:
        per_token, ratio = loss_spec(p.loss_type).term(ratio, adv, logp, p)
    else:  # the clip metrics still see the ratio
        per_token, _ = loss_spec(p.loss_type).term(row_weight, adv, logp, p)
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
    return loss_spec(params.loss_type).normalizer.weights(mask.to(torch.float32), params, num_items_in_batch)


def entropy_weights(mask: torch.Tensor, entropy_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) fp32 weights with the entropy bonus's mean = sum(weights * entropy): the loss tokens (``mask``)
    that ``entropy_mask`` keeps, each 1 / their count (TRL's ``effective_mask``). Like ``token_weights`` they
    depend on masks only, so the chunked path knows d loss / d entropy before any logit exists."""
    m = mask.bool() if entropy_mask is None else mask.bool() & (entropy_mask != 0)
    mf = m.to(torch.float32)
    return mf / mf.sum().clamp(min=1.0)


def policy_scale(
    ratio: torch.Tensor | None, entropy_mask: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor | None:
    """What multiplies each token's policy term (not its KL): the sampling correction and TRL's top-entropy
    mask, (B, T) or (B, 1) fp32, 0 where masked; None for neither."""
    isr = sampling_correction(ratio, mask)
    if entropy_mask is None:
        return isr
    keep = torch.where(mask, (entropy_mask != 0).to(torch.float32), 0.0)
    return keep if isr is None else isr * keep


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
    sampling_logprobs: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Aggregate GRPO loss and metrics from per-token log-probs.

    Args:
        logp: (B, T) fp32 log p(target), differentiable.
        entropy: (B, T) fp32 per-token entropy: the metric, and the entropy bonus (differentiable where
            ``params.entropy_coef`` is nonzero).
        mask: (B, T) bool, True on completion tokens that count.
        advantages: (B,) or (B, T) float.
        old_logprobs: (B, T) float or None (None: ratio 1, gradient still flows).
        ref_logprobs: (B, T) float or None; required when ``params.beta > 0``.
        params: the loss hyper-parameters.
        num_items_in_batch: dapo/cispo normalizer (default: number of masked-in tokens).
        importance_sampling_ratio: (B, T) or (B, 1) float or None: a per-token (or per-row)
            correction multiplying the policy term, e.g. the truncated pi_old / pi_sampler ratio.
        sampling_logprobs: (B, T) float or None: the sampler's log-probs, read only by the off-policy
            mask (``params.off_policy_mask_threshold``); None: ``old_logprobs``, else this policy's own.
        entropy_mask: (B, T) bool or 0/1, or None: TRL's ``top_entropy_quantile`` mask; the policy term and the
            entropy bonus act only on the tokens it keeps (the KL on every loss token).

    Returns:
        (loss, metrics): 0-dim loss; metrics are detached 0-dim fp32 tensors (``policy_loss``, the loss without
        the entropy bonus, too when ``params.entropy_coef`` is nonzero).
    """
    p = params
    m = mask
    mf = m.to(torch.float32)
    adv = advantages.to(torch.float32)
    adv = adv[:, None] if adv.dim() == 1 else torch.where(m, adv, 0.0)
    spec = loss_spec(p.loss_type)
    log_ratio = _log_ratio(logp, old_logprobs, m, mf, p.importance_sampling_level)
    row_weight = None
    if spec.row_weight is not None:  # it takes the sampling correction in, from the token-level log ratio
        token_log_ratio = _log_ratio(logp, old_logprobs, m, mf, "token")
        row_weight = spec.row_weight(token_log_ratio, m, _as_float(importance_sampling_ratio), adv, p)
        importance_sampling_ratio = None
    isr = policy_scale(importance_sampling_ratio, entropy_mask, m)
    if p.off_policy_mask_threshold is not None:
        sampling = next(t for t in (sampling_logprobs, old_logprobs, logp.detach()) if t is not None)
        keep = off_policy_mask(adv, logp, sampling, m, p.off_policy_mask_threshold)
        isr = keep if isr is None else isr * keep  # both scale the policy term only
    per_token, ratio, kl = token_terms(logp, log_ratio, ref_logprobs, adv, m, p, isr, row_weight)

    per_token = torch.where(m, per_token.expand_as(logp), 0.0)
    loss = spec.normalizer.aggregate(per_token, mf, p, num_items_in_batch)
    with torch.no_grad():
        metrics = _metrics(entropy, kl, ratio, adv, m, mf, p, spec.clip_metric)
        if row_weight is not None:
            metrics[spec.row_weight_metric] = _batch_mean(row_weight, m, mf)
    if p.entropy_coef != 0.0:
        metrics["policy_loss"] = loss.detach().to(torch.float32)
        bonus = (entropy_weights(m, entropy_mask) * torch.where(m, entropy, 0.0)).sum()
        loss = loss - p.entropy_coef * bonus
    return loss, metrics


def off_policy_mask(adv, logp, sampling_logprobs, mask, threshold: float) -> torch.Tensor:
    """TRL's off-policy sequence mask, (B, 1) fp32 (or (B, T) for per-token advantages): 1 keeps the policy
    term, 0 drops it. A row is kept when its advantage is >= 0 or when its masked mean of
    log pi_sampling - log pi (pi detached; NaN counted 0, infinities clamped to finite as TRL does) is <= threshold.
    """
    kl = torch.nan_to_num(sampling_logprobs.to(torch.float32) - logp.detach(), nan=0.0)
    kl = torch.where(mask, kl, 0.0)
    mean = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((adv >= 0) | (mean <= threshold)).to(torch.float32)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """TRL's ``top_entropy_quantile`` mask on one process: (B, T) bool, True on the loss tokens whose entropy
    is at or above the (1 - ``top_quantile``) quantile of the loss tokens' entropies (all False for none)."""
    m = mask.bool()
    live = entropy[m].float()
    if live.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(live, 1 - top_quantile)
    return (entropy * m >= threshold) & m


def _log_ratio(logp, old_logprobs, m, mf, level: str) -> torch.Tensor:
    """log(pi / pi_old), 0 where masked: per token, or (B, 1) for GSPO (the row's masked mean)."""
    old = logp.detach() if old_logprobs is None else old_logprobs.to(torch.float32)
    log_ratio = torch.where(m, logp - old, 0.0)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mf.sum(-1, keepdim=True).clamp(min=1.0)
    return log_ratio


def _as_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def _batch_mean(x: torch.Tensor, m: torch.Tensor, mf: torch.Tensor) -> torch.Tensor:
    """TRL's logged mean: sequence-level tensors (B, 1) average over rows, token-level over masked tokens."""
    x = x.to(torch.float32)
    return x.mean() if x.shape[1] == 1 else torch.where(m, x, 0.0).sum() / mf.sum().clamp(min=1.0)


def _metrics(entropy, kl, ratio, adv, m, mf, p: GRPOLossParams, clip_metric: str | None) -> dict[str, torch.Tensor]:
    """The metrics TRL logs, each a mean over the batch; call under no_grad."""

    def batch_mean(x: torch.Tensor) -> torch.Tensor:
        return _batch_mean(x, m, mf)

    metrics = {"entropy": batch_mean(entropy)}
    if kl is not None:
        metrics["kl"] = batch_mean(kl)
    low = (ratio < 1 - p.epsilon_low) & (adv < 0)
    high = (ratio > 1 + p.epsilon_high_resolved) & (adv > 0)
    metrics["clip_ratio/low_mean"] = batch_mean(low)
    metrics["clip_ratio/high_mean"] = batch_mean(high)
    metrics["clip_ratio/region_mean"] = batch_mean(low | high)
    if clip_metric is not None:
        metrics[clip_metric] = batch_mean((ratio > p.epsilon_high_resolved) & (adv > 0))
    return metrics
