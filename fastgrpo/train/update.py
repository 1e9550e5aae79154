"""The update phase: micro-batches, old/reference log-probs, gradient accumulation, optimizer steps.

Kept apart from sampling so the same code serves ``fastgrpo train`` and the update-step benchmark
(``benchmarks/bench_train.py``), which feeds it synthetic rollouts of chosen lengths.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..ops import FusedGRPOLoss, GRPOLossParams
from ..ops.loss import loss_spec
from .config import check_correction_for_loss
from .correction import CorrectionSettings, CorrectionStats, importance_sampling_ratio, missing_sampler_logprobs
from .policy import completion_logprobs, head_kwargs, policy_loss
from .rollouts import Batch, MicroBatch, Rollouts
from .tracking import PhaseTimes


def plan_micro_batches(
    prompt_lens: list[int],
    completion_lens: list[int],
    max_rows: int,
    max_tokens: int | None,
    packed: bool,
) -> list[list[int]]:
    """Row groups for the micro-batches of one generation batch.

    Without ``max_tokens``: consecutive groups of ``max_rows``. With it: sequences sorted by
    length and placed first-fit into micro-batches whose cost stays within ``max_tokens``, where
    the cost is what the backbone pass processes: the sum of the real lengths when ``packed``,
    rows x (longest prompt + longest completion) when padded. A sequence longer than the budget
    gets a micro-batch of its own (sequences are never split).
    """
    n = len(prompt_lens)
    if max_tokens is None:
        return [list(range(s, min(s + max_rows, n))) for s in range(0, n, max_rows)]
    order = sorted(range(n), key=lambda i: (-(prompt_lens[i] + completion_lens[i]), i))
    bins: list[list[int]] = []
    state: list[tuple[int, int, int]] = []  # per bin: (sum of lengths, longest prompt, longest completion)

    def cost(total: int, p: int, c: int, rows: int) -> int:
        return total if packed else rows * (p + c)

    for i in order:
        p, c = prompt_lens[i], completion_lens[i]
        for b, (total, mp, mc) in enumerate(state):
            new = (total + p + c, max(mp, p), max(mc, c))
            if cost(*new, len(bins[b]) + 1) <= max_tokens:
                bins[b].append(i)
                state[b] = new
                break
        else:
            bins.append([i])
            state.append((p + c, p, c))
    return [sorted(b) for b in bins]


class NonFiniteUpdate(ArithmeticError):
    """A non-finite loss or gradient norm, raised before the optimizer steps (gradients already cleared).
    ``iteration``: which of the step's ``num_iterations`` (0: the weights are still the last good step's)."""

    def __init__(self, what: str, iteration: int, where: str = ""):
        super().__init__(f"{what} (iteration {iteration}{where})")
        self.what, self.iteration, self.where = what, iteration, where


@dataclass(frozen=True)
class UpdateSettings:
    """Everything the update phase reads, resolved once before the ``Updater`` is built. No defaults:
    the config's are the only ones (``from_config``)."""

    micro_batch_rows: int  # rows per micro-batch (per_device_train_batch_size)
    max_tokens_per_microbatch: int | None  # token budget per micro-batch (None: rows only)
    packed: bool  # padding-free micro-batches (resolved padding_free)
    num_iterations: int  # optimizer updates per generation batch
    max_grad_norm: float  # clip threshold; <= 0 measures the norm and never clips
    loss_impl: str  # fused op implementation for every pass
    kahan: bool  # torch-optimi's AdamW with Kahan summation (resolve_kahan_summation)
    learning_rate: float
    adam_betas: tuple[float, float]
    adam_epsilon: float
    weight_decay: float
    lr_scheduler_type: str  # linear, cosine, constant, constant_with_warmup
    warmup_updates: int
    total_updates: int
    correction: CorrectionSettings  # the sampler/trainer mismatch correction, resolved for the backend
    top_entropy_quantile: float  # train on this top fraction of each micro-batch's loss tokens by entropy

    @classmethod
    def from_config(
        cls, cfg, *, packed: bool, kahan: bool, backend: str | None = None, total_updates: int | None = None
    ) -> UpdateSettings:
        """The settings of ``cfg`` (a ``Config``) with what the run resolved: ``packed`` (padding_free),
        ``kahan`` (``resolve_kahan_summation``), ``backend`` (the generation backend, which decides the
        correction's auto; None: correction off) and ``total_updates`` (None: ``max_steps`` x iterations)."""
        total = total_updates if total_updates is not None else max(1, cfg.max_steps) * cfg.num_iterations
        correction = CorrectionSettings() if backend is None else CorrectionSettings.resolve(cfg.correction, backend)
        check_correction_for_loss(cfg.loss_type, correction.mode, correction.enabled)
        return cls(
            micro_batch_rows=cfg.per_device_train_batch_size,
            max_tokens_per_microbatch=cfg.max_tokens_per_microbatch,
            packed=bool(packed),
            num_iterations=cfg.num_iterations,
            max_grad_norm=cfg.max_grad_norm,
            loss_impl=cfg.loss_impl,
            top_entropy_quantile=cfg.top_entropy_quantile,
            kahan=bool(kahan),
            learning_rate=cfg.learning_rate,
            adam_betas=(cfg.adam_beta1, cfg.adam_beta2),
            adam_epsilon=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_updates=math.ceil(cfg.warmup_ratio * total),
            total_updates=total,
            correction=correction,
        )


def _bonus_params(params: GRPOLossParams, token_share: float, scale: float) -> GRPOLossParams | None:
    """A micro-batch's loss hyper-parameters when the entropy bonus is on: its coefficient weighted so that,
    once the loss is multiplied by ``scale``, each micro-batch's mean entropy counts by its share of the batch's
    loss tokens (the bonus is the batch's token mean, whatever the loss type's normalizer; with
    ``top_entropy_quantile`` < 1, the loss-token-weighted mean of each micro-batch's mean over the tokens it
    keeps). None otherwise."""
    if params.entropy_coef == 0.0:
        return None
    coef = params.entropy_coef * token_share / scale if scale > 0 else 0.0
    return dataclasses.replace(params, entropy_coef=coef)


def build_optimizer(params, s: UpdateSettings) -> torch.optim.Optimizer:
    """AdamW over ``params``; ``s.kahan``: torch-optimi's AdamW with Kahan-summed updates (the same update
    as torch's AdamW, decoupled weight decay ``lr * weight_decay``, tested to agree in fp32), whose
    16-bit compensation buffer keeps what rounding the weights to bf16/fp16 would lose."""
    hyper = dict(lr=s.learning_rate, betas=s.adam_betas, eps=s.adam_epsilon, weight_decay=s.weight_decay)
    if not s.kahan:
        return torch.optim.AdamW(params, **hyper)
    import optimi

    return optimi.AdamW(params, kahan_sum=True, **hyper)


def lr_lambda(kind: str, warmup: int, total: int):
    """The learning-rate multiplier after ``update`` optimizer updates (TRL's schedule names)."""

    def f(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (update - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return f


def has_16bit_trainable(model) -> bool:
    """Whether a trainable weight is bf16/fp16: plain AdamW then drops updates below its resolution."""
    return any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


def resolve_kahan_summation(spec: bool | None, model, fits: bool) -> bool:
    """``kahan_summation`` for this run: as given, or (None) on when a trainable weight is 16-bit and
    ``fits`` (the memory plan with the buffer within the device's memory)."""
    if spec is not None:
        return bool(spec)
    return has_16bit_trainable(model) and fits


class Updater:
    """Owns the optimizer and its scheduler; ``update(batch)`` runs ``num_iterations`` optimizer steps.

    ``ref_model`` is a frozen copy, or None: then, with ``params.beta > 0``, the reference is the policy
    with its LoRA adapters disabled. ``params``: the loss settings; ``settings``: the rest, resolved
    (``UpdateSettings.from_config``). A non-finite loss or gradient norm raises ``NonFiniteUpdate``
    before the optimizer steps; the caller decides what to keep.
    """

    def __init__(self, model, ref_model, params: GRPOLossParams, settings: UpdateSettings):
        self.model, self.ref_model, self.params, self.settings = model, ref_model, params, settings
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.device = trainable[0].device
        self.optimizer = build_optimizer(trainable, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(settings.lr_scheduler_type, settings.warmup_updates, settings.total_updates)
        )
        # The one source of the loss settings and the implementation for every pass, log-probs included.
        self.loss_fn = FusedGRPOLoss(impl=settings.loss_impl, **dataclasses.asdict(params))

    def micro_batches(self, batch: Batch) -> list[MicroBatch]:
        ro = batch.rollouts
        groups = plan_micro_batches(
            ro.prompt_mask.sum(1).tolist(), ro.completion_mask.sum(1).tolist(),
            self.settings.micro_batch_rows, self.settings.max_tokens_per_microbatch, self.settings.packed,
        )  # fmt: skip
        return [batch.micro_batch(g) for g in groups]

    def logprobs(self, model, mb: Rollouts) -> torch.Tensor:
        """Log-probs of a scoring pass (old, reference): in eval mode, as the sampler ran, so LoRA or
        attention dropout never makes pi_old differ from the policy that sampled."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                p = self.params
                return completion_logprobs(
                    model, mb, p.temperature, self.loss_fn.impl, self.settings.packed, **head_kwargs(p)
                )
        finally:
            model.train(was_training)

    def ref_logprobs(self, mb: Rollouts) -> torch.Tensor:
        if self.ref_model is not None:
            return self.logprobs(self.ref_model, mb)
        with self.model.disable_adapter():  # LoRA: the base model is the reference, no second copy
            return self.logprobs(self.model, mb)

    def check_sampler_logprobs(self, batch: Batch) -> None:
        if self.settings.correction.enabled and batch.rollouts.sampler_logprobs is None:
            raise missing_sampler_logprobs(self.settings.correction)

    def sampling_correction(self, micro: list[MicroBatch], old: list[torch.Tensor]):
        """(per-micro-batch ratios, metrics) of the sampler/trainer correction, or ([None]..., {})
        when it is off. ``old``: the policy's log-probs before any update, per micro-batch."""
        correction = self.settings.correction
        if not correction.enabled:
            return [None] * len(micro), {}
        stats = CorrectionStats(correction)
        ratios = []
        for m, lp in zip(micro, old, strict=True):
            sampler = m.rollouts.sampler_logprobs
            if sampler is None:
                raise missing_sampler_logprobs(correction)
            sampler = sampler.to(lp.device)
            ratio, outside = importance_sampling_ratio(lp, sampler, m.loss_mask, correction)
            stats.add(lp, sampler, m.loss_mask, ratio, outside)
            ratios.append(ratio)
        return ratios, stats.metrics()

    def update(self, batch: Batch) -> dict[str, float]:
        """``num_iterations`` optimizer updates over the batch; returns averaged metrics."""
        iterations = self.settings.num_iterations
        self.check_sampler_logprobs(batch)  # before any forward pass
        times = PhaseTimes(self.device)
        micro = self.micro_batches(batch)
        old = ref = [None] * len(micro)
        with times("logprobs"):
            # The sampling policy's log-probs, before it moves; the correction needs them at any num_iterations
            # (as TRL computes old_per_token_logps whenever vllm_importance_sampling_correction is on).
            if iterations > 1 or self.settings.correction.enabled:
                old = [self.logprobs(self.model, m.rollouts) for m in micro]
            if self.params.beta > 0:
                ref = [self.ref_logprobs(m.rollouts) for m in micro]
            is_ratio, correction_metrics = self.sampling_correction(micro, old)
        sums: dict[str, float] = {"micro_batches": float(len(micro)), **correction_metrics}
        with times("update"):
            self._iterate(batch, micro, old, ref, is_ratio, sums)
        return sums | times.metrics()

    def _iterate(self, batch: Batch, micro, old, ref, is_ratio, sums: dict[str, float]) -> None:
        """The ``num_iterations`` optimizer steps of ``update``, their metrics averaged into ``sums``."""
        s = self.settings
        for it in range(s.num_iterations):
            for k, v in self.accumulate_gradients(batch, micro, old, ref, it, is_ratio).items():
                sums[k] = sums.get(k, 0.0) + v / s.num_iterations
            max_norm = s.max_grad_norm if s.max_grad_norm > 0 else float("inf")  # inf: measure, never clip
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            if not math.isfinite(sums["grad_norm"]):
                self._non_finite(f"the gradient norm is {sums['grad_norm']}", it)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        sums["learning_rate"] = self.scheduler.get_last_lr()[0]

    def _non_finite(self, what: str, iteration: int, where: str = ""):
        self.optimizer.zero_grad(set_to_none=True)  # nothing of the bad pass may reach a later step
        raise NonFiniteUpdate(what, iteration, where)

    def accumulate_gradients(
        self, batch: Batch, micro=None, old=None, ref=None, iteration: int = 0, is_ratio=None
    ) -> dict[str, float]:
        """Backward over every micro-batch, scaled so the summed gradient is that of the whole
        generation batch, as the loss type's normalizer says (``LossSpec.normalizer.micro_batch``):
        divided by the batch's completion tokens, weighted by the micro-batch's share of them, or by
        its share of the rows.

        ``is_ratio``: per micro-batch, the sampler/trainer correction (``sampling_correction``);
        None with the correction on computes it here (and ``old``, if not given). It scales the
        per-token loss only: the normalizers above still count every loss token."""
        micro = self.micro_batches(batch) if micro is None else micro
        if is_ratio is None and self.settings.correction.enabled:
            self.check_sampler_logprobs(batch)
            if old is None or any(o is None for o in old):
                old = [self.logprobs(self.model, m.rollouts) for m in micro]
            is_ratio, _ = self.sampling_correction(micro, old)
        old = [None] * len(micro) if old is None else old
        ref = [None] * len(micro) if ref is None else ref
        is_ratio = [None] * len(micro) if is_ratio is None else is_ratio
        p, spec = self.params, loss_spec(self.params.loss_type)
        # Clamped: a batch whose completions were all truncated has no loss tokens, and loss 0.
        tokens = max(float(batch.loss_mask.sum()), 1.0)
        how = spec.normalizer.micro_batch  # how this loss's micro-batches add up to the whole batch's
        num_items = tokens if how == "num_items" else None
        n = len(batch.rollouts)
        sums: dict[str, float] = {"loss": 0.0}
        for k, m in enumerate(micro):
            if how == "num_items":  # every micro-batch already divides by the whole batch's tokens
                scale = 1.0
            elif how == "tokens":  # the op divides by the micro-batch's own tokens
                scale = float(m.loss_mask.sum()) / tokens
            else:  # "rows": a mean over the micro-batch's rows
                scale = len(m.rows) / n
            # Iteration 0 is the sampling policy itself: pi_old is this very forward, detached (ratio exactly 1,
            # dropout or not), as TRL does at num_iterations 1. The stored pass serves the later iterations.
            old_k = None if iteration == 0 else old[k]
            # The off-policy mask measures drift from the sampler where a backend reports its log-probs, as TRL does.
            sampling = m.rollouts.sampler_logprobs if p.off_policy_mask_threshold is not None else None
            token_share = float(m.loss_mask.sum()) / tokens
            out = policy_loss(self.model, m.rollouts, m.loss_mask, m.advantages, self.loss_fn, old_logprobs=old_k,
                              ref_logprobs=ref[k], num_items_in_batch=num_items, padding_free=self.settings.packed,
                              importance_sampling_ratio=is_ratio[k], sampling_logprobs=sampling,
                              top_entropy_quantile=self.settings.top_entropy_quantile,
                              params=_bonus_params(p, token_share, scale))  # fmt: skip
            loss = out.loss * scale
            if not torch.isfinite(loss):
                self._non_finite(f"loss is {loss.item()}", iteration, f", micro-batch {k}")
            loss.backward()
            sums["loss"] += loss.item()
            # The op's metrics are means over this micro-batch's loss tokens (or rows, for sequence-level
            # ratios): weighted by its share of them, the sum is the whole batch's mean, however uneven the
            # token-budget micro-batches are. The policy loss adds up as the loss does.
            for name, v in out.metrics.items():
                clip = name.startswith("clip_ratio") or name == spec.clip_metric
                # Per-row means: sequence-level clip ratios, and a row weight of per-row advantages (VESPO's phi).
                row_weight = name == spec.row_weight_metric and m.advantages.dim() == 1
                by_rows = p.importance_sampling_level == "sequence" and clip or row_weight
                weight = scale if name == "policy_loss" else len(m.rows) / n if by_rows else token_share
                sums[name] = sums.get(name, 0.0) + v.item() * weight
        return sums
