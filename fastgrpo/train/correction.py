"""The sampler/trainer mismatch correction (TRL's ``vllm_importance_sampling_correction``).

A fast sampler (vLLM) and the training forward compute slightly different probabilities for the
same tokens. TRL 1.16 corrects for it by weighting each token's policy term with the ratio
pi_old / pi_sampler of the sampled tokens, computed once per generation batch from the policy's
log-probs before any update (``old``) and the sampler's own (``sampler``), then bounded:

- ``d = nan_to_num((old - sampler) * mask, nan=0)``: a token the sampler could not score (NaN)
  gets no correction; ``token_*`` modes take ``r = exp(d)`` (B, T), ``sequence_*`` modes one ratio
  per row ``r = exp(sum_t d)`` (B, 1).
- ``*_truncate``: ``r = clamp(r, clip_min, clip_max)`` (None = no bound on that side).
- ``*_mask``: ``r = 0`` where ``r < clip_min`` or ``r > clip_max`` (None = -inf / +inf).

The ratio multiplies the per-token loss; the loss normalizers are unchanged (a masked token still
counts in them). Metrics follow TRL's names and reductions over the whole generation batch:
``sampling/importance_sampling_ratio/{min,mean,max}`` over the masked-in tokens (token modes) or
over every row (sequence modes), ``sampling/sampling_logp_difference/{mean,max}`` of
``|old - sampler|`` over the masked-in tokens whose difference is not NaN, and ours,
``sampling/importance_sampling_ratio/truncated_frac`` (``*_truncate``) or ``.../masked_frac``
(``*_mask``): the share of that same population the bound changed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import IS_CORRECTION_MODES

PREFIX = "sampling/importance_sampling_ratio"


@dataclasses.dataclass(frozen=True)
class CorrectionSettings:
    """The correction as one run applies it, resolved from ``CorrectionConfig`` and the backend."""

    enabled: bool = False
    mode: str = "sequence_mask"  # one of IS_CORRECTION_MODES
    clip_max: float | None = 3.0
    clip_min: float | None = None
    backend: str = "hf"  # the resolved generation backend (for error messages)

    def __post_init__(self):
        if self.mode not in IS_CORRECTION_MODES:
            raise ValueError(
                f"vllm_importance_sampling_mode must be one of {'/'.join(IS_CORRECTION_MODES)}, got {self.mode!r}"
            )

    @classmethod
    def resolve(cls, correction, backend: str) -> CorrectionSettings:
        """From a ``CorrectionConfig``: ``vllm_importance_sampling_correction=None`` (auto) is on
        exactly when the resolved backend is ``vllm``."""
        flag = correction.vllm_importance_sampling_correction
        return cls(
            enabled=(backend == "vllm") if flag is None else bool(flag),
            mode=correction.vllm_importance_sampling_mode,
            clip_max=correction.vllm_importance_sampling_clip_max,
            clip_min=correction.vllm_importance_sampling_clip_min,
            backend=backend,
        )

    @property
    def sequence_level(self) -> bool:
        return self.mode.startswith("sequence_")

    @property
    def masks(self) -> bool:
        return self.mode.endswith("_mask")

    @property
    def frac_name(self) -> str:
        return f"{PREFIX}/{'masked' if self.masks else 'truncated'}_frac"


def importance_sampling_ratio(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, settings: CorrectionSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, bounded): the bounded ratio, (B, T) for token modes or (B, 1) for sequence modes,
    fp32; and a bool tensor of its shape, True where the bound changed it (clamped or zeroed).

    ``old_logprobs``, ``sampler_logprobs``: (B, T) float; ``mask``: (B, T) bool/0-1, the tokens
    that count in the loss. Values at masked positions do not matter (NaN and inf included)."""
    diff = (old_logprobs.float() - sampler_logprobs.float()) * mask.float()
    diff = torch.nan_to_num(diff, nan=0.0)  # unscored tokens: no correction (+-inf become +-max, as in TRL)
    if settings.sequence_level:
        diff = diff.sum(-1, keepdim=True)
    raw = torch.exp(diff)
    lo = -math.inf if settings.clip_min is None else settings.clip_min
    hi = math.inf if settings.clip_max is None else settings.clip_max
    outside = (raw < lo) | (raw > hi)
    if settings.masks:
        return raw.masked_fill(outside, 0.0), outside
    return raw.clamp(min=lo, max=hi), outside


class CorrectionStats:
    """Accumulates the metrics over a generation batch's micro-batches, so the result is the
    whole batch's reduction (TRL computes it once per generation batch), not a mean of means."""

    def __init__(self, settings: CorrectionSettings):
        self.settings = settings
        self.count = 0  # population of the ratio metrics: masked-in tokens (token modes) or rows
        self.total = 0.0
        self.outside = 0
        self.low, self.high = math.inf, -math.inf
        self.delta_count, self.delta_total, self.delta_max = 0, 0.0, -math.inf

    @torch.no_grad()
    def add(self, old_logprobs, sampler_logprobs, mask, ratio, outside) -> None:
        mask = mask.bool()
        delta = (old_logprobs.float() - sampler_logprobs.float()).abs()
        delta = delta[mask & ~torch.isnan(delta)]
        if delta.numel():
            self.delta_count += delta.numel()
            self.delta_total += float(delta.double().sum())
            self.delta_max = max(self.delta_max, float(delta.max()))
        if self.settings.sequence_level:
            flat, hit = ratio.flatten(), outside.flatten()
        else:
            flat, hit = ratio[mask], outside[mask]
        if flat.numel():
            self.count += flat.numel()
            self.total += float(flat.double().sum())
            self.outside += int(hit.sum())
            self.low = min(self.low, float(flat.min()))
            self.high = max(self.high, float(flat.max()))

    def metrics(self) -> dict[str, float]:
        """TRL reports 0 for an empty population; so do we."""
        n, d = self.count, self.delta_count
        return {
            "sampling/sampling_logp_difference/mean": self.delta_total / d if d else 0.0,
            "sampling/sampling_logp_difference/max": self.delta_max if d else 0.0,
            f"{PREFIX}/min": self.low if n else 0.0,
            f"{PREFIX}/mean": self.total / n if n else 0.0,
            f"{PREFIX}/max": self.high if n else 0.0,
            self.settings.frac_name: self.outside / n if n else 0.0,
        }


def missing_sampler_logprobs(settings: CorrectionSettings) -> ValueError:
    return ValueError(
        f"vllm_importance_sampling_correction is on but the {settings.backend!r} generation backend returned no "
        "sampler log-probs (Rollouts.sampler_logprobs is None); set vllm_importance_sampling_correction: false "
        "or use a backend that reports them"
    )
