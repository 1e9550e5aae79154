"""Decode attention over a slot KV cache: one query token per slot, split over the KV length.

The ``graph`` sampler (``fastgrpo/train/sampling/graph.py``) keeps each sequence's keys and values in
a slot of a ``(S, KV, L, D)`` cache; slot ``s`` holds ``lengths[s]`` valid columns. A decode step
reads, per slot, only those columns (the PyTorch twin reads all L and masks), which is most of a
step's memory traffic after the weights. FlashDecoding's split: program (slot, KV head, split) runs an
online softmax over its share of the columns for the ``H / KV`` query heads that read that KV head
(GQA: the keys and values are loaded once for the group), and writes a partial output and its
log-sum-exp; the splits are combined in PyTorch (a few (S, H, splits) elementwise ops). Shapes are
static for a given (S, L), so a CUDA graph can replay it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._debug import alloc_output

BLOCK_N = 32  # columns per inner step
TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs: splits are added until the grid has this many


@triton.jit
def _decode_kernel(
    Q, K, V, LENGTHS, OUT, LSE,  # q (S, H, D); k, v (S, KV, L, D); lengths (S,); o (S, H, SP, D); lse (S, H, SP)
    stride_qs, stride_qh,
    stride_ks, stride_kh, stride_kl,
    stride_vs, stride_vh, stride_vl,
    stride_os, stride_oh, stride_op,
    stride_ls, stride_lh,
    scaling, split_len,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
    BLOCK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(LENGTHS + s).to(tl.int32)
    start = split * split_len
    end = tl.minimum(start + split_len, length)
    rows = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    heads = g * GROUP + rows
    row_ok = rows < GROUP
    d_ok = d < D
    q = tl.load(Q + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)  # fmt: skip
    if UPCAST:  # the CPU interpreter mis-computes bf16 dots (kernels/_tiles.py); fp32 products are exact
        q = q.to(tl.float32)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D_P], tl.float32)
    k_base = K + s * stride_ks + g * stride_kh
    v_base = V + s * stride_vs + g * stride_vh
    for n0 in range(start, end, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        col_ok = cols < end
        k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kl + d[:, None], mask=d_ok[:, None] & col_ok[None, :],
                    other=0.0)  # fmt: skip
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision="ieee") if IEEE else tl.dot(q, k)
        scores = tl.where(col_ok[None, :], scores * scaling, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vl + d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)  # fmt: skip
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    # A split past the slot's length read nothing: output 0, log-sum-exp -inf (weight 0 when combined).
    empty = total == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, total)[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
    tl.store(OUT + s * stride_os + heads[:, None] * stride_oh + split * stride_op + d[None, :], out,
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    tl.store(LSE + s * stride_ls + heads * stride_lh + split, lse, mask=row_ok)


def split_plan(slots: int, kv_heads: int, length: int) -> tuple[int, int]:
    """(splits, columns per split): enough splits for ~``TARGET_PROGRAMS`` programs, each a multiple of
    ``BLOCK_N`` columns; a function of the shapes only (static under a CUDA graph)."""
    blocks = math.ceil(length / BLOCK_N)
    splits = max(1, min(blocks, math.ceil(TARGET_PROGRAMS / max(1, slots * kv_heads))))
    per_split = math.ceil(blocks / splits) * BLOCK_N
    return math.ceil(length / per_split), per_split


def decode_attention_triton(q, keys, values, lengths, scaling: float) -> torch.Tensor:
    """The kernel. Shapes and meaning as ``decode_attention``."""
    S, H, D = q.shape
    _, KV, L, _ = keys.shape
    if q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension of q, keys and values must be contiguous")
    group = H // KV
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    # fp32 dots as the model's own matmuls run them: TF32 only where torch allows it for matmuls.
    ieee = (q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32) or upcast
    splits, per_split = split_plan(S, KV, L)
    partial = alloc_output((S, H, splits, D), q.device)
    lse = alloc_output((S, H, splits), q.device)
    _decode_kernel[(S, KV, splits)](
        q, keys, values, lengths.contiguous(), partial, lse,
        q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        float(scaling), per_split,
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), D=D, D_P=max(16, triton.next_power_of_2(D)),
        # fp32 (IEEE) dots run on FMAs: 8 warps share the tiles, or sm_90a spills ~480 B (compile gate).
        BLOCK=BLOCK_N, IEEE=ieee, UPCAST=upcast, num_warps=8 if ieee else 4,
    )  # fmt: skip
    # Every slot has at least one column, so split 0 is finite and the weights sum to >= 1.
    weights = torch.exp(lse - lse.amax(-1, keepdim=True))
    out = (partial * weights[..., None]).sum(2) / weights.sum(-1)[..., None]
    return out.to(q.dtype)


def decode_attention_torch(q, keys, values, lengths, scaling: float) -> torch.Tensor:
    """The twin: float32, every column read and the invalid ones masked."""
    S, H, D = q.shape
    KV, L = keys.shape[1], keys.shape[2]
    qf = q.float().view(S, KV, H // KV, D)
    scores = torch.einsum("sgrd,sgld->sgrl", qf, keys.float()) * scaling
    hidden = torch.arange(L, device=q.device)[None, :] >= lengths[:, None]  # (S, L)
    scores = scores.masked_fill(hidden[:, None, None], float("-inf"))
    out = torch.einsum("sgrl,sgld->sgrd", scores.softmax(-1), values.float())
    return out.reshape(S, H, D).to(q.dtype)


def decode_attention(q, keys, values, lengths, scaling: float, impl: str = "auto") -> torch.Tensor:
    """Attention of one query token per slot to its slot's first ``lengths[s]`` cached columns.

    q: (S, H, D) float32/bfloat16/float16; keys, values: (S, KV, L, D), the same dtype, H a multiple of KV
    (head h reads KV head h // (H // KV)), any strides with the last dimension contiguous; lengths: (S,)
    integer, each in [1, L]; scaling: the softmax scale. Returns (S, H, D) in q's dtype.
    ``impl``: "triton" (the kernel), "torch" (the twin), "auto" (triton on CUDA, else torch)."""
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "triton":
        return decode_attention_triton(q, keys, values, lengths, scaling)
    if impl == "torch":
        return decode_attention_torch(q, keys, values, lengths, scaling)
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
