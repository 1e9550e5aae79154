"""The 3-GEMM path (``impl="chunked"``): gradients formed in the forward, bounded workspace.

With token-level importance sampling the loss is sum_t w_t * l_t(logp_t), where the weights w
depend on the mask only (``token_weights``) and each token's loss on its own log-prob only
(``token_terms``). So d loss / d logp of a token is known as soon as its log-prob is, and the
logits of a token chunk are needed exactly once. Per chunk of active tokens:

1. logits = hidden_chunk @ W^T (cuBLAS), into a workspace of at most ``workspace_bytes``;
2. ``row_stats``: log Z, logp, entropy (one read); g = d loss / d logp by autograd on the
   chunk's per-token loss (O(chunk) elementwise work, the same formulas as every path);
3. ``row_grad_``: d loss / d logits over the logits, in place;
4. dHidden_chunk = dz @ W, and dW += dz^T @ hidden_chunk into fp32 (cuBLAS).

Three GEMMs in all, against four for a forward-then-recompute backward. The backward only
scales the stored gradients by the upstream gradient. The cost is memory held from forward to
backward: dHidden (N x H) and dW (V x H, plus its fp32 accumulator during the forward); ``auto``
weighs it against the budget. Sequence-level ratios (GSPO) couple a row's tokens, so they take
the 4-pass route (``route``).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from ..kernels._args import logit_scales, nan_where_invalid
from ..kernels._gemm import accumulate_mm
from .loss import GRPOLossParams, entropy_weights, grpo_loss_from_logprobs, policy_scale, token_terms, token_weights
from .tensors import LossTensors
from .twin import chain_factor, clamp_targets, transform_

# Default bound on the logits workspace of one chunk.
WORKSPACE_BYTES = 1 << 30


def _rows_impl(device: torch.device) -> str:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return "triton" if device.type == "cuda" or (device.type == "cpu" and interpreting) else "torch"


def row_cost(vocab: int, dtype: torch.dtype, rows_impl: str) -> int:
    """Bytes of chunk-sized memory per token: the workspace row, plus the twin's fp32 temporaries (u and p, and a
    softcap's d u / d z)."""
    elem = torch.finfo(dtype).bits // 8
    return vocab * (elem if rows_impl == "triton" else elem + 12)


def extra_bytes(
    N, H, V, dtype, *, trainable_head=True, workspace_bytes=WORKSPACE_BYTES, grad_accumulation="fp32"
) -> int:
    """Memory this path holds beyond its inputs: workspace, dHidden, and dWeight when the head is trainable
    (the copy kept for the backward, plus the fp32 accumulator unless it sums in a 16-bit weight's dtype)."""
    elem = torch.finfo(dtype).bits // 8
    work = min(workspace_bytes, max(N, 1) * row_cost(V, dtype, "triton"))
    acc = 0 if _sums_in_place(dtype, grad_accumulation) else 4
    return work + N * H * elem + (V * H * (acc + elem) if trainable_head else 0)


def _sums_in_place(dtype: torch.dtype, grad_accumulation: str) -> bool:
    """dWeight sums straight into its own dtype: asked for ("input"), or already fp32."""
    return grad_accumulation == "input" or dtype == torch.float32


def balanced_chunks(n: int, max_rows: int) -> int:
    """Rows per chunk for ``n`` tokens: the fewest chunks of at most ``max_rows``, split evenly (no small
    tail chunk: its GEMMs would waste most of their last row tile), rounded up to a multiple of 64
    where that stays within ``max_rows`` and leaves the last chunk at least half as long."""
    if n <= 0:
        return max_rows
    chunks = -(-n // max_rows)
    per = -(-n // chunks)
    aligned = -(-per // 64) * 64
    tail = n - aligned * (chunks - 1)
    # The rounding must not bring the tiny tail back (n = 130 at 128: 65 + 65, not 128 + 2).
    return aligned if aligned <= max_rows and 2 * tail >= aligned else per


def _active_indices(active: torch.Tensor, n_active: int | None) -> torch.Tensor:
    """(n,) int64 positions of the True entries of the (N,) ``active``. With the count already read back,
    ``nonzero_static`` gathers them without a sync (CUDA since torch 2.6; an empty input crashed it before
    2.9, so 0 is handled here); ``nonzero`` otherwise."""
    if n_active == 0:
        return torch.empty(0, dtype=torch.int64, device=active.device)
    if n_active is not None:
        try:
            return torch.nonzero_static(active, size=n_active).squeeze(1)
        except (NotImplementedError, RuntimeError):  # a torch without the device's kernel
            pass
    return active.nonzero().squeeze(1)


def chunk_rows(vocab: int, dtype: torch.dtype, workspace_bytes: int, rows_impl: str) -> int:
    cost = row_cost(vocab, dtype, rows_impl)
    if workspace_bytes < cost:
        raise ValueError(
            f"workspace_bytes={workspace_bytes} is below one token's logits row ({cost} bytes at V={vocab}, "
            f"{dtype}); unless given, it is min(1 GiB, FASTGRPO_MEMORY_FRACTION of free memory): pass a larger "
            "workspace_bytes, free memory, or use impl='fused'"
        )
    return workspace_bytes // cost


def _alloc_workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The logits workspace (one place, so tests can watch its size)."""
    return torch.empty(rows, vocab, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- row twins


def _row_stats_torch(z, bias, targets, inv_temp, softcap=0.0):
    u = z.to(torch.float32, copy=True)  # never an alias: z is read again (fp32 z included)
    if bias is not None:
        u.add_(bias)
    transform_(u, (inv_temp, softcap))
    lse = torch.logsumexp(u, dim=-1)
    u.sub_(lse[:, None])
    # As the row kernel does: an id outside [0, V) reads in bounds and reports NaN.
    y, ok = clamp_targets(targets, u.shape[1])
    logp = torch.where(ok, u.gather(1, y[:, None]).squeeze(1), float("nan"))
    # p * log p with 0 * -inf (a -inf bias) counted as 0.
    entropy = -u.exp().mul_(u).nan_to_num_(nan=0.0).sum(-1)
    return logp, lse, entropy


def _row_grad_torch_(z, bias, targets, lse, grad_logp, inv_temp, entropy=None, grad_entropy=None, softcap=0.0):
    u = z.to(torch.float32, copy=True)  # never an alias: z is read again (fp32 z included)
    if bias is not None:
        u.add_(bias)
    scales = (inv_temp, softcap)
    du = chain_factor(transform_(u, scales), scales)
    logp = u.sub_(lse[:, None])
    p = logp.exp()
    g = nan_where_invalid(grad_logp, targets, u.shape[1])
    if grad_entropy is not None:
        # d entropy / d u_v = -p_v (log p_v + entropy); p_v = 0 at a banned token (log p_v = -inf) adds 0.
        ent = logp.add_(entropy[:, None]).mul_(p).nan_to_num_(nan=0.0)
        p.mul_(-g[:, None]).sub_(ent.mul_(grad_entropy[:, None]))
    else:
        p.mul_(-g[:, None])
    dz = p.scatter_add_(1, clamp_targets(targets, u.shape[1])[0][:, None], g[:, None]).mul_(du)
    return z.copy_(dz)


def _rows(impl: str):
    if impl == "triton":
        from ..kernels.logits_rows import row_grad_, row_stats

        return row_stats, row_grad_
    return _row_stats_torch, _row_grad_torch_


# ----------------------------------------------------------------------------- the chunk loop


def _token_grad(logp, old, ref, adv, weight, isr, params: GRPOLossParams) -> torch.Tensor:
    """d loss / d logp for one chunk: autograd on the per-token loss the epilogue uses."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        log_ratio = lp - (lp.detach() if old is None else old)
        live = torch.ones_like(lp, dtype=torch.bool)
        per_token, _, _ = token_terms(lp, log_ratio, ref, adv, live, params, isr)
        (grad,) = torch.autograd.grad((per_token * weight).sum(), lp)
    return grad


def _chunk_loop(
    hidden,
    weight,
    bias,
    targets,
    active,
    adv,
    old,
    ref,
    isr,
    w,
    g_ent,
    params,
    need,
    *,
    workspace_bytes,
    rows_impl,
    grad_accumulation,
    n_active,
):
    """logp, entropy (N,) fp32 and the gradients (None where not needed) of sum(w * per_token) + sum(g_ent * entropy)
    (``g_ent`` None: no entropy term)."""
    N, H = hidden.shape
    V = weight.shape[0]
    need_dh, need_dw, need_db = need
    any_grad = need_dh or need_dw or need_db
    inv_temp, softcap = logit_scales(params.temperature, params.logit_scale, params.final_logit_softcapping)
    logp = hidden.new_zeros(N, dtype=torch.float32)
    entropy = torch.zeros_like(logp)
    dh = torch.zeros_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_db else None
    stats, grad_ = _rows(rows_impl)
    idx_all = _active_indices(active, n_active)
    step = balanced_chunks(idx_all.numel(), chunk_rows(V, hidden.dtype, workspace_bytes, rows_impl))
    chunks = idx_all.split(step) if idx_all.numel() else ()
    dw = _DWeight(weight, grad_accumulation, bool(chunks)) if need_dw else None
    ws = _alloc_workspace(min(step, idx_all.numel()), V, hidden.dtype, hidden.device) if chunks else None
    for idx in chunks:
        n = idx.numel()
        h = hidden[idx]
        y = targets[idx]
        z = torch.matmul(h, weight.T, out=ws[:n])
        lp, lse, ent = stats(z, bias, y, inv_temp, softcap)
        logp[idx], entropy[idx] = lp, ent
        if not any_grad:
            continue
        old_c, ref_c, isr_c = (None if x is None else x[idx] for x in (old, ref, isr))
        g = _token_grad(lp, old_c, ref_c, adv[idx], w[idx], isr_c, params)
        dent = () if g_ent is None else (ent, g_ent[idx])
        dz = grad_(z, bias, y, lse, g, inv_temp, *dent, softcap=softcap)
        if need_dh:
            dh[idx] = dz @ weight
        if need_dw:
            dw.add(dz.T, h)
        if need_db:
            db += dz.sum(0, dtype=torch.float32)
    del ws
    return logp, entropy, dh, None if dw is None else dw.result(), db


class _DWeight:
    """dWeight summed over token chunks: in an fp32 accumulator cast once at the end, or (``"input"``
    accumulation of a 16-bit weight) straight in the weight's dtype, the first chunk written with
    beta = 0 so nothing is zero-filled, one rounding per chunk."""

    def __init__(self, weight: torch.Tensor, grad_accumulation: str, any_chunk: bool):
        self.in_place = _sums_in_place(weight.dtype, grad_accumulation)
        dtype = weight.dtype if self.in_place else torch.float32
        make = torch.empty if self.in_place and any_chunk else torch.zeros
        self.acc = make(weight.shape, device=weight.device, dtype=dtype)
        self.first = self.in_place and any_chunk
        self.dtype = weight.dtype

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.first:
            torch.mm(a, b, out=self.acc)
            self.first = False
        elif self.in_place:
            self.acc.addmm_(a, b)
        else:
            accumulate_mm(self.acc, a, b)

    def result(self) -> torch.Tensor:
        return self.acc.to(self.dtype)


class _ChunkedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, job):
        need = job.pop("need")
        logp, entropy, dh, dw, db = _chunk_loop(hidden, weight, bias, need=need, **job["loop"])
        B, T = job["shape"]
        logp2, ent2 = logp.view(B, T), entropy.view(B, T)
        loss, metrics = grpo_loss_from_logprobs(logp2, ent2, job["mask"], *job["epilogue"])
        job["metrics"] = metrics
        # dW is held in the weight's dtype (half the fp32 accumulator) until the backward.
        ctx.save_for_backward(dh, dw, None if db is None else db.to(bias.dtype))
        ctx.mark_non_differentiable(logp2, ent2)
        return loss, logp2, ent2

    @staticmethod
    @once_differentiable  # the stored gradients are constants: no double backward through them
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        dh, dw, db = ctx.saved_tensors
        return tuple(None if d is None else d * grad_loss.to(d.dtype) for d in (dh, dw, db)) + (None,)


def _needed_grads(x: LossTensors) -> tuple[bool, bool, bool]:
    """Whether dHidden, dWeight, dBias are wanted: the forward forms them before any backward asks."""
    grad = torch.is_grad_enabled()
    return (
        grad and x.hidden.requires_grad,
        grad and x.weight.requires_grad,
        grad and x.bias is not None and x.bias.requires_grad,
    )


def _flat_token_inputs(x: LossTensors, params: GRPOLossParams, num_items_in_batch) -> dict:
    """The chunk loop's per-token inputs, (B * T,) and fp32: its chunks pick tokens across rows."""
    B, T = x.targets.shape
    adv = x.advantages.to(torch.float32)
    isr = policy_scale(x.importance_sampling_ratio, x.entropy_mask, x.mask)
    g_ent = None
    if params.entropy_coef != 0.0:  # d loss / d entropy: the bonus's weights, negated
        g_ent = (-params.entropy_coef * entropy_weights(x.mask, x.entropy_mask)).reshape(-1)
    flat = {
        name: None if t is None else t.reshape(-1).to(torch.float32)
        for name, t in (("old", x.old_logprobs), ("ref", x.ref_logprobs))
    }
    return dict(
        targets=x.targets.reshape(-1),
        active=x.mask.reshape(-1),
        adv=(adv[:, None].expand(B, T) if adv.dim() == 1 else adv).reshape(-1),
        w=token_weights(x.mask, params, num_items_in_batch).reshape(-1),
        isr=None if isr is None else isr.reshape(-1),
        g_ent=g_ent,
        **flat,
    )


# The chunk loop is data-dependent host code (nonzero, split, autograd inside the forward):
# torch.compile runs it eagerly, one graph break, instead of tracing into the row kernels.
@torch.compiler.disable
def chunked_grpo_loss(
    x: LossTensors,
    params: GRPOLossParams,
    num_items_in_batch: float | torch.Tensor | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
    rows_impl: str | None = None,
    grad_accumulation: str = "fp32",
    n_active: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GRPO loss with token-level importance sampling in 3 GEMMs; inputs validated by ``fastgrpo.ops``.

    Args:
        x: the loss tensors: hidden (B, T, H) fp32/fp16/bf16; weight (V, H), same dtype and device; bias (V,)
            same dtype, or None; targets (B, T) int32/int64 in [0, V) where ``mask``; mask (B, T) bool;
            advantages (B,) or (B, T) float; old_logprobs, ref_logprobs (B, T) float or None;
            importance_sampling_ratio (B, T) or (B, 1) float correction of the policy term, or None;
            entropy_mask (B, T) bool or 0/1 (TRL's top-entropy mask) or None.
        params: loss hyper-parameters; none that couple a row's tokens (``GRPOLossParams.couples_rows``).
        num_items_in_batch: dapo/cispo normalizer, number, fp32 tensor or None.
        workspace_bytes: bound on the chunk-sized memory (the logits workspace; with the torch
            row twin, its fp32 temporaries too); at least one token's row.
        rows_impl: "triton" or "torch" row kernels; None = Triton on CUDA or under the interpreter.
        grad_accumulation: "fp32" (an fp32 dWeight accumulator) or "input" (dWeight summed in a 16-bit
            weight's own dtype, one rounding per chunk).
        n_active: the number of tokens ``mask`` sets, when the caller has read it back already (its
            checks did): the tokens are then gathered without another device-to-host sync.

    Returns:
        (loss, logp, entropy, metrics) as ``fused_grpo_loss``; logp and entropy are (B, T) fp32, 0
        where masked; the loss is differentiable w.r.t. hidden, weight and bias.
    """
    if params.couples_rows:
        raise ValueError(
            "the 3-GEMM path needs importance_sampling_level='token' and no off_policy_mask_threshold; "
            "those take the 4-pass route"
        )
    B, T = x.targets.shape
    rows_impl = _rows_impl(x.hidden.device) if rows_impl is None else rows_impl
    loop = _flat_token_inputs(x, params, num_items_in_batch)
    loop.update(
        params=params, workspace_bytes=workspace_bytes, rows_impl=rows_impl, grad_accumulation=grad_accumulation,
        n_active=n_active,
    )  # fmt: skip
    epilogue = (
        x.advantages, x.old_logprobs, x.ref_logprobs, params, num_items_in_batch, x.importance_sampling_ratio, None,
        x.entropy_mask,
    )  # fmt: skip
    job = {"need": _needed_grads(x), "shape": (B, T), "mask": x.mask, "loop": loop, "epilogue": epilogue}
    hidden2d = x.hidden.reshape(B * T, x.hidden.shape[-1])
    loss, logp, entropy = _ChunkedGRPOLoss.apply(hidden2d, x.weight, x.bias, job)
    return loss, logp, entropy, job["metrics"]
