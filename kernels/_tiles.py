"""What the lm_head kernels share: the logits tile, the online log-sum-exp, and launch configs.

``_logits_tile`` (a K-loop of ``tl.dot`` over H) and ``_online_lse_update`` are written once and
used by the fused forward and backward (``linear_logprobs``, ``linear_dlogits``) and the chunked
path's row kernels (``logits_rows``). The configs are chosen per target GPU family; the compile
gate (``benchmarks/compile_gate.py``) holds every one of them to no spills and tensor cores.
"""

import contextlib
import dataclasses
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _load_rows(ptr, offs_r, r_mask, offs_h, h_mask, stride_r, stride_h, UPCAST: tl.constexpr):
    """A (rows, BLOCK_H) tile of a row-major (R, H) matrix, 0 outside the masks.

    UPCAST: the CPU interpreter mis-computes bf16 dots; bf16 products are exact in fp32.
    """
    tile = tl.load(
        ptr + offs_r[:, None] * stride_r + offs_h[None, :] * stride_h,
        mask=r_mask[:, None] & h_mask[None, :],
        other=0.0,
    )
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits_tile(
    head,  # (h_ptr (N, H), w_ptr (V, H), b_ptr (V,) or dummy)
    strides,  # head's (stride_hn, stride_hh, stride_wv, stride_wh)
    offs_n,  # (BLOCK_N,) int64 token ids, n_mask their bound
    offs_v,  # (BLOCK_V,) int64 vocabulary ids, v_mask their bound
    n_mask,
    v_mask,
    H,
    scales,  # (inv_temp, softcap): see _transform
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Transformed logits (BLOCK_N, BLOCK_V) in fp32 (``_transform``); -inf past the vocabulary end."""
    h_ptr, w_ptr, b_ptr = head
    stride_hn, stride_hh, stride_wv, stride_wh = strides
    acc = tl.zeros((offs_n.shape[0], offs_v.shape[0]), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = _load_rows(h_ptr, offs_n, n_mask, offs_h, h_mask, stride_hn, stride_hh, UPCAST)
        w = _load_rows(w_ptr, offs_v, v_mask, offs_h, h_mask, stride_wv, stride_wh, UPCAST)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_mask[None, :], _transform(acc, scales, HAS_SOFTCAP), float("-inf"))


@triton.jit
def _transform(z, scales, HAS_SOFTCAP: tl.constexpr):
    """The head's logits z (+ bias) as the softmax sees them: z * inv_temp, or with a softcap (Gemma 2's
    final_logit_softcapping) inv_temp * tanh(softcap * z). The host folds the model's logit scale, the cap
    and the temperature into the pair (``_args.logit_scales``)."""
    inv_temp, softcap = scales
    if HAS_SOFTCAP:
        # inv_temp * tanh(x) = inv_temp - 2 inv_temp / (2^(2x log2 e) + 1): exact limits at +-inf, one exp2, and
        # no temporary beyond the tile (the sm_90 forward tile has no register to spare).
        return inv_temp - (2.0 * inv_temp) / (tl.exp2(z * (2.8853900817779268 * softcap)) + 1.0)
    return z * inv_temp


@triton.jit
def _chain(dz, u, scales, HAS_SOFTCAP: tl.constexpr):
    """d loss / d z from d loss / d u, u = _transform(z): inv_temp, or inv_temp * softcap * (1 - tanh^2) with
    tanh = u / inv_temp. Callers mask the entries past the vocabulary end."""
    inv_temp, softcap = scales
    if HAS_SOFTCAP:
        t = u * (1.0 / inv_temp)  # one reciprocal per program, not a division per logit
        t = tl.where(t == float("-inf"), 0.0, t)  # -inf only past the vocabulary end (tanh >= -1)
        return dz * (inv_temp * softcap) * (1.0 - t * t)
    return dz * inv_temp


@triton.jit
def _chain_bound(scales, HAS_SOFTCAP: tl.constexpr):
    """The largest |d u / d z| (``_chain``'s factor at tanh = 0)."""
    inv_temp, softcap = scales
    if HAS_SOFTCAP:
        return inv_temp * softcap
    return inv_temp


@triton.jit
def _grouped_tile(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """(token block, vocabulary block) of this program in grouped order: GROUP_N token blocks sweep the
    vocabulary together, so each weight tile is read from L2 by several programs in a row."""
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    first_n = pid // (GROUP_N * num_v) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * num_v)) % group_size
    pid_v = (pid % (GROUP_N * num_v)) // group_size
    return pid_n, pid_v


@triton.jit
def _dlogits_tile(u, offs_v, y, lse, g_lp, g_ent, ent, HAS_DENT: tl.constexpr):
    """d loss / d u of a (BLOCK_N, BLOCK_V) tile of scaled logits ``u``, from each token's target ``y``,
    log Z ``lse``, upstream d loss / d logp ``g_lp`` and (HAS_DENT) d loss / d entropy ``g_ent`` and
    entropy ``ent``, all with respect to the transformed logits u; the caller applies ``_chain`` (d u / d z) and
    masks. The caller loads the (BLOCK_N,)
    vectors, in the order its register schedule was measured with (the compile gate)."""
    logp = u - lse[:, None]
    p = tl.exp(logp)
    # d logp_y / d u_v = [v == y] - p_v
    dz = g_lp[:, None] * ((offs_v[None, :] == y[:, None]).to(tl.float32) - p)
    if HAS_DENT:
        # d entropy / d u_v = -p_v (log p_v + entropy)
        dz -= g_ent[:, None] * p * tl.where(p > 0, logp + ent[:, None], 0.0)
    return dz


@triton.jit
def _online_lse_update(m_i, s0, s1, u):
    """Fold a logit tile into (running max m, s0 = sum e^t, s1 = sum e^t * t), t = u - m.

    Keeping s1 relative to the running max makes entropy = log s0 - s1 / s0 free of the
    cancellation that lse - E_p[u] suffers when logits are large.
    """
    m_new = tl.maximum(m_i, tl.max(u, axis=1))
    # A row with no finite logit yet (a banned block at the vocabulary start) keeps m = -inf;
    # subtracting 0 instead keeps exp(-inf - -inf) = NaN out of alpha and t.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)
    t = u - m_ref[:, None]
    e = tl.exp(t)
    # Zero terms meet -inf (first tile, a -inf bias, past the vocabulary end): 0 * -inf is not 0.
    shift = tl.where(s0 > 0, m_i - m_ref, 0.0) * s0
    s1 = alpha * (s1 + shift) + tl.sum(e * tl.where(e > 0, t, 0.0), axis=1)
    s0 = alpha * s0 + tl.sum(e, axis=1)
    return m_new, s0, s1


# ----------------------------------------------------------------------------- launch configs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Ahead-of-time target: benchmarks/compile_gate.py compiles the launches the ops make on CPU
# tensors for GPUs this machine does not have. While ``target_gpu`` is active, the launchers
# pick tiles (and vocabulary splits) for that GPU instead of asking the tensor's device.
_TARGET_OVERRIDE: tuple[tuple[int, int], int] | None = None


@contextlib.contextmanager
def target_gpu(capability: tuple[int, int], sm_count: int):
    """Launch as if on a CUDA device of ``capability`` (e.g. (9, 0)) with ``sm_count`` SMs.

    For ahead-of-time compilation only (the compile gate captures launches instead of running
    them). The interpreter (TRITON_INTERPRET=1) ignores it: its constants never change.
    """
    global _TARGET_OVERRIDE
    previous, _TARGET_OVERRIDE = _TARGET_OVERRIDE, ((int(capability[0]), int(capability[1])), int(sm_count))
    try:
        yield
    finally:
        _TARGET_OVERRIDE = previous


def _target(device: torch.device) -> tuple[tuple[int, int] | None, int | None]:
    """(compute capability, SM count) the launch is for; (None, None) off CUDA."""
    if _TARGET_OVERRIDE is not None:
        return _TARGET_OVERRIDE
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (props.major, props.minor), props.multi_processor_count
    return None, None


# GPU launch configs, (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) for the forward and the
# backward, per target family and operand kind. Chosen with the compile gate
# (benchmarks/compile_gate.py, results in benchmarks/results/compile/): every launch the ops make
# compiles without register spills, within the chip's shared memory, on tensor cores for 16-bit
# and TF32 operands, for the heads listed there, at token counts that are and are not multiples of
# 16 (the JIT specializes on it), with triton 3.9 and 3.6. Timed on an H200 (benchmarks/NOTES.md):
# the sm90 16-bit forward, and the d-logits kernel at its former 128x128 tile; the rest not yet. Families: "sm80" (also
# the default for unknown or older devices and for sm_86/89: every sm80 config fits their 99 KiB
# of shared memory), "sm90" (Hopper, wgmma), "sm100" (Blackwell and newer, tcgen05; the configs
# use <= 87 KiB of shared memory, so they also fit sm_120).
_GPU_CONFIGS = {
    # 16-bit operands
    ("sm80", "16bit"): dict(fwd=(128, 64, 64, 8, 3), bwd=(128, 128, 32, 8, 3)),
    # sm90 backward (the filter's atomic kernel): 128x128 spilled 24 B under triton 3.6 at a token
    # count that is not a multiple of 16; 128x64 stays at <= 224 registers.
    # sm90 d-logits: the forward's 128x128 tile sat at 255 registers and, at such a token count
    # with an entropy gradient, spilled 168 B (seen on an H200, then in the gate); 128x64: <= 220.
    # sm90 forward with a softcap: the tanh epilogue spilled 8 B at 128x128 (GPT-2's head, a token count not a
    # multiple of 16); 128x64 has the registers.
    ("sm90", "16bit"): dict(
        fwd=(128, 128, 64, 8, 4), bwd=(128, 64, 64, 8, 2), dlogits=(128, 64, 64, 8, 4), fwd_softcap=(128, 64, 64, 8, 4)
    ),
    ("sm100", "16bit"): dict(fwd=(128, 64, 64, 8, 3), bwd=(128, 64, 32, 8, 3)),
    # fp32 operands with TF32 allowed (torch.backends.cuda.matmul.allow_tf32)
    ("sm80", "tf32"): dict(fwd=(64, 64, 32, 8, 2), bwd=(64, 32, 32, 8, 2)),  # 64x64 bwd: 12 B spilled (3.6)
    ("sm90", "tf32"): dict(fwd=(64, 64, 32, 4, 2), bwd=(64, 64, 32, 4, 2)),
    ("sm100", "tf32"): dict(fwd=(64, 64, 32, 8, 2), bwd=(64, 64, 32, 8, 2)),
    # IEEE fp32: CUDA-core FMA dots. The backward at 64x64x32 (4 warps) spilled ~12 KB/thread; the
    # forward at 64x64x32 with 4 warps spilled 8-36 B at token counts not a multiple of 16 (an
    # H200's JIT: 32 B), 8 warps over BLOCK_H 16 do not.
    ("sm80", "ieee"): dict(fwd=(64, 64, 16, 8, 2), bwd=(64, 32, 16, 8, 2)),
    ("sm90", "ieee"): dict(fwd=(64, 64, 16, 8, 2), bwd=(64, 64, 16, 8, 2), fwd_softcap=(64, 32, 16, 8, 2)),  # 12 B
    ("sm100", "ieee"): dict(fwd=(32, 64, 32, 4, 2), bwd=(32, 32, 32, 4, 2)),
}


def _family(capability: tuple[int, int] | None) -> str:
    major = capability[0] if capability is not None else 0
    return "sm100" if major >= 10 else "sm90" if major == 9 else "sm80"


class Tile(NamedTuple):
    """One kernel's launch shape: a (block_n x block_v) logits tile over block_h-wide H steps."""

    block_n: int
    block_v: int
    block_h: int
    warps: int
    stages: int


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tiles and dot precision of the lm_head kernels for one dtype on one target.

    ``fwd``: the forward; ``bwd``: the filtered (atomic) backward; ``dlogits``: the exact
    backward's d-logits kernel (the forward's tile unless the family has its own); ``fwd_softcap``: the
    forward with a softcapped head (the forward's tile unless the family has its own).
    """

    dot_precision: str  # "tf32" or "ieee"; 16-bit dots ignore it
    upcast: bool  # the interpreter's bf16 workaround (see _load_rows)
    fwd: Tile
    bwd: Tile
    dlogits: Tile
    fwd_softcap: Tile


def _launch_constants(dtype: torch.dtype, capability: tuple[int, int] | None = None) -> LaunchConfig:
    """Tiles and dot precision for a dtype on a GPU of ``capability`` (None: the sm80 family)."""
    # fp32 follows torch's own matmul policy (IEEE unless the user allowed TF32); the setting
    # is ignored for 16-bit operands.
    prec = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if _interpreting():
        # Each interpreted program costs tens of ms: tiles as large as test shapes allow while
        # still leaving partial tiles in every dimension (e.g. N=37, V=1003, H=72).
        tile = Tile(32, 128, 32, 1, 1)
        return LaunchConfig(prec, dtype == torch.bfloat16, tile, tile, tile, tile)
    kind = "16bit" if dtype != torch.float32 else prec
    cfg = _GPU_CONFIGS[(_family(capability), kind)]
    fwd = Tile(*cfg["fwd"])
    own = {name: Tile(*cfg[name]) if name in cfg else fwd for name in ("dlogits", "fwd_softcap")}
    return LaunchConfig(prec, False, fwd, Tile(*cfg["bwd"]), **own)


def _head_args(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dummy: torch.Tensor):
    """The kernels' ``head`` and ``strides`` tuples: hidden (n, H) and weight (V, H) with their
    strides, and the bias or a dummy for HAS_BIAS = False."""
    head = (hidden, weight, bias if bias is not None else dummy)
    return head, (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
