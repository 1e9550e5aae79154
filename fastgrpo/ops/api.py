"""Public fused ops: ``chunked_logprobs``, ``fused_grpo_loss`` and ``FusedGRPOLoss``.

Every argument is checked (``checks``) before any kernel runs. ``impl`` picks the path (``IMPLS``):

- ``"chunked"``: 3 GEMMs (cuBLAS) through a bounded logits workspace, gradients formed in the
  forward (``chunked.py``); the fastest exact path. Row kernels in Triton on CUDA (or CPU under
  ``TRITON_INTERPRET=1``), their torch twin elsewhere.
- ``"fused"`` (alias ``"triton"``): logits only ever on chip (``fastgrpo.kernels``); the least
  memory. CUDA, or CPU under ``TRITON_INTERPRET=1``.
- ``"torch"``: the pure-PyTorch twin of the fused kernels, chunked, any device.
- ``"auto"``: on CUDA, ``chunked`` when the memory it holds (workspace, dHidden and dWeight from
  forward to backward) fits the budget, else ``fused``; ``fused`` for requests with no 3-GEMM
  form (below); ``torch`` elsewhere. The budget is ``FASTGRPO_MEMORY_FRACTION`` (default 0.5) of
  the device's free memory at the call.

Some requests cannot take the 3-GEMM route: sequence-level importance sampling (GSPO) couples a
row's tokens, and ``chunked_logprobs`` does not know its upstream gradient in the forward. They
take the 4-pass route: under "chunked" the torch twin (logits once in the forward, recomputed in
the backward), under "auto" on CUDA the fused kernels.
``route`` says which one runs; ``FusedGRPOLoss.last_route`` records it.

``grad_filter_eps`` (all three entry points) is an implementation knob, not loss semantics:
skip the backward GEMMs of vocabulary tiles whose d loss / d logits is below eps times the
token's gradient scale (Cut Cross-Entropy's gradient filtering). 0 or None = exact; 2**-12 suits bf16.
Only the fused backward filters: the cuBLAS paths' dense GEMMs would gain nothing from zeroing
entries, so they ignore eps and return the exact gradient (eps bounds what *may* be dropped;
dropping nothing is within it).

``grad_accumulation`` is the other knob: how the chunked path sums dWeight over its token chunks.
"fp32" (default) keeps a V x H fp32 accumulator and casts it once; "input" sums in the weight's
dtype (each chunk's GEMM accumulates in fp32 inside cuBLAS and rounds once), which saves the fp32
buffer and its traffic at one rounding per chunk. fp32 weights always sum in fp32.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch

from . import checks
from .chunked import WORKSPACE_BYTES, chunked_grpo_loss
from .chunked import extra_bytes as chunked_extra_bytes
from .loss import GRPOLossParams, grpo_loss_from_logprobs
from .tensors import LossTensors
from .twin import extra_bytes as twin_extra_bytes
from .twin import linear_logprobs_torch

IMPLS = ("auto", "chunked", "fused", "triton", "torch")
ROUTES = ("chunked", "fused", "torch")  # what runs: 3 GEMMs, on chip, the 4-pass torch twin


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. hidden, weight, bias
    logprobs: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    entropy: torch.Tensor  # (B, T) fp32, detached; 0 where mask is 0
    metrics: dict  # name -> detached 0-dim fp32 tensor


# ----------------------------------------------------------------------------- dispatch


def _check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return "fused" if impl == "triton" else impl


def _triton_ok(device: torch.device) -> bool:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return device.type == "cuda" or (device.type == "cpu" and interpreting)


def _memory_budget(device: torch.device) -> int:
    fraction = float(os.environ.get("FASTGRPO_MEMORY_FRACTION", "0.5"))
    return int(fraction * torch.cuda.mem_get_info(device)[0])


def extra_bytes(path: str, N: int, H: int, V: int, dtype: torch.dtype, *, trainable_head: bool = True) -> int:
    """Peak memory a path allocates beyond its inputs and the returned gradients, in bytes: each path's
    own formula (``chunked.extra_bytes``, ``kernels.linear_dlogits.extra_bytes``, ``twin.extra_bytes``),
    kept beside the buffers it counts."""
    if path == "chunked":
        return chunked_extra_bytes(N, H, V, dtype, trainable_head=trainable_head)
    if path == "fused":
        from ..kernels.linear_dlogits import extra_bytes as fused_extra_bytes

        return fused_extra_bytes(N, H, V, dtype, trainable_head=trainable_head)
    if path == "torch":
        return twin_extra_bytes(N, H, V, dtype, trainable_head=trainable_head)
    raise ValueError(f"path must be one of {ROUTES}, got {path!r}")


def route(
    impl: str,
    device: torch.device,
    *,
    loss: bool = True,
    importance_sampling_level: str = "token",
    shape: tuple[int, int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    trainable_head: bool = True,
    workspace_bytes: int | None = None,
    grad_accumulation: str = "fp32",
    couples_rows: bool = False,
) -> str:
    """The path (one of ``ROUTES``) a call with these arguments runs.

    Args:
        impl: one of ``IMPLS``.
        device: the tensors' device.
        loss: True for ``fused_grpo_loss``, False for ``chunked_logprobs``.
        importance_sampling_level: "token" or "sequence".
        shape: (N tokens, H, V) for ``auto``'s memory check on CUDA (None: assume it fits).
        dtype: the hidden states' dtype.
        trainable_head: whether the lm_head weight needs a gradient.
        workspace_bytes: the chunked path's workspace bound (None: the default).
        grad_accumulation: "fp32" or "input" (module docstring).
        couples_rows: whether a token's gradient needs its row's log-probs first (``GRPOLossParams.couples_rows``:
            the off-policy mask's sequence mean, VESPO's sequence weight; GSPO's too, which
            ``importance_sampling_level`` also says).
    """
    asked, impl = impl, _check_impl(impl)
    no_3gemm = not loss or importance_sampling_level != "token" or couples_rows
    if impl == "auto":
        if device.type != "cuda":
            return "torch"
        if no_3gemm:
            return "fused"  # no 3-GEMM form; logits on chip beat the twin's materialized chunks
        impl = "chunked"
        if shape is not None:
            ws = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
            extra = chunked_extra_bytes(
                *shape, dtype, trainable_head=trainable_head, workspace_bytes=ws, grad_accumulation=grad_accumulation
            )
            impl = "chunked" if extra <= _memory_budget(device) else "fused"
    if impl == "fused" and not _triton_ok(device):
        raise ValueError(
            f"impl={asked!r} needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got device {device}"
        )
    if impl == "chunked" and no_3gemm:
        return "torch"
    return impl


def _workspace(workspace_bytes, device: torch.device) -> int:
    if workspace_bytes is None:
        if device.type != "cuda":
            return WORKSPACE_BYTES
        return max(1, min(WORKSPACE_BYTES, _memory_budget(device)))
    return checks.check_workspace_bytes(workspace_bytes)


def _cast_for_autocast(hidden, weight, bias):
    """Under autocast the lm_head runs in the autocast dtype, as nn.Linear would."""
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return hidden, weight, bias


def _logprobs_impl(
    hidden2d, weight, bias, targets, active, head: tuple, impl, grad_filter_eps=0.0, workspace_bytes=None
):
    """(logp, entropy) of ``targets``'s shape from (N, H) hidden states; the kernels see targets flat.
    ``head``: (temperature, logit_scale, final_logit_softcapping)."""
    targets1d = targets.reshape(-1)
    active1d = None if active is None else active.reshape(-1)
    temperature, logit_scale, softcap = head
    if impl == "fused":
        from ..kernels import linear_logprobs_triton

        logp, entropy = linear_logprobs_triton(
            hidden2d, weight, bias, targets1d, active1d, temperature, grad_filter_eps, logit_scale=logit_scale,
            softcap=softcap,
        )  # fmt: skip
    else:
        # The torch twin ignores grad_filter_eps: exact gradients (see the module docstring).
        logp, entropy = linear_logprobs_torch(
            hidden2d, weight, bias, targets1d, active1d, temperature, workspace_bytes, logit_scale, softcap
        )
    return logp.view(targets.shape), entropy.view(targets.shape)


def _check_head_transform(logit_scale, final_logit_softcapping) -> tuple[float, float | None]:
    """The logit transform's two numbers, checked as ``GRPOLossParams`` checks its head fields."""
    p = GRPOLossParams(logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping)
    return p.logit_scale, p.final_logit_softcapping


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
    grad_filter_eps: float | None = 0.0,
    workspace_bytes: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
):
    """Per-token log p(target) from hidden states and the lm_head, without full logits.

    Every tensor may be a strided view (a transposed weight, ``pairs[:, 1]`` targets, ``b[::2]``):
    each path reads it through its strides or copies the O(N) / O(V) vectors at the kernel's
    boundary; hidden and weight are never copied.

    Args:
        hidden: (..., H) fp32/fp16/bf16 final hidden states at the positions predicting ``targets``.
        weight: (V, H) lm_head weight, same dtype and device (tied embeddings work as is).
        targets: (...) int32/int64 token ids in [0, V), shape ``hidden.shape[:-1]``. Eagerly an
            id outside [0, V) raises ValueError; under ``torch.compile`` (which skips that check,
            it reads data back) such a token's logp is NaN and so are the gradients that use it,
            on every path: never a plausible finite number, never an out-of-bounds read.
        bias: (V,) lm_head bias or None.
        temperature: logits are divided by it before the softmax (> 0).
        return_entropy: also return the per-token entropy of the softmax.
        impl: one of ``IMPLS``. Without a loss the upstream gradient is unknown in the forward,
            so "chunked" takes the 4-pass route (the torch twin); "auto" picks fused on CUDA.
        grad_filter_eps: skip the backward GEMMs of vocabulary tiles whose d loss / d logits
            is below eps times the token's gradient scale (Cut Cross-Entropy's gradient
            filtering), in [0, 1). 0 or None = off (exact); 2**-12 suits bf16. Fused path only: the others
            ignore it and return exact gradients.
        workspace_bytes: int > 0 or None: bound on one chunk's fp32 logits on the 4-pass route
            (None: 64 MiB); the fused path keeps its logits on chip and ignores it.
        logit_scale, final_logit_softcapping: the model's head transform before the temperature:
            logits * logit_scale (> 0), then softcapped to c * tanh(logits / c) with c = final_logit_softcapping
            (> 0, or None: no cap). ``fastgrpo.ops.head_transform(model)`` reads them from a transformers model.

    Returns:
        logp (``targets.shape``, fp32; NaN at an out-of-range target, see ``targets``), or
        (logp, entropy) with ``return_entropy``; both are differentiable w.r.t. hidden, weight
        and bias.
    """
    checks.check_temperature(temperature)
    grad_filter_eps = checks.check_grad_filter_eps(grad_filter_eps)
    scale, softcap = _check_head_transform(logit_scale, final_logit_softcapping)
    checks.check_head(hidden, weight, targets, bias)
    impl = route(impl, hidden.device, loss=False)
    checks.check_targets_range(targets, weight.shape[0])
    checks.check_workspace_bytes(workspace_bytes)
    hidden, weight, bias = _cast_for_autocast(hidden, weight, bias)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    head = (float(temperature), scale, softcap)
    logp, entropy = _logprobs_impl(hidden2d, weight, bias, targets, None, head, impl, grad_filter_eps, workspace_bytes)
    return (logp, entropy) if return_entropy else logp


@torch.no_grad()
def masked_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    impl: str = "auto",
    workspace_bytes: int | None = None,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> torch.Tensor:
    """(B, T) fp32 softmax entropy at the positions ``mask`` sets, 0 elsewhere, without gradient: one
    lm_head pass over those positions only (what TRL's ``top_entropy_quantile`` mask reads).

    Args:
        hidden: (B, T, H) fp32/fp16/bf16; weight: (V, H), same dtype; bias: (V,) or None.
        targets: (B, T) int32/int64, in [0, V) where ``mask`` is set (elsewhere any id, e.g. -100).
        mask: (B, T) bool or 0/1.
        temperature, impl, workspace_bytes, logit_scale, final_logit_softcapping: as ``chunked_logprobs``.
    """
    active = mask != 0
    _, ent = chunked_logprobs(
        hidden[active], weight, targets[active], bias=bias, temperature=temperature, return_entropy=True,
        impl=impl, workspace_bytes=workspace_bytes, logit_scale=logit_scale,
        final_logit_softcapping=final_logit_softcapping,
    )  # fmt: skip
    return torch.zeros(active.shape, dtype=ent.dtype, device=ent.device).masked_scatter(active, ent)


@dataclasses.dataclass(frozen=True)
class _Knobs:
    """How the loss is computed (not what): checked once, shared by the function and the module."""

    impl: str = "auto"
    grad_filter_eps: float = 0.0
    workspace_bytes: int | None = None
    grad_accumulation: str = "fp32"

    def __post_init__(self):
        _check_impl(self.impl)
        checks.check_grad_accumulation(self.grad_accumulation)
        object.__setattr__(self, "grad_filter_eps", checks.check_grad_filter_eps(self.grad_filter_eps))
        checks.check_workspace_bytes(self.workspace_bytes)


def _records(given: dict) -> tuple[LossTensors, GRPOLossParams, _Knobs]:
    """``fused_grpo_loss``'s arguments, read by name into the records the call runs on (knobs checked first)."""
    knobs = _Knobs(**{f.name: given[f.name] for f in dataclasses.fields(_Knobs)})
    params = GRPOLossParams(**{f.name: given[f.name] for f in dataclasses.fields(GRPOLossParams)})
    tensors = LossTensors(**{name: given[name] for name in LossTensors._fields})
    return tensors, params, knobs


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
    importance_sampling_ratio: torch.Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    impl: str = "auto",
    grad_filter_eps: float | None = 0.0,
    workspace_bytes: int | None = None,
    grad_accumulation: str = "fp32",
) -> GRPOLossOutput:
    """GRPO-family loss straight from final hidden states and the lm_head weight.

    Semantics match TRL 1.16's ``GRPOTrainer._compute_loss`` (one process, no gradient accumulation;
    ``fastgrpo.integrations.trl`` adds TRL's accumulation and multi-process normalizers). Masked tokens cost no
    FLOPs, and their ``logprobs``/``entropy`` are returned as 0. Every tensor may be a strided view (``(T, B)``
    tensors' ``.t()``, ``ids[:, ::2]``, ``expand``, ``b[::2]``, hidden transposed from (T, B, H)): each path honours
    the strides or copies the O(N) / O(V) vectors at the kernel's boundary; hidden and weight are never copied.

    Args:
        hidden: (B, T, H) fp32/fp16/bf16 hidden states at the positions that predict ``targets``.
        weight: (V, H) lm_head weight, same dtype and device as hidden.
        targets: (B, T) int32/int64 completion token ids, in [0, V) where ``mask`` is set (masked tokens may hold
            any id, e.g. -100). Eagerly an id outside [0, V) where ``mask`` is set raises ValueError; under
            ``torch.compile`` (which skips that check, it reads data back) such a token's logprob, the loss and the
            gradients are NaN, on every path: never a plausible finite number, never an out-of-bounds read.
        mask: (B, T) bool, integer or float with 0/1 values: completion tokens that count.
        advantages: (B,) per sequence or (B, T) per token, float, finite.
        old_logprobs: (B, T) float log-probs of the sampling policy; None = current (ratio 1).
        ref_logprobs: (B, T) float reference-policy log-probs; required when ``beta > 0``.
        bias: (V,) lm_head bias or None.
        temperature: logits are divided by it before the softmax (> 0).
        beta: weight of the k3 KL term (>= 0).
        epsilon, epsilon_high: clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high None = epsilon.
        delta: cap on the unclipped ratio (two-sided clipping) or None.
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo" or "vespo" (a detached gamma weight
            of each row's sequence ratio on the log-prob's gradient; it couples a row's tokens: the 4-pass route).
        importance_sampling_level: "token", or "sequence" (GSPO: masked mean log-ratio per row).
        max_completion_length: dr_grpo's normalizer (required for dr_grpo).
        num_items_in_batch: dapo/cispo normalizer, e.g. completion tokens of the whole generation batch when it
            is split into micro-batches (default: masked tokens here).
        use_bias_correction_kl: multiply the KL by the importance ratio.
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures.
        importance_sampling_ratio: (B, T) or (B, 1) float, finite and >= 0 where ``mask``, or None: multiplies
            each token's policy term (not its KL), as TRL applies its truncated pi_old / pi_sampler correction
            (``vllm_importance_sampling_correction``). Treated as a constant.
        off_policy_mask_threshold: float or None: TRL's off-policy sequence masking (DeepSeek-V3.2): a row
            whose advantage is negative and whose masked mean of log pi_sampling - log pi exceeds it loses its
            policy term (not its KL). Its sequence mean couples a row's tokens: the 4-pass route.
        sampling_logprobs: (B, T) float log-probs of the sampler, read by the off-policy mask only; None:
            ``old_logprobs``, else the current policy's (detached).
        entropy_coef: the entropy bonus: the loss minus entropy_coef times the mean entropy over the loss tokens
            (those ``entropy_mask`` keeps), whatever the loss type's normalizer, as TRL's ``entropy_coef``; its
            gradient flows on every path. 0 = off.
        entropy_mask: (B, T) bool or 0/1, or None: TRL's ``top_entropy_quantile`` mask (the loss tokens at or
            above an entropy quantile, e.g. from ``masked_entropy``): the policy term and the entropy bonus act
            only where it is set; the KL acts on every loss token.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma weight
            phi(w) = e^lambda w^k e^(-lambda w) for advantages >= 0 and < 0. Under "vespo" the
            ``importance_sampling_ratio`` enters w (the masked sum of its logs) instead of multiplying the loss.
        logit_scale, final_logit_softcapping: the model's head transform, as ``chunked_logprobs`` takes it.
        impl: one of ``IMPLS`` (module docstring); ``route`` tells which path runs.
        grad_filter_eps: in [0, 1): skip the backward GEMMs of vocabulary tiles whose d loss / d logits is below
            eps times the token's gradient scale (Cut Cross-Entropy's gradient filtering). 0 or None = off
            (exact); 2**-12 suits bf16. Fused path only: the others ignore it and return exact gradients.
        workspace_bytes: int > 0 or None: bound on the chunked path's logits workspace (at least one token's row,
            V x element size). None: 1 GiB, capped on CUDA by the memory budget. The torch twin takes it as its
            chunk's fp32 logits bound (None: 64 MiB).
        grad_accumulation: "fp32" or "input": how the chunked path sums dWeight over token chunks (module
            docstring); the other paths ignore it.

    Returns:
        GRPOLossOutput(loss, logprobs, entropy, metrics) (loss and logprobs NaN at an out-of-range target, see
        ``targets``); metrics has ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean``, ``kl`` (when ``ref_logprobs`` is given), ``cispo_clip_ratio`` (cispo),
        ``vespo/phi_seq_mean`` (vespo) and
        ``policy_loss`` (the loss without the entropy bonus, when ``entropy_coef`` is nonzero).
    """
    tensors, params, knobs = _records(locals())  # the signature's names are the records' fields
    return _fused_grpo_loss(tensors, params, num_items_in_batch, knobs)[0]


def _fused_grpo_loss(
    x: LossTensors, params: GRPOLossParams, num_items_in_batch, knobs: _Knobs
) -> tuple[GRPOLossOutput, str]:
    """Check, route, run: (the output, the path that ran)."""
    num_items_in_batch = checks.check_loss_inputs(
        x.hidden, x.weight, x.targets, x.mask, x.advantages, x.old_logprobs, x.ref_logprobs, x.bias, params.beta,
        num_items_in_batch, x.sampling_logprobs, x.entropy_mask,
    )  # fmt: skip
    B, T = x.targets.shape
    H, V = x.hidden.shape[-1], x.weight.shape[0]
    hidden, weight, bias = _cast_for_autocast(x.hidden, x.weight, x.bias)  # route by the dtype that runs
    x = x._replace(hidden=hidden, weight=weight, bias=bias)
    path = route(
        knobs.impl, hidden.device, importance_sampling_level=params.importance_sampling_level, shape=(B * T, H, V),
        dtype=hidden.dtype, trainable_head=weight.requires_grad, workspace_bytes=knobs.workspace_bytes,
        grad_accumulation=knobs.grad_accumulation, couples_rows=params.couples_rows,
    )  # fmt: skip
    checks.check_sampling_ratio(x.importance_sampling_ratio, x.targets)
    active = x.mask != 0
    n_active = checks.check_loss_values(
        x.mask, active, x.advantages, num_items_in_batch, x.targets, V, x.importance_sampling_ratio, x.entropy_mask
    )
    if path == "chunked":
        workspace_bytes = _workspace(knobs.workspace_bytes, hidden.device)
        loss, logp, entropy, metrics = chunked_grpo_loss(
            x._replace(mask=active),
            params,
            num_items_in_batch,
            workspace_bytes,
            grad_accumulation=knobs.grad_accumulation,
            n_active=n_active,
        )
        return GRPOLossOutput(loss, logp, entropy, metrics), path
    head = (params.temperature, params.logit_scale, params.final_logit_softcapping)
    logp, entropy = _logprobs_impl(
        hidden.reshape(B * T, H), weight, bias, x.targets, active, head, path, knobs.grad_filter_eps,
        knobs.workspace_bytes,
    )  # fmt: skip
    loss, metrics = grpo_loss_from_logprobs(
        logp, entropy, active, x.advantages, x.old_logprobs, x.ref_logprobs, params, num_items_in_batch,
        x.importance_sampling_ratio, x.sampling_logprobs, x.entropy_mask,
    )  # fmt: skip
    return GRPOLossOutput(loss, logp.detach(), entropy.detach(), metrics), path


class FusedGRPOLoss(torch.nn.Module):
    """``fused_grpo_loss`` with its hyper-parameters held by the module.

    Keyword arguments are those of ``fused_grpo_loss`` after ``advantages`` (less the tensors).
    ``impl``, ``grad_filter_eps``, ``workspace_bytes`` and ``grad_accumulation`` (implementation knobs, not loss
    semantics) are kept on the module; the loss hyper-parameters go into ``self.params``.
    ``last_route`` is the path (one of ``ROUTES``) the latest call ran, None before any. ``forward``'s
    ``params`` replaces ``self.params`` for one call (a coefficient that changes during training, such as
    an adaptive ``entropy_coef``).
    """

    def __init__(
        self,
        *,
        impl: str = "auto",
        grad_filter_eps: float | None = 0.0,
        workspace_bytes: int | None = None,
        grad_accumulation: str = "fp32",
        **hyper,
    ):
        super().__init__()
        self.knobs = _Knobs(impl, grad_filter_eps, workspace_bytes, grad_accumulation)
        unknown = set(hyper) - {f.name for f in dataclasses.fields(GRPOLossParams)}
        if unknown:
            valid = sorted(f.name for f in dataclasses.fields(GRPOLossParams))
            raise TypeError(f"unknown FusedGRPOLoss arguments {sorted(unknown)}; valid: {valid}")
        self.params = GRPOLossParams(**hyper)
        self.last_route: str | None = None

    @property
    def impl(self) -> str:
        return self.knobs.impl

    @property
    def grad_filter_eps(self) -> float:
        return self.knobs.grad_filter_eps

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
        importance_sampling_ratio=None,
        sampling_logprobs=None,
        entropy_mask=None,
        *,
        params: GRPOLossParams | None = None,
    ) -> GRPOLossOutput:
        tensors = LossTensors(
            hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, bias, importance_sampling_ratio,
            sampling_logprobs, entropy_mask,
        )  # fmt: skip
        if params is not None and not isinstance(params, GRPOLossParams):
            raise TypeError(f"params must be a GRPOLossParams or None, got {type(params).__name__}")
        params = self.params if params is None else params
        out, self.last_route = _fused_grpo_loss(tensors, params, num_items_in_batch, self.knobs)
        return out

    def extra_repr(self) -> str:
        k = self.knobs
        return (
            f"impl={k.impl!r}, grad_filter_eps={k.grad_filter_eps}, workspace_bytes={k.workspace_bytes}, "
            f"grad_accumulation={k.grad_accumulation!r}, {self.params}"
        )
