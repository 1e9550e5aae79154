"""Fused lm_head + log-softmax: per-token log p(target), log Z and entropy from hidden states.

Logits exist only as (BLOCK_N, BLOCK_V) register tiles produced by ``tl.dot``; device memory
sees O(N) per-token statistics and the gradients, never an N x V (or N x vocab-chunk) tensor.

Forward: grid (token blocks, vocabulary splits). Each program walks its vocabulary range with
an online log-sum-exp and writes four partials per token; an O(N x splits) merge finishes.
Splitting the vocabulary keeps the GPU busy when there are few tokens.

Backward: grid (token blocks x vocabulary blocks). Each program recomputes its logit tile,
turns the per-token upstream coefficients (d loss / d logp and d loss / d entropy) into
d loss / d logits, and adds its share of dHidden, dWeight and dBias into fp32 accumulators.
A full-H accumulator per token block does not fit on chip for H in the thousands, so the
vocabulary reduction of dHidden is split across programs (as Cut Cross-Entropy does).
Token blocks whose coefficients are all zero (masked, padding) return before any FLOP.
For 16-bit inputs the fp32 accumulators cost the smaller of N x H and V x H plus one bounded
chunk of the other (``SCRATCH_BYTES``), not a full fp32 copy of both gradients.
Optional gradient filtering (``grad_filter_eps`` > 0, as Cut Cross-Entropy does): a tile whose
d loss / d logits is negligible everywhere skips its dHidden / dWeight GEMMs and atomics, so
it costs only the logit recompute (criterion in ``_bwd_kernel``).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._args import as_contiguous, kernel_scales, logit_scales, nan_where_invalid
from ._debug import alloc_output
from ._tiles import (
    _chain,
    _chain_bound,
    _dlogits_tile,
    _grouped_tile,
    _head_args,
    _launch_constants,
    _load_rows,
    _logits_tile,
    _online_lse_update,
    _target,
    target_gpu,
)
from .linear_dlogits import dlogits_backward

__all__ = ["linear_logprobs_bwd", "linear_logprobs_fwd", "linear_logprobs_triton", "target_gpu"]

# ----------------------------------------------------------------------------- jit kernels


@triton.jit
def _fwd_kernel(
    # pointers
    head,  # (h_ptr (N, H), w_ptr (V, H), b_ptr (V,) or dummy)
    y_ptr,  # (N,) integer targets
    act_ptr,  # (N,) bool, or dummy
    part_ptr,  # (4, SPLITS, N) fp32: m, s0, s1, target logit
    # shapes
    N,
    V,
    H,
    v_per_split,
    # strides
    strides,  # head's (stride_hn, stride_hh, stride_wv, stride_wh)
    # constants
    scales,  # (inv_temp, softcap): the logit transform (_tiles._transform)
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    part = part_ptr + pid_s * N + offs_n
    plane = n_splits * N

    run = True
    if HAS_ACTIVE:
        active = tl.load(act_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)
        run = tl.max(active, axis=0) > 0
    if run:
        y = tl.load(y_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s0 = tl.zeros((BLOCK_N,), tl.float32)
        s1 = tl.zeros((BLOCK_N,), tl.float32)
        # A target outside [0, V) matches no column (or a -inf pad column) and would report a
        # plausible log p = -lse, since the host check on targets is skipped under torch.compile:
        # its accumulator starts at NaN in every split, so the merged logp is NaN. (Set here, not
        # after the loop: a select there spilled the sm_90 16-bit tile, at 255 registers.)
        u_y = tl.where((y >= 0) & (y < V), 0.0, float("nan"))
        v_start = pid_s * v_per_split
        v_stop = tl.minimum(v_start + v_per_split, V)
        for v0 in range(v_start, v_stop, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            v_mask = offs_v < V
            u = _logits_tile(
                head, strides, offs_n, offs_v, n_mask, v_mask, H, scales, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION,
                UPCAST, BLOCK_H,
            )  # fmt: skip
            m_i, s0, s1 = _online_lse_update(m_i, s0, s1, u)
            u_y += tl.sum(tl.where(offs_v[None, :] == y[:, None], u, 0.0), axis=1)
        tl.store(part, m_i, mask=n_mask)
        tl.store(part + plane, s0, mask=n_mask)
        tl.store(part + 2 * plane, s1, mask=n_mask)
        tl.store(part + 3 * plane, u_y, mask=n_mask)
    else:
        # Finite neutral partials; the launcher zeroes inactive tokens after the merge.
        zero = tl.zeros((BLOCK_N,), tl.float32)
        tl.store(part, zero, mask=n_mask)
        tl.store(part + plane, zero + 1.0, mask=n_mask)
        tl.store(part + 2 * plane, zero, mask=n_mask)
        tl.store(part + 3 * plane, zero, mask=n_mask)


@triton.jit
def _bwd_kernel(
    # pointers
    head,  # (h_ptr (N, H), w_ptr (V, H), b_ptr (V,) or dummy)
    per_token,  # (N,) each: y_ptr targets, lse_ptr and ent_ptr fp32 from the forward (entropy read only
    # with HAS_DENT), g_lp_ptr and g_ent_ptr fp32 d loss / d logp and d loss / d entropy (or dummy)
    dh_ptr,  # (N, H) fp32 accumulator, contiguous
    dw_ptr,  # (V, H) fp32 accumulator, contiguous, or dummy
    db_ptr,  # (V,) fp32 accumulator, or dummy
    # shapes
    N,
    V,
    H,
    # strides
    strides,  # head's (stride_hn, stride_hh, stride_wv, stride_wh)
    # constants
    scales,  # (inv_temp, softcap): the logit transform (_tiles._transform)
    filter_eps,  # fp32 >= 0, read only with HAS_FILTER
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DENT: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    HAS_FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    y_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr = per_token
    h_ptr, w_ptr, _ = head
    stride_hn, stride_hh, stride_wv, stride_wh = strides
    pid_n, pid_v = _grouped_tile(N, V, BLOCK_N, BLOCK_V, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    g_lp = tl.load(g_lp_ptr + offs_n, mask=n_mask, other=0.0)
    live = tl.abs(g_lp)
    g_ent = g_lp  # read only with HAS_DENT
    if HAS_DENT:
        g_ent = tl.load(g_ent_ptr + offs_n, mask=n_mask, other=0.0)
        live += tl.abs(g_ent)
    if tl.max(live, axis=0) > 0:
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < V
        u = _logits_tile(
            head, strides, offs_n, offs_v, n_mask, v_mask, H, scales, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST,
            BLOCK_H,
        )  # fmt: skip
        y = tl.load(y_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
        ent = lse  # read only with HAS_DENT
        if HAS_DENT:
            ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
        dz = _dlogits_tile(u, offs_v, y, lse, g_lp, g_ent, ent, HAS_DENT)
        dz = tl.where(n_mask[:, None] & v_mask[None, :], _chain(dz, u, scales, HAS_SOFTCAP), 0.0)
        keep = True
        if HAS_FILTER:
            # Gradient filtering: skip the tile's dHidden / dWeight / dBias work when every entry
            # is negligible for its own token,
            #     |dz_nv| <= eps * (|g_lp_n| + |g_ent_n|) * c     for all (n, v) in the tile,
            # c the largest |d u / d z| of the logit transform (1 / temperature without a softcap).
            # The test is on dz itself, not on p as Cut Cross-Entropy's p < eps is, because
            # - the target's one-hot term makes dz_ny = g_lp_n * (1 - p_y) + ...: a tile holding
            #   a token's target stays live for that token (unless p_y > 1 - eps, when the
            #   token's whole gradient is itself below the cut), with no special case;
            # - the entropy term -g_ent * p * (log p + H) is not bounded by p: p * |log p| is
            #   8.3 p at p = 2^-12 and H adds up to log V more, so p < eps would drop live work.
            # |g_lp_n| + |g_ent_n| is the token's coefficient scale (|dz| / c <= g_lp
            # + g_ent * p |log p + H|), so eps is a relative cut per token: a dropped entry is at
            # most eps times its own token's scale whatever its block neighbours carry (a
            # token with a small advantage is not filtered against one with a large one), and
            # masked tokens (scale 0, dz 0) never keep a tile alive. Written as "<=" so a NaN
            # or inf keeps the tile (errors propagate, they are never filtered away). Live tiles
            # are used whole, negligible entries included: only whole tiles are dropped, which
            # is where the time goes; zeroing entries inside live tiles would add error and
            # save nothing.
            thr = filter_eps * _chain_bound(scales, HAS_SOFTCAP) * live
            # A non-finite scale (inf or NaN upstream gradient) would make every |dz| <= thr
            # hold; -1 keeps such a token's tiles so the error reaches the gradients.
            thr = tl.where(thr < float("inf"), thr, -1.0)
            keep = tl.max(tl.where(tl.abs(dz) <= thr[:, None], 0, 1)) > 0
        if keep:
            # Relaxed atomics: the accumulators are read only after the kernel ends, so no
            # ordering is needed; the default (acq_rel) wraps every atomic in a GPU-wide fence.
            if HAS_DB:
                tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=v_mask, sem="relaxed")
            dz_c = dz.to(h_ptr.dtype.element_ty)
            if UPCAST:
                dz_c = dz_c.to(tl.float32)
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                w = _load_rows(w_ptr, offs_v, v_mask, offs_h, h_mask, stride_wv, stride_wh, UPCAST)
                dh = tl.dot(dz_c, w, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    dh_ptr + offs_n[:, None] * H + offs_h[None, :],
                    dh,
                    mask=n_mask[:, None] & h_mask[None, :],
                    sem="relaxed",
                )
                if HAS_DW:
                    x = _load_rows(h_ptr, offs_n, n_mask, offs_h, h_mask, stride_hn, stride_hh, UPCAST)
                    dw = tl.dot(tl.trans(dz_c), x, input_precision=DOT_PRECISION)
                    tl.atomic_add(
                        dw_ptr + offs_v[:, None] * H + offs_h[None, :],
                        dw,
                        mask=v_mask[:, None] & h_mask[None, :],
                        sem="relaxed",
                    )


# ----------------------------------------------------------------------------- launchers


# Beyond this the merge's O(N x splits) partials and their launch outweigh any wave gained.
MAX_SPLITS = 64


def _num_splits(n_blocks: int, v_blocks: int, sm_count: Optional[int], max_splits: int = MAX_SPLITS) -> int:
    """Vocabulary splits of the forward grid (n_blocks x splits programs, equal work each).

    Programs of equal work finish in waves of ``sm_count`` (one resident per SM: the forward's tiles
    take most of the shared memory), so the time goes as waves x blocks per program. The fewest
    splits that minimize that product: at Qwen2.5-7B's head and 4K tokens, 33 splits make 8 full
    waves of 36 vocabulary blocks (288 units) where 9 splits made 3 waves of 132, the last 18%
    full (396). ``max_splits`` bounds the (4, splits, N) fp32 partials. On CPU (the interpreter) a few
    splits exercise the merge.
    """
    if not sm_count:
        splits = max(1, min(v_blocks, triton.cdiv(8, max(n_blocks, 1))))
        return triton.cdiv(v_blocks, triton.cdiv(v_blocks, splits))  # no empty split

    def cost(splits):
        return triton.cdiv(max(n_blocks, 1) * splits, sm_count) * triton.cdiv(v_blocks, splits)

    return min(range(1, min(v_blocks, max_splits) + 1), key=lambda splits: (cost(splits), splits))


def _max_splits(n_tokens: int) -> int:
    """At most MAX_SPLITS, and partials (16 bytes per token and split) within PARTIALS_BYTES: at 64K tokens
    the waves gain 3% at most, not worth a 33x larger merge (benchmarks/NOTES.md)."""
    return max(1, min(MAX_SPLITS, PARTIALS_BYTES // (16 * max(n_tokens, 1))))


PARTIALS_BYTES = 64 << 20


# Bound on each chunked fp32 gradient accumulator of the backward (see linear_logprobs_bwd).
SCRATCH_BYTES = 64 << 20


def _scratch(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A zeroed fp32 gradient accumulator (one place, so tests can watch the sizes)."""
    return torch.zeros(rows, cols, device=device, dtype=torch.float32)


def _dummy(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=ref.device, dtype=torch.float32)


@torch.library.custom_op("fastgrpo::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    active: Optional[torch.Tensor],
    inv_temp: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (logp, lse, entropy), each (N,) fp32; zeros where ``active`` is False, logp NaN
    where an active target lies outside [0, V). Hidden and weight go in with their strides.
    (inv_temp, softcap): the logit transform (``_tiles.logit_scales``; softcap 0 = none)."""
    bias, targets, active = as_contiguous(bias, targets, active)
    N, H = hidden.shape
    V = weight.shape[0]
    capability, sm_count = _target(hidden.device)
    c = _launch_constants(hidden.dtype, capability)
    block_n, block_v, block_h, num_warps, num_stages = c.fwd_softcap if softcap else c.fwd
    n_blocks, v_blocks = triton.cdiv(N, block_n), triton.cdiv(V, block_v)
    splits = _num_splits(n_blocks, v_blocks, sm_count, _max_splits(N))
    v_per_split = triton.cdiv(v_blocks, splits) * block_v
    part = alloc_output((4, splits, N), hidden.device)
    if N > 0:
        head, strides = _head_args(hidden, weight, bias, _dummy(hidden))
        _fwd_kernel[(n_blocks, splits)](
            head,
            targets,
            active if active is not None else _dummy(hidden),
            part,
            N,
            V,
            H,
            v_per_split,
            strides,
            kernel_scales(inv_temp, softcap),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap != 0,
            HAS_ACTIVE=active is not None,
            DOT_PRECISION=c.dot_precision,
            UPCAST=c.upcast,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    m, s0, s1, u_y = part.unbind(0)
    m_max = m.max(dim=0).values
    scale = torch.exp(m - m_max)
    s0_all = (s0 * scale).sum(0)
    # A split with no finite logit has m = -inf and s0 = 0: its shift term is 0, not -inf * 0.
    s1_all = (scale * (s1 + torch.where(s0 > 0, (m - m_max) * s0, 0.0))).sum(0)
    lse = m_max + torch.log(s0_all)
    logp = u_y.sum(0) - lse
    entropy = torch.log(s0_all) - s1_all / s0_all
    if active is not None:
        logp, lse, entropy = (torch.where(active, t, 0.0) for t in (logp, lse, entropy))
    return logp, lse, entropy


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, active, inv_temp, softcap):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("fastgrpo::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],
    inv_temp: float,
    softcap: float,
    need_dweight: bool,
    need_dbias: bool,
    grad_filter_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dHidden (N, H), dWeight (V, H) or (0,), dBias (V,) or (0,)) in the input dtype.

    ``grad_filter_eps`` = 0 (exact): d loss / d logits tiles into a bounded workspace, then cuBLAS
    (``linear_dlogits``), no atomics. > 0: ``_bwd_kernel``, which skips the GEMMs and atomics of
    tiles whose d loss / d logits is negligible (its relaxed fp32 atomics only pay for live tiles).
    A token whose target lies outside [0, V) and whose ``grad_logp`` is nonzero makes the
    gradients NaN (its logp is NaN).
    """
    if grad_filter_eps == 0:
        return dlogits_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, (inv_temp, softcap), need_dweight,
            need_dbias,
        )  # fmt: skip
    N, H = hidden.shape
    V = weight.shape[0]
    bias, targets, lse, entropy, grad_logp, grad_entropy = as_contiguous(
        bias, targets, lse, entropy, grad_logp, grad_entropy
    )
    grad_logp = nan_where_invalid(grad_logp, targets, V)
    c = _launch_constants(hidden.dtype, _target(hidden.device)[0])
    t = c.bwd
    low_precision = hidden.dtype != torch.float32
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dweight else weight.new_empty(0)
    db_acc = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_dbias else None

    def launch(n0, n1, v0, v1, dh_acc, dw_acc):
        num = triton.cdiv(n1 - n0, t.block_n) * triton.cdiv(v1 - v0, t.block_v)
        b = bias[v0:v1] if bias is not None else None
        head, strides = _head_args(hidden[n0:n1], weight[v0:v1], b, _dummy(hidden))
        _bwd_kernel[(num,)](
            head,
            (
                targets[n0:n1] - v0 if v0 else targets[n0:n1],  # ids local to the vocabulary slice
                lse[n0:n1],
                entropy[n0:n1],
                grad_logp[n0:n1],
                grad_entropy[n0:n1] if grad_entropy is not None else _dummy(hidden),
            ),
            dh_acc,
            dw_acc if dw_acc is not None else _dummy(hidden),
            db_acc[v0:v1] if db_acc is not None else _dummy(hidden),
            n1 - n0,
            v1 - v0,
            H,
            strides,
            kernel_scales(inv_temp, softcap),
            grad_filter_eps,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap != 0,
            HAS_DENT=grad_entropy is not None,
            HAS_DW=need_dweight,
            HAS_DB=need_dbias,
            HAS_FILTER=grad_filter_eps > 0,
            DOT_PRECISION=c.dot_precision,
            UPCAST=c.upcast,
            BLOCK_N=t.block_n,
            BLOCK_V=t.block_v,
            BLOCK_H=t.block_h,
            GROUP_N=8,
            num_warps=t.warps,
            num_stages=t.stages,
        )

    # Both gradients accumulate in fp32. For 16-bit inputs one accumulator must span its whole
    # gradient: the smaller of dHidden (N x H) and dWeight (V x H). The other is accumulated in
    # chunks of at most SCRATCH_BYTES, each cast into place as soon as its sums are complete.
    # (fp32 inputs accumulate straight into the outputs.) Same FLOPs and atomics either way.
    def rows(block):
        return max(block, SCRATCH_BYTES // (4 * max(H, 1)) // block * block)

    if need_dweight and N <= V:  # vocabulary outer: whole fp32 dHidden, dWeight in chunks
        dh_acc = _scratch(N, H, hidden.device) if low_precision else dh.zero_()
        step = rows(t.block_v)
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            dw_acc = _scratch(v1 - v0, H, hidden.device) if low_precision else dw[v0:v1].zero_()
            if N:
                launch(0, N, v0, v1, dh_acc, dw_acc)
            if low_precision:
                dw[v0:v1].copy_(dw_acc)
            del dw_acc
        if low_precision:
            dh.copy_(dh_acc)
    else:  # tokens outer: dHidden in chunks, whole fp32 dWeight (if any)
        dw_acc = None
        if need_dweight:
            dw_acc = _scratch(V, H, hidden.device) if low_precision else dw.zero_()
        step = rows(t.block_n)
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            dh_acc = _scratch(n1 - n0, H, hidden.device) if low_precision else dh[n0:n1].zero_()
            launch(n0, n1, 0, V, dh_acc, dw_acc)
            if low_precision:
                dh[n0:n1].copy_(dh_acc)
            del dh_acc
        if need_dweight and low_precision:
            dw.copy_(dw_acc)
    db = db_acc.to(bias.dtype) if db_acc is not None else weight.new_empty(0)
    return dh, dw, db


@linear_logprobs_bwd.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    inv_temp,
    softcap,
    need_dweight,
    need_dbias,
    grad_filter_eps,
):
    dw = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    db = weight.new_empty(weight.shape[0]) if need_dbias else weight.new_empty(0)
    return torch.empty_like(hidden), dw, db


# ----------------------------------------------------------------------------- autograd


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, active, scales, grad_filter_eps):
        logp, lse, entropy = linear_logprobs_fwd(hidden, weight, bias, targets, active, *scales)
        ctx.save_for_backward(hidden, weight, bias, targets, active, lse, entropy)
        ctx.scales, ctx.grad_filter_eps = scales, grad_filter_eps
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, active, lse, entropy = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.float()
        if active is not None:
            # Inactive outputs are the constant 0: whatever flows into them is dropped here.
            grad_logp = torch.where(active, grad_logp, 0.0)
            if grad_entropy is not None:
                grad_entropy = torch.where(active, grad_entropy, 0.0)
        dh, dw, db = linear_logprobs_bwd(
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            *ctx.scales,
            need_dw,
            need_db,
            ctx.grad_filter_eps,
        )
        return dh, (dw if need_dw else None), (db if need_db else None), None, None, None, None


# ----------------------------------------------------------------------------- public


def linear_logprobs_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    active: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    grad_filter_eps: float = 0.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused lm_head log-probs and entropies; inputs are validated by ``fastgrpo.ops``.

    Any strides: hidden and weight are read through theirs (a transposed weight, hidden with a
    non-unit stride in H), the (N,) and (V,) vectors are made contiguous where they are not.

    Args:
        hidden: (N, H) fp32/fp16/bf16.
        weight: (V, H), same dtype and device (e.g. the lm_head weight, or a transposed (H, V)
            matrix's ``.t()``).
        bias: (V,) same dtype, or None.
        targets: (N,) int32/int64 in [0, V) wherever ``active``. An active target outside it gets
            logp = NaN and makes the gradients NaN (nothing is read out of bounds); an inactive
            token may hold any id (e.g. -100).
        active: (N,) bool or None; inactive tokens cost no FLOPs and get logp = entropy = 0.
        temperature: logits are divided by it before the softmax.
        logit_scale, softcap: the head's logit transform before the temperature: z * logit_scale, or with a
            softcap (Gemma 2's final_logit_softcapping) softcap * tanh(z * logit_scale / softcap).
        grad_filter_eps: in [0, 1). The backward skips the dHidden / dWeight / dBias GEMMs of a
            (token block x vocabulary tile) whose every d loss / d logit is at most eps times
            its token's gradient scale (|d loss / d logp| + |d loss / d entropy|) x the transform's largest slope:
            Cut Cross-Entropy's gradient filtering. 0 = exact; 2**-12 suits bf16. The forward
            is unaffected.

    Returns:
        (logp, entropy), each (N,) fp32, differentiable w.r.t. hidden, weight and bias.
    """
    scales = logit_scales(float(temperature), float(logit_scale), None if softcap is None else float(softcap))
    logp, entropy, _ = _LinearLogprobs.apply(hidden, weight, bias, targets, active, scales, float(grad_filter_eps))
    return logp, entropy
