"""Row kernels of the 3-GEMM path: statistics and d loss / d logits of a logits workspace.

The chunked path (``fastgrpo.ops.chunked``) writes one token chunk's logits ``hidden @ W^T`` to a
bounded HBM workspace with cuBLAS. These kernels then walk each row of it:

- ``row_stats``: log Z (online log-sum-exp, the same tile update as the fused kernels), the
  target's log-prob and the entropy, in one read of the row;
- ``row_grad_``: d loss / d logits = (g * ([v == y] - p_v) - g_H * p_v (log p_v + H)) * d u / d z
  (the second term only with an entropy gradient; d u / d z the transform's slope, 1 / temperature
  without a softcap), written over the logits in place (one read, one write), ready for the two
  gradient GEMMs.

Bias, the head's logit transform (scale, softcap) and the temperature are applied on the fly, so the
workspace holds the bare GEMM output.
Offsets are int64 per row; a row is walked in BLOCK_V tiles, so any vocabulary size works.
"""

import os

import torch
import triton
import triton.language as tl

from ._args import as_contiguous, kernel_scales, nan_where_invalid
from ._debug import alloc_output
from ._tiles import _chain, _dlogits_tile, _online_lse_update, _transform

# ----------------------------------------------------------------------------- jit kernels


@triton.jit
def _scaled_tile(z_rows, b_ptr, offs_v, r_mask, v_mask, scales, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(BLOCK_R, BLOCK_V) fp32 transformed logits (``_tiles._transform``); -inf past the vocabulary end."""
    u = tl.load(z_rows[:, None] + offs_v[None, :], mask=r_mask[:, None] & v_mask[None, :], other=0.0)
    u = u.to(tl.float32)
    if HAS_BIAS:
        u += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_mask[None, :], _transform(u, scales, HAS_SOFTCAP), float("-inf"))


@triton.jit
def _row_block(z_ptr, R, stride_zr, BLOCK_R: tl.constexpr):
    """This program's rows: ids (BLOCK_R,) int64, their bound, and their row pointers into z."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = offs_r < R
    return offs_r, r_mask, z_ptr + offs_r * stride_zr


@triton.jit
def _row_stats_kernel(
    # pointers
    z_ptr,  # (R, V) logits workspace, compute dtype
    b_ptr,  # (V,) bias or dummy
    y_ptr,  # (R,) integer targets
    out_ptr,  # (3, R) fp32: logp, lse, entropy
    # shapes
    R,
    V,
    # strides
    stride_zr,
    # constants
    scales,  # (inv_temp, softcap): the logit transform
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    offs_r, r_mask, z_rows = _row_block(z_ptr, R, stride_zr, BLOCK_R)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s0 = tl.zeros((BLOCK_R,), tl.float32)
    s1 = tl.zeros((BLOCK_R,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        u = _scaled_tile(z_rows, b_ptr, offs_v, r_mask, offs_v < V, scales, HAS_BIAS, HAS_SOFTCAP)
        m_i, s0, s1 = _online_lse_update(m_i, s0, s1, u)
    y = tl.load(y_ptr + offs_r, mask=r_mask, other=0).to(tl.int64)
    # The host check on targets is skipped under torch.compile: an id outside [0, V) reads
    # nothing (clamped address, masked load) and reports logp = NaN, not a neighbour's logit.
    y_ok = (y >= 0) & (y < V)
    y_in = tl.where(y_ok, y, 0)
    u_y = tl.load(z_rows + y_in, mask=r_mask & y_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u_y += tl.load(b_ptr + y_in, mask=r_mask & y_ok, other=0.0).to(tl.float32)
    log_s0 = tl.log(s0)
    lse = m_i + log_s0
    u_y = _transform(u_y, scales, HAS_SOFTCAP)
    tl.store(out_ptr + offs_r, tl.where(y_ok, u_y - lse, float("nan")), mask=r_mask)
    tl.store(out_ptr + R + offs_r, lse, mask=r_mask)
    tl.store(out_ptr + 2 * R + offs_r, log_s0 - s1 / s0, mask=r_mask)


@triton.jit
def _row_grad_kernel(
    # pointers
    z_ptr,  # (R, V) logits workspace, overwritten with d loss / d logits
    b_ptr,  # (V,) bias or dummy
    y_ptr,  # (R,) integer targets
    lse_ptr,  # (R,) fp32 log Z of the scaled logits
    g_ptr,  # (R,) fp32 d loss / d logp
    ent_ptr,  # (R,) fp32 entropy from row_stats (read only with HAS_DENT)
    g_ent_ptr,  # (R,) fp32 d loss / d entropy (read only with HAS_DENT)
    # shapes
    R,
    V,
    # strides
    stride_zr,
    # constants
    scales,  # (inv_temp, softcap): the logit transform
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    offs_r, r_mask, z_rows = _row_block(z_ptr, R, stride_zr, BLOCK_R)
    y = tl.load(y_ptr + offs_r, mask=r_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + offs_r, mask=r_mask, other=0.0)
    g = tl.load(g_ptr + offs_r, mask=r_mask, other=0.0)
    g_ent, ent = g, lse  # read only with HAS_DENT
    if HAS_DENT:
        g_ent = tl.load(g_ent_ptr + offs_r, mask=r_mask, other=0.0)
        ent = tl.load(ent_ptr + offs_r, mask=r_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        u = _scaled_tile(z_rows, b_ptr, offs_v, r_mask, v_mask, scales, HAS_BIAS, HAS_SOFTCAP)
        # The fused backward's tile formula and chain rule.
        dz = _chain(_dlogits_tile(u, offs_v, y, lse, g, g_ent, ent, HAS_DENT), u, scales, HAS_SOFTCAP)
        tl.store(
            z_rows[:, None] + offs_v[None, :],
            dz.to(z_ptr.dtype.element_ty),
            mask=r_mask[:, None] & v_mask[None, :],
        )


# ----------------------------------------------------------------------------- launchers


def _launch_constants() -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # Interpreted programs are slow: several rows per program, tiles that leave a partial
        # tile at test vocabularies (e.g. V = 1003).
        return dict(BLOCK_R=16, BLOCK_V=256, num_warps=1)
    # One row per program streams 2 x 2048 elements per tile: bandwidth-bound, no dot, no spill.
    return dict(BLOCK_R=1, BLOCK_V=2048, num_warps=8)


def _launch(kernel, z: torch.Tensor, bias, vectors: tuple, scales: tuple, dummy: torch.Tensor, **flags) -> None:
    """One program per BLOCK_R rows of the (R, V) workspace ``z``; ``vectors`` are the kernel's per-row
    pointer arguments after the bias; ``dummy`` (an fp32 vector) stands in for a missing bias; ``flags`` are
    the kernel's other HAS_* constexprs."""
    R, V = z.shape
    c = _launch_constants()
    if R:
        kernel[(triton.cdiv(R, c["BLOCK_R"]),)](
            z,
            bias if bias is not None else dummy,
            *vectors,
            R,
            V,
            z.stride(0),
            kernel_scales(*scales),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=scales[1] != 0,
            **flags,
            BLOCK_R=c["BLOCK_R"],
            BLOCK_V=c["BLOCK_V"],
            num_warps=c["num_warps"],
        )


def _check_workspace(z: torch.Tensor, targets: torch.Tensor, bias) -> None:
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"workspace must be a (R, V) row-major matrix, got shape {tuple(z.shape)}")
    if targets.shape != (z.shape[0],):
        raise ValueError(f"targets must be ({z.shape[0]},), got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (z.shape[1],):
        raise ValueError(f"bias must be ({z.shape[1]},), got {tuple(bias.shape)}")


def row_stats(
    z: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, inv_temp: float, softcap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (logp, lse, entropy) of softmax(inv_temp * (z + bias)), or with a softcap
    softmax(inv_temp * tanh(softcap * (z + bias))) (``_tiles.logit_scales``).

    Args:
        z: (R, V) fp32/fp16/bf16 logits, unit stride in V.
        bias: (V,) or None, any stride.
        targets: (R,) int32/int64 in [0, V), any stride; outside it, logp is NaN (nothing is
            read out of bounds).
        inv_temp, softcap: the logit transform (softcap 0 = none).

    Returns:
        logp, lse, entropy: each (R,) fp32.
    """
    _check_workspace(z, targets, bias)
    bias, targets = as_contiguous(bias, targets)
    out = alloc_output((3, z.shape[0]), z.device)
    _launch(_row_stats_kernel, z, bias, (targets, out), (inv_temp, softcap), dummy=out)
    return out[0], out[1], out[2]


def row_grad_(
    z: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    inv_temp: float,
    entropy: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Overwrite ``z`` with d loss / d z = (grad_logp * ([v == y] - p) - grad_entropy * p * (log p + entropy))
    * d u / d z, in z's dtype (the entropy term only with ``grad_entropy``); d u / d z = inv_temp, or with a
    softcap inv_temp * softcap * (1 - tanh^2).

    Args:
        z: (R, V) logits as given to ``row_stats``; overwritten.
        bias: (V,) or None; the vectors may have any stride.
        targets: (R,) int32/int64; a row whose target lies outside [0, V) and whose
            ``grad_logp`` is nonzero gets NaN (its logp is NaN).
        lse: (R,) fp32 from ``row_stats``.
        grad_logp: (R,) fp32 d loss / d logp.
        inv_temp, softcap: the logit transform, as given to ``row_stats``.
        entropy: (R,) fp32 from ``row_stats``, with ``grad_entropy``; else None.
        grad_entropy: (R,) fp32 d loss / d entropy, or None (no entropy term).

    Returns:
        z.
    """
    _check_workspace(z, targets, bias)
    V = z.shape[1]
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy go together: pass both or neither")
    bias, targets, lse, grad_logp, entropy, grad_entropy = as_contiguous(
        bias, targets, lse, grad_logp, entropy, grad_entropy
    )
    grad_logp = nan_where_invalid(grad_logp, targets, V)
    dent = (lse, lse) if grad_entropy is None else (entropy, grad_entropy)
    flags = dict(HAS_DENT=grad_entropy is not None)
    _launch(_row_grad_kernel, z, bias, (targets, lse, grad_logp, *dent), (inv_temp, softcap), dummy=lse, **flags)
    return z
