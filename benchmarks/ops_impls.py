"""The GRPO loss implementations ``fastgrpo bench ops`` compares, all on the same inputs.

Every implementation computes the same loss (DAPO token mean, beta = 0.04 against reference
log-probs, epsilon = 0.2, epsilon_high = 0.28, temperature 1) from the final hidden states and
the lm_head weight, and is differentiated w.r.t. hidden (and weight, for a trainable head).
Where a peer only provides per-token log-probs, the shared O(N) epilogue
``fastgrpo.grpo_loss_from_logprobs`` turns them into the loss, so the rows differ only in how
the O(N x V) part is done. A peer whose package is missing raises ``Missing``; the caller
reports it in the row.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import torch

import fastgrpo
from fastgrpo.ops.loss import GRPOLossParams, grpo_loss_from_logprobs
from fastgrpo.ops.reference import reference_logprobs

HYPER = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
PARAMS = GRPOLossParams(**HYPER)
GRAD_FILTER_EPS = 2.0**-12  # bf16's resolution near 1, Cut Cross-Entropy's default filter
TRL_VOCAB_CHUNK = 32768  # TRL's GRPOTrainer default for the chunked log-prob path


# Implementations whose forward already computes the gradients (the backward only scales them):
# their bwd row is not measured and their fwd row is held to the whole fwd+bwd floor.
GRADS_IN_FORWARD = frozenset({"liger-fused-linear", "fastgrpo-chunked", "fastgrpo-chunked-input-acc"})


class Missing(Exception):
    """The implementation cannot run here (package not installed, needs CUDA)."""


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor  # (B, T, H), requires grad
    weight: torch.Tensor  # (V, H); requires grad iff the head is trainable
    targets: torch.Tensor  # (B, T) int64
    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,) fp32
    old: torch.Tensor  # (B, T) fp32 sampling-policy log-probs
    ref: torch.Tensor  # (B, T) fp32 reference log-probs

    @property
    def grad_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden, self.weight) if self.weight.requires_grad else (self.hidden,)


def make_inputs(H, V, N, rows, dtype, device, seed=0, pad_frac=0.0, p_target=0.6) -> Inputs:
    """A batch whose softmax looks like a policy scoring its own samples.

    Weight rows are ~N(0, I/H) (unit norm); hidden = gap * w[target] + N(0, I), so every
    logit is ~N(0, 1) except the target's, which sits ``gap`` higher, with gap chosen so the
    target's mean probability is about ``p_target``. Flat random inputs would make every
    vocabulary tile's softmax mass negligible-but-equal, which neither real models nor
    gradient filtering see. ``pad_frac`` > 0 right-pads each row by a random 0..2*pad_frac.
    """
    B = rows if N % rows == 0 else 1
    T = N // B
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(V, H, generator=g, device=device).div_(math.sqrt(H)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g, device=device)
    # log-sum-exp of V standard normal logits is about log V + 1/2
    gap = math.log(V) + 0.5 + math.log(p_target / (1 - p_target))
    hidden = torch.randn(B, T, H, generator=g, device=device)
    hidden.add_(weight[targets].float(), alpha=gap)
    hidden = hidden.to(dtype).requires_grad_()
    pad = (torch.rand(B, 1, generator=g, device=device) * 2 * pad_frac * T).long()
    mask = torch.arange(T, device=device)[None, :] < T - pad
    advantages = torch.randn(B, generator=g, device=device)
    with torch.no_grad():  # old/ref near the current policy, so the clip and KL terms are live
        logp = fastgrpo.chunked_logprobs(hidden, weight, targets, impl="torch")
        noise = torch.randn(2, B, T, generator=g, device=device) * 0.1
    old = torch.where(mask, logp + noise[0], 0.0)
    ref = torch.where(mask, logp + noise[1], 0.0)
    return Inputs(hidden, weight.requires_grad_(), targets, mask, advantages, old, ref)


def epilogue(logp, entropy, mask, advantages, old, ref) -> torch.Tensor:
    """The shared O(N) GRPO loss on (B, T) per-token log-probs; entropy (metrics only) may be None."""
    entropy = torch.zeros_like(logp) if entropy is None else entropy
    return grpo_loss_from_logprobs(logp, entropy, mask, advantages, old, ref, PARAMS)[0]


def _naive_loss(hidden, weight, targets, mask, advantages, old, ref):
    logp, _ = reference_logprobs(hidden, weight, targets, with_entropy=False)  # full logits, log_softmax, gather
    return epilogue(logp, None, mask, advantages, old, ref)


def _tensors(x: Inputs):
    return x.hidden, x.weight, x.targets, x.mask, x.advantages, x.old, x.ref


def _needs_triton(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise Missing("skipped: needs CUDA (or TRITON_INTERPRET=1 on CPU)")


def _fastgrpo(impl: str, **extra) -> Callable[[Inputs, str], Callable[[], torch.Tensor]]:
    def build(x: Inputs, mode: str):
        if impl == "fused":
            _needs_triton(x.hidden.device)
        args = (x.hidden, x.weight, x.targets, x.mask, x.advantages)
        return lambda: (
            fastgrpo.fused_grpo_loss(*args, old_logprobs=x.old, ref_logprobs=x.ref, impl=impl, **HYPER, **extra).loss
        )

    return build


def _naive(x: Inputs, mode: str):
    return lambda: _naive_loss(*_tensors(x))


def configure_compile(recompile_limit: int = 64) -> None:
    """Once per process, before anything compiles (``naive-compile``, Liger's compiled chunks).

    Dynamo counts recompiles per code object and silently runs eagerly past its limit, which
    would mislabel the compiled rows of a long run: the limit is raised. AOTAutograd donates the
    compiled backward's saved buffers by default and then refuses a repeated backward of one
    graph, which the bwd rows time: donation is turned off, which can only raise the compiled
    rows' peak memory a little.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), recompile_limit))
    torch._functorch.config.donated_buffer = False


_compiled_naive = None


def _naive_compiled(x: Inputs, mode: str):
    global _compiled_naive
    if _compiled_naive is None:  # one compiled function for every shape and head of a run
        _compiled_naive = torch.compile(_naive_loss)
    compiled = _compiled_naive
    return lambda: compiled(*_tensors(x))


def _liger_fused_linear(x: Inputs, mode: str):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Missing(f"missing: liger-kernel ({e})") from None
    # Liger compiles its per-chunk step with torch.compile by default; on CPU that needs a
    # C++ toolchain and minutes of compiling for a smoke test, so it runs eagerly there.
    loss = LigerFusedLinearGRPOLoss(
        beta=PARAMS.beta,
        compiled=x.hidden.device.type == "cuda",
        epsilon_low=PARAMS.epsilon_low,
        epsilon_high=PARAMS.epsilon_high_resolved,
        loss_type=PARAMS.loss_type,
        temperature=1.0,
    )
    return lambda: loss(
        x.hidden, x.weight, x.targets, x.mask, x.advantages, ref_per_token_logps=x.ref, old_per_token_logps=x.old
    )[0]


def _liger_triton(x: Inputs, mode: str):
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as e:
        raise Missing(f"missing: liger-kernel ({e})") from None
    _needs_triton(x.hidden.device)

    def loss_fn():
        # Liger takes logits for T + 1 positions and drops the last: one extra row per sequence.
        logits = torch.cat([x.hidden, x.hidden[:, -1:]], dim=1) @ x.weight.T
        loss, _ = triton_grpo_loss(
            logits,
            x.old,
            x.ref,
            x.targets,
            x.advantages,
            x.mask,
            temperature=1.0,
            beta=PARAMS.beta,
            eps_low=PARAMS.epsilon_low,
            eps_high=PARAMS.epsilon_high_resolved,
            loss_type=PARAMS.loss_type,
            reduce=True,
            # In-place (Liger's default) writes d logits over the saved logits, so the bwd row's
            # repeated backward of one graph needs the out-of-place variant (one more logits buffer).
            inplace=mode != "bwd",
        )
        return loss

    return loss_fn


def _trl_chunked(x: Inputs, mode: str):
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise Missing(f"missing: trl>=1.16 ({e})") from None
    m = x.mask

    def loss_fn():
        # As TRL's GRPOTrainer calls it: only the scored positions, log-probs and entropy.
        out = ChunkedLogProbFunction.apply(
            x.hidden[m], x.weight, None, x.targets[m], 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("entropy",)
        )
        logp, entropy = (t.new_zeros(m.shape).masked_scatter(m, t) for t in out[:2])
        return epilogue(logp, entropy.detach(), x.mask, x.advantages, x.old, x.ref)

    return loss_fn


# name -> builder(inputs, mode) -> loss closure. The order is the run order: naive first, since it is
# the yardstick the others are checked against (fastgrpo-torch where naive does not fit).
IMPLS: dict[str, Callable[[Inputs, str], Callable[[], torch.Tensor]]] = {
    "naive": _naive,
    "fastgrpo-torch": _fastgrpo("torch"),
    "fastgrpo-chunked": _fastgrpo("chunked"),
    # dWeight summed in the weight's dtype over token chunks (issue 26): beside the fp32 row, one window times both.
    "fastgrpo-chunked-input-acc": _fastgrpo("chunked", grad_accumulation="input"),
    "fastgrpo-fused": _fastgrpo("fused"),
    "fastgrpo-fused-filter": _fastgrpo("fused", grad_filter_eps=GRAD_FILTER_EPS),
    "naive-compile": _naive_compiled,
    "liger-fused-linear": _liger_fused_linear,
    "liger-triton": _liger_triton,
    "trl-chunked": _trl_chunked,
}
REFERENCES = ("naive", "fastgrpo-torch")  # where the float64 reference does not fit


def float64_reference(x: Inputs, chunk_bytes: int = 1 << 30) -> tuple[torch.Tensor, ...]:
    """(loss, dHidden[, dWeight]) of the benchmark loss in float64, as CPU copies: what every row's
    errors are measured against.

    Logits in float64 one token chunk (``chunk_bytes``) at a time, each chunk checkpointed, so the
    backward recomputes it instead of keeping N x V. A 16-bit naive row is no reference: it rounds
    every logit to bf16 (0.06 apart near a target logit of ~13), which moves its log-probs, ratios
    and gradients by a few per cent; a path that keeps logits in fp32 then looks that far off (seen
    on an H200, benchmarks/NOTES.md).
    """
    from torch.utils.checkpoint import checkpoint

    h = x.hidden.detach().double().requires_grad_()
    w = x.weight.detach().double().requires_grad_(x.weight.requires_grad)
    flat_h, flat_y = h.reshape(-1, h.shape[-1]), x.targets.reshape(-1)
    step = max(1, chunk_bytes // (8 * w.shape[0]))
    parts = [
        checkpoint(_logp64, flat_h[s : s + step], w, flat_y[s : s + step], use_reentrant=False)
        for s in range(0, flat_h.shape[0], step)
    ]
    logp = torch.cat(parts).view(x.targets.shape)
    loss = epilogue(logp, None, x.mask, x.advantages.double(), x.old.double(), x.ref.double())
    grads = torch.autograd.grad(loss, (h, w) if w.requires_grad else (h,))
    return tuple(t.detach().cpu() for t in (loss, *grads))


def _logp64(hidden, weight, targets):
    return reference_logprobs(hidden, weight, targets, compute_dtype=torch.float64, with_entropy=False)[0]


FLOOR = "gemm-floor"


def floor_fns(x: Inputs, chunk: int) -> dict[str, Callable[[], None]]:
    """The bare lm_head GEMMs a fused loss cannot avoid, per mode, on ``chunk``-token slices.

    Forward: logits. Backward: logits again (a fused kernel recomputes them instead of storing
    N x V), dHidden, and dWeight for a trainable head. ``3gemm``: logits, dHidden and dWeight
    once each, the floor of a path that forms its gradients in the forward. Only masked-in
    tokens count.
    """
    h = x.hidden.detach()[x.mask]
    w = x.weight.detach()
    trainable = x.weight.requires_grad
    buf = h.new_empty(min(chunk, h.shape[0]), w.shape[0])
    dh, dw = torch.empty_like(h), (torch.empty_like(w) if trainable else None)

    def forward():
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            torch.mm(hc, w.T, out=buf[: hc.shape[0]])

    def backward():
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            z = torch.mm(hc, w.T, out=buf[: hc.shape[0]])
            torch.mm(z, w, out=dh[s : s + chunk])
            if trainable:
                dw.addmm_(z.T, hc, beta=0.0 if s == 0 else 1.0)

    def both():
        forward()
        backward()

    def grads_in_forward():
        for s in range(0, h.shape[0], chunk):
            hc = h[s : s + chunk]
            z = torch.mm(hc, w.T, out=buf[: hc.shape[0]])
            torch.mm(z, w, out=dh[s : s + chunk])
            if trainable:
                dw.addmm_(z.T, hc, beta=0.0 if s == 0 else 1.0)

    return {"fwd": forward, "bwd": backward, "fwd+bwd": both, "3gemm": grads_in_forward}


def floor_passes(mode: str, trainable: bool) -> int:
    """GEMM passes of 2*N*H*V FLOPs in ``floor_fns``' mode."""
    backward = 3 if trainable else 2
    return {"fwd": 1, "bwd": backward, "fwd+bwd": 1 + backward, "3gemm": backward}[mode]
