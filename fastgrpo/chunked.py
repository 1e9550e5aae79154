"""Chunked PyTorch twin of ``fastgrpo.kernels.linear_logprobs``: same interface, any device.

Logits exist one token chunk at a time (chunk x V fp32, bounded by ``CHUNK_BYTES``); the
backward recomputes them per chunk. Inactive tokens and tokens whose upstream coefficients
are zero are compacted away, so they cost no FLOPs here either.
"""

from __future__ import annotations

import torch

# Upper bound on the fp32 logits of one chunk; a few temporaries of this size are live at once.
CHUNK_BYTES = 64 << 20


def _chunk_tokens(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


def _scaled_logits(hidden, weight, bias, inv_temp):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return z.float() * inv_temp


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, active, inv_temp, chunk_bytes):
        N = hidden.shape[0]
        logp = hidden.new_zeros(N, dtype=torch.float32)
        lse = torch.zeros_like(logp)
        entropy = torch.zeros_like(logp)
        rows = torch.arange(N, device=hidden.device) if active is None else active.nonzero().squeeze(1)
        step = _chunk_tokens(weight.shape[0], chunk_bytes)
        for idx in rows.split(step):
            u = _scaled_logits(hidden[idx], weight, bias, inv_temp)
            lz = torch.logsumexp(u, dim=-1)
            logp_all = u - lz[:, None]
            p = logp_all.exp()
            logp[idx] = logp_all.gather(1, targets[idx, None].long()).squeeze(1)
            lse[idx] = lz
            # where(): a -inf bias gives p = 0 and logp = -inf, whose product must count as 0.
            entropy[idx] = -torch.where(p > 0, p * logp_all, 0.0).sum(-1)
            del u, logp_all, p
        ctx.save_for_backward(hidden, weight, bias, targets, active, lse, entropy)
        ctx.inv_temp, ctx.chunk_bytes = inv_temp, chunk_bytes
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
        rows = ((g_lp != 0) | (g_ent != 0)).nonzero().squeeze(1)
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_db else None
        for idx in rows.split(_chunk_tokens(weight.shape[0], ctx.chunk_bytes)):
            h = hidden[idx]
            logp_all = _scaled_logits(h, weight, bias, ctx.inv_temp) - lse[idx, None]
            p = logp_all.exp()
            dz = -g_lp[idx, None] * p
            dz.scatter_add_(1, targets[idx, None].long(), g_lp[idx, None])
            dz -= g_ent[idx, None] * torch.where(p > 0, p * (logp_all + entropy[idx, None]), 0.0)
            dz = (dz * ctx.inv_temp).to(hidden.dtype)
            del logp_all, p
            if need_dh:
                dh[idx] = dz @ weight
            if need_dw:
                dw.addmm_(dz.T.float(), h.float())
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
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked lm_head log-probs and entropies; inputs are validated by ``fastgrpo.ops``.

    Args:
        hidden: (N, H) fp32/fp16/bf16.
        weight: (V, H), same dtype and device.
        bias: (V,) same dtype, or None.
        targets: (N,) int32/int64 in [0, V) wherever ``active``.
        active: (N,) bool or None; inactive tokens cost no FLOPs and get logp = entropy = 0.
        temperature: logits are divided by it before the softmax.
        chunk_bytes: bound on one chunk's fp32 logits.

    Returns:
        (logp, entropy), each (N,) fp32, differentiable w.r.t. hidden, weight and bias.
    """
    return _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, active, 1.0 / float(temperature), chunk_bytes)
