"""Exact backward of the fused log-prob kernels without atomics: d loss / d logits tiles, then cuBLAS.

The forward (``linear_logprobs``) keeps logits on chip and stores only O(N) statistics. Its
exact backward recomputes each (token block x vocabulary tile) of logits with ``tl.dot``,
turns it into d loss / d logits on chip and writes that tile, in the input dtype, to a
bounded workspace holding one chunk of live tokens (``WORKSPACE_BYTES``). Two cuBLAS GEMMs per
chunk finish the job: dHidden_chunk = dz @ W (complete, so written once in the output dtype)
and dW += dz^T @ hidden_chunk into fp32. No atomics, no fp32 dHidden accumulator.

Bytes per chunk of n live tokens: the workspace is written once and read twice (2 + 4 bytes x n x V
at bf16), against the atomic design's 4 x H x n x V x (1 / BLOCK_V + 1 / BLOCK_N) bytes of fp32
atomics: at H = 3584 and 128 x 128 tiles that is 224 bytes per logit against 6.
"""

import torch
import triton
import triton.language as tl

from . import _gemm
from ._args import as_contiguous, kernel_scales, nan_where_invalid
from ._tiles import _chain, _dlogits_tile, _grouped_tile, _head_args, _launch_constants, _logits_tile, _target

# Bound on one chunk's d loss / d logits workspace (input dtype); ~1,700 tokens at V = 152K, bf16.
WORKSPACE_BYTES = 512 << 20

# ----------------------------------------------------------------------------- jit kernels


def extra_bytes(N, H, V, dtype, *, trainable_head=True) -> int:
    """Memory the fused path holds beyond its inputs (exact backward): one d loss / d logits chunk, plus
    the fp32 accumulator of the smaller gradient (dHidden when N <= V) for 16-bit weights."""
    elem = torch.finfo(dtype).bits // 8
    acc = (4 * min(N, V) * H if trainable_head else 0) if dtype != torch.float32 else 0
    return min(WORKSPACE_BYTES, max(N, 1) * V * elem) + acc


@triton.jit
def _dlogits_kernel(
    # pointers
    head,  # (h_ptr (N, H), w_ptr (V, H), b_ptr (V,) or dummy)
    per_token,  # (N,) each: y_ptr targets, lse_ptr and ent_ptr fp32 from the forward (entropy read only
    # with HAS_DENT), g_lp_ptr and g_ent_ptr fp32 d loss / d logp and d loss / d entropy (or dummy)
    dz_ptr,  # (N, V) workspace, input dtype, row stride stride_zn
    # shapes
    N,
    V,
    H,
    # strides
    strides,  # head's (stride_hn, stride_hh, stride_wv, stride_wh)
    stride_zn,
    # constants
    scales,  # (inv_temp, softcap): the logit transform (_tiles._transform)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    y_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr = per_token
    pid_n, pid_v = _grouped_tile(N, V, BLOCK_N, BLOCK_V, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < V
    u = _logits_tile(
        head, strides, offs_n, offs_v, n_mask, v_mask, H, scales, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_H
    )
    y = tl.load(y_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    g_lp = tl.load(g_lp_ptr + offs_n, mask=n_mask, other=0.0)
    g_ent, ent = g_lp, lse  # read only with HAS_DENT
    if HAS_DENT:
        g_ent = tl.load(g_ent_ptr + offs_n, mask=n_mask, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
    dz = _dlogits_tile(u, offs_v, y, lse, g_lp, g_ent, ent, HAS_DENT)
    tile = n_mask[:, None] & v_mask[None, :]
    dz = _chain(dz, u, scales, HAS_SOFTCAP)
    tl.store(dz_ptr + offs_n[:, None] * stride_zn + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), tile)


# ----------------------------------------------------------------------------- launcher


def _alloc_workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The d loss / d logits workspace (one place, so tests can watch its size)."""
    return torch.empty(rows, vocab, dtype=dtype, device=device)


def _aligned(step: int) -> int:
    """A chunk width of at least 1, rounded down to a multiple of 64 where it is that wide: every
    slice of the weight, the hidden states and the workspace then starts 16-byte aligned, which the
    JIT specializes on (wider loads; an unaligned slice is another, slower compile)."""
    return step - step % 64 if step >= 64 else max(1, step)


def _launch(c, h, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, z, scales):
    """d loss / d logits of tokens ``h`` (n, H) against the vocabulary slice ``weight`` into ``z``."""
    n, V = z.shape
    H = h.shape[1]
    # A logits tile and its epilogue, as in the forward: the forward's tiles unless the family has its own.
    block_n, block_v, block_h, warps, stages = c.dlogits
    grid = (triton.cdiv(n, block_n) * triton.cdiv(V, block_v),)
    head, strides = _head_args(h, weight, bias, lse)
    _dlogits_kernel[grid](
        head,
        (targets, lse, entropy, grad_logp, grad_entropy if grad_entropy is not None else lse),
        z,
        n,
        V,
        H,
        strides,
        z.stride(0),
        kernel_scales(*scales),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=scales[1] != 0,
        HAS_DENT=grad_entropy is not None,
        DOT_PRECISION=c.dot_precision,
        UPCAST=c.upcast,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        GROUP_N=8,
        num_warps=warps,
        num_stages=stages,
    )
    return z


def dlogits_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    scales: tuple[float, float],
    need_dweight: bool,
    need_dbias: bool,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dHidden (N, H), dWeight (V, H) or (0,), dBias (V,) or (0,)) in the input dtype.

    Only live tokens (a nonzero upstream coefficient) cost FLOPs. One gradient must be summed
    over chunks in fp32: the smaller one. With a trainable head and N <= V the vocabulary is
    the outer loop (chunks of all live tokens x a vocabulary slice): each dWeight slice is
    complete after one GEMM and dHidden sums in fp32 (N x H x 4 bytes). Otherwise tokens are
    the outer loop: each dHidden chunk is complete, and dWeight (if any) sums in fp32.

    Args:
        hidden: (N, H) fp32/fp16/bf16; weight: (V, H); bias: (V,) or None. Any strides.
        targets: (N,) int32/int64; lse, entropy: (N,) fp32 from the forward. A target outside
            [0, V) with a nonzero ``grad_logp`` makes the gradients NaN (its logp is NaN).
        grad_logp: (N,) fp32 d loss / d logp; grad_entropy: (N,) fp32 or None.
        scales: (inv_temp, softcap), the logit transform (``_tiles.logit_scales``; softcap 0 = none).
        need_dweight, need_dbias: which parameter gradients to form.
        workspace_bytes: bound on the d loss / d logits chunk (at least one row or column is used);
            None: ``WORKSPACE_BYTES``.
    """
    workspace_bytes = WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    N, H = hidden.shape
    V = weight.shape[0]
    # The kernel indexes the vectors with unit stride; hidden and weight go in with their strides.
    bias, targets, lse, entropy, grad_logp, grad_entropy = as_contiguous(
        bias, targets, lse, entropy, grad_logp, grad_entropy
    )
    grad_logp = nan_where_invalid(grad_logp, targets, V)
    capability, _ = _target(hidden.device)
    c = _launch_constants(hidden.dtype, capability)
    elem = hidden.element_size()
    live = grad_logp != 0
    if grad_entropy is not None:
        live |= grad_entropy != 0
    idx = live.nonzero().squeeze(1)
    n = idx.numel()
    dense = n == N  # every token live (the usual case): no gathers
    if n and not dense:
        hidden, targets, lse, entropy, grad_logp = (t[idx] for t in (hidden, targets, lse, entropy, grad_logp))
        grad_entropy = None if grad_entropy is None else grad_entropy[idx]
    per_token = (lse, entropy, grad_logp, grad_entropy)

    def sliced(rows):
        return tuple(None if t is None else t[rows] for t in per_token)

    vocab_outer = n > 0 and need_dweight and n <= V
    dh = torch.zeros(n, H, device=hidden.device, dtype=torch.float32 if vocab_outer else hidden.dtype)
    # Tokens outer with an fp32 head sums straight into dWeight: no second V x H buffer.
    sum_in_dw = not vocab_outer and weight.dtype == torch.float32
    dw = (weight.new_zeros if not n or sum_in_dw else weight.new_empty)(V, H) if need_dweight else weight.new_empty(0)
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_dbias else None
    if vocab_outer:  # dHidden sums in fp32
        step = _aligned(workspace_bytes // (n * elem))
        ws = _alloc_workspace(n, min(step, V), hidden.dtype, hidden.device)
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            w = weight[v0:v1]
            b = None if bias is None else bias[v0:v1]
            y = targets - v0  # ids local to the slice; the others never match a column
            z = ws[:, : v1 - v0]
            _launch(c, hidden, w, b, y, *per_token, z, scales)
            _gemm.accumulate_mm(dh, z, w)
            _gemm.mm(z.T, hidden, out=dw[v0:v1])
            if need_dbias:
                db[v0:v1] += _gemm.colsum(z)
        dh = dh.to(hidden.dtype)
    elif n:  # tokens outer: each dHidden chunk complete, dWeight (if any) sums in fp32
        step = _aligned(workspace_bytes // (V * elem))
        ws = _alloc_workspace(min(step, n), V, hidden.dtype, hidden.device)
        dw_acc = None
        if need_dweight:
            dw_acc = dw if sum_in_dw else torch.zeros(V, H, device=weight.device, dtype=torch.float32)
        for s0 in range(0, n, step):
            rows = slice(s0, min(n, s0 + step))
            h = hidden[rows]
            z = _launch(c, h, weight, bias, targets[rows], *sliced(rows), ws[: h.shape[0]], scales)
            _gemm.mm(z, weight, out=dh[rows])
            if need_dweight:
                _gemm.accumulate_mm(dw_acc, z.T, h)
            if need_dbias:
                db += _gemm.colsum(z)
        if need_dweight and not sum_in_dw:
            dw.copy_(dw_acc)
    if not dense:
        dh = torch.zeros(N, H, device=dh.device, dtype=dh.dtype).index_copy_(0, idx, dh)
    return dh, dw, db.to(bias.dtype) if need_dbias else weight.new_empty(0)
