"""Fused lm_head log-probs / entropy (fused kernels, torch twin) against a float64 materialized reference."""

import pytest
import torch

import fastgrpo
from fastgrpo.ops.reference import reference_logprobs
from fastgrpo.ops.twin import linear_logprobs_torch

from helpers import DEVICE, DTYPES, IMPLS, TRITON_OK, leaf, rel_err

# The log-prob kernels and their twin; the chunked path's row kernels are tested in test_chunked.
IMPLS = [p for p in IMPLS if p.values[0] != "chunked"]


def _impl_fn(impl):
    if impl == "torch":
        return linear_logprobs_torch
    from fastgrpo.kernels import linear_logprobs_triton

    return linear_logprobs_triton


def _inputs(N, H, V, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2 / H**0.25).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) / H**0.25).to(DEVICE, dtype)
    b = torch.randn(V, generator=g).to(DEVICE, dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    g_lp, g_ent = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    return h, w, b, y, g_lp, g_ent


def _grads(fn, h, w, b, y, g_lp, g_ent, active=None, **kw):
    h, w, b = leaf(h), leaf(w), leaf(b)
    logp, ent = fn(h, w, b, y, active, **kw)
    (logp * g_lp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


def _reference(h, w, b, y, g_lp, g_ent, active, temperature, dtype, head=(1.0, None)):
    """Same quantities through materialized logits, computed in ``dtype``; ``head``: (logit_scale, softcap)."""
    h, w, b = leaf(h), leaf(w), leaf(b)
    logp, ent = reference_logprobs(
        h, w, y, b, temperature, compute_dtype=dtype, logit_scale=head[0], final_logit_softcapping=head[1]
    )
    if active is not None:
        logp, ent = torch.where(active, logp, 0.0), torch.where(active, ent, 0.0)
    (logp * g_lp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "bias,temperature,with_active,head",
    # head: (logit_scale, softcap); a cap of 2.5 saturates tanh on these logits (|z| up to ~6).
    [(False, 1.0, False, (1.0, None)), (True, 0.7, True, (1.0, None)), (True, 0.8, True, (0.6, 2.5))],
    ids=["plain", "bias-temperature-active", "scale-softcap"],
)
def test_logprobs_entropy_and_grads(impl, dtype, bias, temperature, with_active, head):
    N, H, V = 37, 72, 1003  # nothing a multiple of a tile
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, dtype, seed=1, bias=bias)
    active = (torch.arange(N, device=DEVICE) % 5 != 2) if with_active else None
    kw = dict(temperature=temperature, logit_scale=head[0], softcap=head[1])
    got = _grads(_impl_fn(impl), h, w, b, y, g_lp, g_ent, active, **kw)
    exact = _reference(h, w, b, y, g_lp, g_ent, active, temperature, torch.float64, head)
    names = ("logp", "entropy", "dhidden", "dweight", "dbias")
    if dtype == torch.float32:
        for name, x, r in zip(names, got, exact, strict=True):
            if r is not None:
                assert rel_err(x, r) < 2e-5, name
        return
    # 16-bit: no worse than the same-dtype materialized reference's own error, plus a small slack.
    same = _reference(h, w, b, y, g_lp, g_ent, active, temperature, dtype, head)
    for name, x, s, r in zip(names, got, same, exact, strict=True):
        if r is None:
            continue
        err, budget = rel_err(x, r), rel_err(s, r)
        assert err <= 1.5 * budget + 2e-3, f"{name}: {err:.2e} vs same-dtype reference {budget:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_inactive_tokens_are_zero_and_get_no_gradient(impl):
    N, H, V = 40, 40, 300
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, torch.float32, seed=2, bias=False)
    active = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    active[33:36] = True  # only the last token block has live tokens
    logp, ent, dh, dw, _ = _grads(_impl_fn(impl), h, w, b, y, g_lp, g_ent, active)
    assert torch.all(logp[~active] == 0) and torch.all(ent[~active] == 0)
    assert torch.all(dh[~active] == 0)
    exact = _reference(h, w, b, y, g_lp, g_ent, active, 1.0, torch.float64)
    assert rel_err(dw, exact[3]) < 2e-5 and rel_err(logp, exact[0]) < 2e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_and_neg_inf_bias(impl):
    """No dWeight when the head is frozen; a -inf bias (banned tokens) stays finite."""
    N, H, V = 19, 24, 200
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, torch.float32, seed=3, bias=True)
    b[::7] = float("-inf")
    y = torch.where(y % 7 == 0, y + 1, y)  # targets are never banned tokens
    hh, bb = leaf(h), leaf(b)
    logp, ent = _impl_fn(impl)(hh, w, bb, y, None)
    (logp * g_lp + ent * g_ent).sum().backward()
    exact = _reference(h, w, b, y, g_lp, g_ent, None, 1.0, torch.float64)
    assert w.grad is None and torch.isfinite(ent).all()
    assert rel_err(logp, exact[0]) < 2e-5 and rel_err(ent, exact[1]) < 2e-5
    assert rel_err(hh.grad, exact[2]) < 2e-5
    assert rel_err(bb.grad[1::7], exact[4][1::7]) < 2e-5 and torch.all(bb.grad[::7] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_public_chunked_logprobs_shapes_tied_embedding(impl):
    """(B, T, H) inputs, int32 targets, a weight shared with an embedding (tied)."""
    B, T, H, V = 2, 11, 40, 257
    emb = torch.nn.Embedding(V, H).to(DEVICE)
    h = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    y = torch.randint(0, V, (B, T), device=DEVICE, dtype=torch.int32)
    logp, ent = fastgrpo.chunked_logprobs(h, emb.weight, y, return_entropy=True, impl=impl)
    assert logp.shape == (B, T) and ent.shape == (B, T) and logp.dtype == torch.float32
    ref = reference_logprobs(h.detach().double(), emb.weight.detach().double(), y)[0]
    assert rel_err(logp, ref) < 2e-5
    logp.sum().backward()
    assert emb.weight.grad is not None and h.grad is not None
    only = fastgrpo.chunked_logprobs(h, emb.weight, y, impl=impl)
    assert isinstance(only, torch.Tensor) and torch.allclose(only, logp)


SHAPES = pytest.mark.parametrize(
    "N, V, frozen",
    [(37, 1003, False), (300, 203, False), (300, 1003, True)],
    ids=["vocab-outer", "tokens-outer", "frozen-head"],
)


def _bounded_backward_run(kernel, dtype, N, V, frozen, eps):
    """Gradients of a masked batch through ``linear_logprobs_triton`` against float64 and the
    same-dtype reference's own error."""
    H = 72
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, dtype, seed=4, bias=True)
    active = torch.arange(N, device=DEVICE) % 7 != 3
    hh, ww, bb = leaf(h), (w if frozen else leaf(w)), leaf(b)
    logp, ent = kernel.linear_logprobs_triton(hh, ww, bb, y, active, grad_filter_eps=eps)
    (logp * g_lp + ent * g_ent).sum().backward()
    got = (hh.grad, None if frozen else ww.grad, bb.grad)
    exact = _reference(h, w, b, y, g_lp, g_ent, active, 1.0, torch.float64)[2:]
    same = _reference(h, w, b, y, g_lp, g_ent, active, 1.0, dtype)[2:]
    for name, x, r, s in zip(("dhidden", "dweight", "dbias"), got, exact, same, strict=True):
        if x is not None:
            budget = 2e-5 if dtype == torch.float32 else 1.5 * rel_err(s, r) + 2e-3
            assert rel_err(x, r) <= budget, name
    return H, int(active.sum())


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@SHAPES
def test_exact_backward_works_in_bounded_chunks(monkeypatch, dtype, N, V, frozen):
    """The exact backward's d loss / d logits workspace stays within its bound, in several chunks
    (none tile-aligned) of live tokens only, vocabulary-outer when the head is trainable and
    N <= V, token-outer otherwise; the gradients stay exact."""
    import importlib

    kernel = importlib.import_module("fastgrpo.kernels.linear_logprobs")
    dlogits = importlib.import_module("fastgrpo.kernels.linear_dlogits")
    elem = torch.finfo(dtype).bits // 8
    budget = 3 * max(N, V) * elem + 5
    monkeypatch.setattr(dlogits, "WORKSPACE_BYTES", budget)
    shapes, real = [], dlogits._alloc_workspace
    monkeypatch.setattr(dlogits, "_alloc_workspace", lambda r, k, *a: shapes.append((r, k)) or real(r, k, *a))
    H, live = _bounded_backward_run(kernel, dtype, N, V, frozen, eps=0.0)
    assert len(shapes) == 1 and shapes[0][0] * shapes[0][1] * elem <= budget
    rows, cols = shapes[0]
    if not frozen and live <= V:  # vocabulary outer: all live tokens x a vocabulary slice
        assert rows == live and 1 < cols < V
    else:  # tokens outer: a chunk of live tokens x the whole vocabulary
        assert cols == V and 1 < rows < live


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@SHAPES
def test_filtered_backward_accumulates_in_bounded_chunks(monkeypatch, dtype, N, V, frozen):
    """The filtered (atomic) backward's fp32 accumulators: the smaller gradient whole, the other in
    SCRATCH_BYTES chunks (several here, none tile-aligned), fp32 inputs none; a cut far below any
    gradient filters nothing, so the gradients stay exact."""
    import importlib

    kernel = importlib.import_module("fastgrpo.kernels.linear_logprobs")
    t = kernel._launch_constants(dtype).bwd
    H = 72
    monkeypatch.setattr(kernel, "SCRATCH_BYTES", 4 * H * (t.block_n + t.block_v + 5))
    step = {d: max(b, (t.block_n + t.block_v + 5) // b * b) for d, b in (("N", t.block_n), ("V", t.block_v))}
    shapes, real = [], kernel._scratch
    monkeypatch.setattr(kernel, "_scratch", lambda r, k, d: shapes.append((r, k)) or real(r, k, d))
    _bounded_backward_run(kernel, dtype, N, V, frozen, eps=2.0**-60)
    if dtype == torch.float32:
        assert shapes == []  # fp32 sums straight into the gradients
    elif frozen or N > V:  # dHidden in token chunks (+ the whole dWeight when trainable)
        chunks = [(min(step["N"], N - n0), H) for n0 in range(0, N, step["N"])]
        assert shapes == ([] if frozen else [(V, H)]) + chunks and len(chunks) > 1
    else:  # the whole dHidden, dWeight in vocabulary chunks
        chunks = [(min(step["V"], V - v0), H) for v0 in range(0, V, step["V"])]
        assert shapes == [(N, H)] + chunks and len(chunks) > 1


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_tokens(impl):
    """An empty micro-batch: empty outputs, zero dWeight, no launch arithmetic on N = 0."""
    w = torch.randn(50, 24, device=DEVICE, requires_grad=True)
    h = torch.randn(0, 24, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    logp, ent = fastgrpo.chunked_logprobs(h, w, y, return_entropy=True, impl=impl)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 24) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("impl", IMPLS)
def test_banned_leading_vocabulary_block(impl):
    """A -inf bias over whole leading tiles (and whole vocabulary splits) stays finite.

    The online log-sum-exp starts at m = -inf; a first tile that is all -inf must not make
    exp(-inf - -inf) = NaN, and a split with no finite logit must drop out of the merge.
    """
    N, H, V = 21, 24, 700
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, torch.float32, seed=5, bias=True)
    b[:300] = float("-inf")  # more than any interpreter tile and split (128 columns each)
    y = 300 + y % (V - 300)
    hh, bb = leaf(h), leaf(b)
    logp, ent = _impl_fn(impl)(hh, w, bb, y, None)
    (logp * g_lp + ent * g_ent).sum().backward()
    exact = _reference(h, w, b, y, g_lp, g_ent, None, 1.0, torch.float64)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert rel_err(logp, exact[0]) < 2e-5 and rel_err(ent, exact[1]) < 2e-5
    assert rel_err(hh.grad, exact[2]) < 2e-5
    assert rel_err(bb.grad[300:], exact[4][300:]) < 2e-5 and torch.all(bb.grad[:300] == 0)


@pytest.mark.skipif(not TRITON_OK, reason="triton")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_backward_with_no_live_token_keeps_the_dtype(dtype):
    """Every upstream coefficient zero: zero gradients, in the inputs' dtype (no fp32 leak)."""
    from fastgrpo.kernels.linear_dlogits import dlogits_backward

    N, H, V = 7, 24, 50
    h, w, b, y, _, _ = _inputs(N, H, V, dtype, seed=6, bias=True)
    zeros = torch.zeros(N, device=DEVICE)
    dh, dw, db = dlogits_backward(h, w, b, y, zeros, zeros, zeros, None, (1.0, 0.0), True, True)
    assert (dh.dtype, dw.dtype, db.dtype) == (dtype, dtype, dtype)
    assert dh.shape == (N, H) and dw.shape == (V, H) and db.shape == (V,)
    assert not dh.any() and not dw.any() and not db.any()


def test_forward_splits_fill_whole_waves():
    """The forward's vocabulary splits minimize waves x blocks per program (equal programs finish in waves
    of one per SM), with no empty split; the interpreter keeps a few splits to exercise the merge."""
    import triton
    from fastgrpo.kernels.linear_logprobs import PARTIALS_BYTES, _max_splits, _num_splits

    MAX_SPLITS = 64

    def cost(nb, vb, sm, s):
        return triton.cdiv(nb * s, sm) * triton.cdiv(vb, s)

    assert _num_splits(32, 1188, 132) == 33  # Qwen2.5-7B head, 4K tokens at 128 x 128 tiles: 8 full waves
    assert cost(32, 1188, 132, 33) == 288 < cost(32, 1188, 132, 9)  # 9: the former two-per-SM target
    g = torch.Generator().manual_seed(0)
    for nb, vb, sm in torch.randint(1, 700, (200, 3), generator=g).tolist():
        s = _num_splits(nb, vb, sm)
        assert 1 <= s <= min(vb, MAX_SPLITS)
        assert triton.cdiv(vb, triton.cdiv(vb, s)) == s  # every split holds vocabulary blocks
        assert all(cost(nb, vb, sm, s) <= cost(nb, vb, sm, k) for k in range(1, min(vb, MAX_SPLITS) + 1))
    assert _num_splits(2, 8, None) == 4
    # Long batches: the partials stay bounded (the waves gain at most 3% there).
    assert _max_splits(4096) == 64 and _max_splits(1 << 20) == 4 and _max_splits(0) == 64
    for n in (65_536, 1 << 20):
        assert 16 * n * _num_splits(n // 128, 1188, 132, _max_splits(n)) <= PARTIALS_BYTES


@pytest.mark.skipif(not TRITON_OK or DEVICE.type != "cpu", reason="the interpreter with a pretend GPU target")
def test_forward_with_a_gpu_split_count_matches_float64():
    """Many vocabulary splits (a 64-SM target: one 128-wide block per split) merge to the same log-probs."""
    from fastgrpo.kernels.linear_logprobs import _num_splits, linear_logprobs_triton, target_gpu

    N, H, V = 37, 72, 4003
    assert _num_splits(2, 32, 64) == 32
    h, w, b, y, g_lp, g_ent = _inputs(N, H, V, torch.float32, seed=5, bias=True)
    with target_gpu((9, 0), 64):
        got = _grads(linear_logprobs_triton, h, w, b, y, g_lp, g_ent)
    exact = _reference(h, w, b, y, g_lp, g_ent, None, 1.0, torch.float64)
    for a, e in zip(got, exact, strict=True):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_entropy_reads_only_the_masked_positions(impl):
    """masked_entropy: the float64 entropy where mask is set, 0 elsewhere, even where a target is -100;
    no gradient; hidden given as a transposed view."""
    B, T, H, V = 3, 7, 72, 1003
    h, w, b, y, _, _ = _inputs(B * T, H, V, torch.float32, seed=11, bias=True)
    hidden = h.view(T, B, H).transpose(0, 1)  # (B, T, H), not contiguous
    targets = y.view(T, B).t()
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(12)).to(DEVICE) < 0.6
    targets = torch.where(mask, targets, -100)
    got = fastgrpo.ops.masked_entropy(leaf(hidden), w, targets, mask, bias=b, temperature=0.7, impl=impl)
    _, want = reference_logprobs(hidden.double(), w.double(), targets.clamp(min=0), b.double(), 0.7, torch.float64)
    assert not got.requires_grad and got.shape == (B, T)
    assert rel_err(got[mask], want[mask]) < 1e-5 and not got[~mask].any()
