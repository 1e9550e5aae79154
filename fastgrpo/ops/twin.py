"""Pure-PyTorch twin of ``fastgrpo.kernels.linear_logprobs`` (``impl="torch"``): same interface, any device.

Logits exist one token chunk at a time (chunk x V fp32, bounded by ``CHUNK_BYTES``); the
backward recomputes them per chunk. Inactive tokens and tokens whose upstream coefficients
are zero are compacted away, so they cost no FLOPs here either.
"""

from __future__ import annotations

import torch

from ..kernels._args import logit_scales, nan_where_invalid

# Upper bound on the fp32 logits of one chunk; a few temporaries of this size are live at once.
CHUNK_BYTES = 64 << 20


def extra_bytes(N, H, V, dtype, *, trainable_head=True) -> int:
    """Memory the twin holds beyond its inputs: a few fp32 logits chunks, plus fp32 dWeight."""
    return 3 * min(CHUNK_BYTES, max(N, 1) * V * 4) + (4 * V * H if trainable_head else 0)


# The kernels' rule for a target outside [0, V) (``fastgrpo.kernels._args``; ``nan_where_invalid`` is its
# gradient half): the host check is skipped under torch.compile, and a gather at such an id raises on CPU and
# asserts on CUDA, so the twins read a clamped id and report NaN instead.
def clamp_targets(targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 ids clamped into [0, vocab), bool: whether each id was in range)."""
    return targets.long().clamp(0, vocab - 1), (targets >= 0) & (targets < vocab)


def _chunk_tokens(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _scaled_logits(hidden, weight, bias, scales):
    """fp32 (chunk, V) transformed logits; in-place steps keep one chunk-sized buffer alive."""
    z = (hidden @ weight.T).float()
    if bias is not None:
        z.add_(bias)
    return transform_(z, scales)


# The kernels' logit transform (``fastgrpo.kernels._tiles``: ``_transform``, ``_chain``) restated in torch,
# so the torch paths stay inside ``fastgrpo.ops``; its parameters come from ``logit_scales``.
def transform_(z: torch.Tensor, scales: tuple[float, float]) -> torch.Tensor:
    """fp32 z (+ bias) as the softmax sees it, in place: z * inv_temp, or inv_temp * tanh(softcap * z)."""
    inv_temp, softcap = scales
    if softcap:
        z.mul_(softcap).tanh_()
    return z.mul_(inv_temp)


def chain_factor(u: torch.Tensor, scales: tuple[float, float]) -> float | torch.Tensor:
    """d u / d z of ``transform_``'s output u: inv_temp, or (a new tensor) inv_temp * softcap * (1 - tanh^2)."""
    inv_temp, softcap = scales
    if not softcap:
        return inv_temp
    t = u / inv_temp
    return t.mul_(t).neg_().add_(1.0).mul_(inv_temp * softcap)


class _TwinLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, active, scales, chunk_bytes):
        N = hidden.shape[0]
        logp = hidden.new_zeros(N, dtype=torch.float32)
        lse = torch.zeros_like(logp)
        entropy = torch.zeros_like(logp)
        rows = torch.arange(N, device=hidden.device) if active is None else active.nonzero().squeeze(1)
        step = _chunk_tokens(weight.shape[0], chunk_bytes)
        for idx in rows.split(step):
            logp_all = _scaled_logits(hidden[idx], weight, bias, scales)
            lz = torch.logsumexp(logp_all, dim=-1)
            logp_all.sub_(lz[:, None])
            # As the kernels do: an id outside [0, V) reads in bounds and reports NaN (the host
            # check is skipped under torch.compile; a CUDA gather would assert instead).
            y, ok = clamp_targets(targets[idx], logp_all.shape[1])
            logp[idx] = torch.where(ok, logp_all.gather(1, y[:, None]).squeeze(1), float("nan"))
            lse[idx] = lz
            # p * log p, with 0 * -inf (a -inf bias: a banned token) counted as 0.
            plogp = logp_all.exp().mul_(logp_all).nan_to_num_(nan=0.0)
            entropy[idx] = -plogp.sum(-1)
            del logp_all, plogp
        ctx.save_for_backward(hidden, weight, bias, targets, active, lse, entropy)
        ctx.scales, ctx.chunk_bytes = scales, chunk_bytes
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, active, lse, entropy = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        g_lp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        g_ent = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float()
        if active is not None:
            # Inactive outputs are the constant 0: whatever flows into them is dropped here.
            g_lp, g_ent = torch.where(active, g_lp, 0.0), torch.where(active, g_ent, 0.0)
        V = weight.shape[0]
        g_lp = nan_where_invalid(g_lp, targets, V)
        rows = ((g_lp != 0) | (g_ent != 0)).nonzero().squeeze(1)
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_db else None
        for idx in rows.split(_chunk_tokens(weight.shape[0], ctx.chunk_bytes)):
            h = hidden[idx]
            # dz = du/dz * (g_lp * (onehot - p) - g_ent * p * (log p + entropy)), built in place
            # in two chunk-sized buffers (three with a softcap: du/dz varies).
            dz = _scaled_logits(h, weight, bias, ctx.scales)
            du = chain_factor(dz, ctx.scales)
            dz.sub_(lse[idx, None])
            p = dz.exp()
            dz.add_(entropy[idx, None]).mul_(p).nan_to_num_(nan=0.0).mul_(-g_ent[idx, None])
            dz.addcmul_(p, g_lp[idx, None], value=-1.0)
            del p
            dz.scatter_add_(1, clamp_targets(targets[idx], V)[0][:, None], g_lp[idx, None])
            dz = dz.mul_(du).to(hidden.dtype)
            del du
            if need_dh:
                dh[idx] = dz @ weight
            if need_dw:
                # A GEMM in the input dtype (fp32 accumulation on GPUs); chunks sum in fp32.
                dw.add_(dz.T @ h)
            if need_db:
                db += dz.float().sum(0)
        return (
            dh,
            dw.to(weight.dtype) if need_dw else None,
            db.to(bias.dtype) if need_db else None,
            None,
            None,
            None,
            None,
        )


def linear_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    active: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_bytes: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked lm_head log-probs and entropies; inputs are validated by ``fastgrpo.ops``.

    Args:
        hidden: (N, H) fp32/fp16/bf16.
        weight: (V, H), same dtype and device.
        bias: (V,) same dtype, or None.
        targets: (N,) int32/int64 in [0, V) wherever ``active``. An active target outside it gets
            logp = NaN and makes the gradients NaN, as in the kernels; inactive ones may hold any id.
        active: (N,) bool or None; inactive tokens cost no FLOPs and get logp = entropy = 0.
        temperature: logits are divided by it before the softmax.
        chunk_bytes: bound on one chunk's fp32 logits (default: the module's ``CHUNK_BYTES``).
        logit_scale, softcap: the head's logit transform before the temperature: z * logit_scale, or with a
            softcap softcap * tanh(z * logit_scale / softcap) (``logit_scales``).

    Returns:
        (logp, entropy), each (N,) fp32, differentiable w.r.t. hidden, weight and bias.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    scales = logit_scales(float(temperature), float(logit_scale), None if softcap is None else float(softcap))
    return _TwinLinearLogprobs.apply(hidden, weight, bias, targets, active, scales, chunk_bytes)
