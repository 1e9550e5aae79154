"""Strided views and out-of-range labels on every path (issue 21): no silent wrong answer.

Every path reads each tensor argument through its strides (or a contiguous copy of the O(N) /
O(V) vectors at the kernel boundary), so a view gives what its ``.contiguous()`` copy gives and
what float64 gives. A target outside [0, V) on an active token yields NaN (logp, loss,
gradients) on every path even where the host-side check cannot run (``torch.compile``), and a
masked token may hold any id.
"""

import pytest
import torch

import fastgrpo
from fastgrpo.ops import checks, chunked
from fastgrpo.ops.loss import GRPOLossParams
from fastgrpo.ops.reference import reference_grpo_loss, reference_logprobs

from helpers import DEVICE, DTYPES, IMPLS, TRITON_OK, grpo_inputs, leaf, rel_err

# On CPU "auto" routes to the torch twin (``fastgrpo.ops.route``); on CUDA to chunked or fused.
ALL_IMPLS = [*IMPLS, pytest.param("auto", id="auto")]
B, T, H, V = 3, 13, 40, 1003  # 39 tokens, nothing a multiple of a tile
TEMP = 0.7
LOSS_HP = dict(beta=0.04, epsilon_high=0.28, temperature=TEMP)
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")


# ----------------------------------------------------------------------------- views


def _junk(x, shape):
    """Filler around a view's elements: wrong labels / NaN, so a misread cannot pass."""
    if x.is_floating_point():
        return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
    return torch.zeros(shape, dtype=x.dtype, device=x.device)


def column(x):
    """x as column 1 of a tensor one dimension wider (``pairs[..., 1]``): stride 2 everywhere."""
    return torch.stack([_junk(x, x.shape), x], -1)[..., 1]


def every_other(x):
    """x as ``wide[..., ::2]`` of a tensor twice as wide in the last dimension."""
    wide = _junk(x, (*x.shape[:-1], 2 * x.shape[-1]))
    wide[..., ::2] = x
    return wide[..., ::2]


def transposed(x):
    """A 2-D x stored as its transpose, e.g. a (T, B) tensor's ``.t()``."""
    return x.t().contiguous().t()


def from_tbh(x):
    """(B, T, H) hidden states transposed from a (T, B, H) tensor."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def expanded(x):
    """A stride-0 view of x's first element, for an x whose elements are all equal. It sits first
    in junk storage, so a reader that ignores the strides gets junk past it."""
    buf = _junk(x, (x.numel(),))
    buf[0] = x.reshape(-1)[0]
    return buf[0].expand(x.shape)


def row_expanded(x):
    """A (B, T) x constant along T as its first column expanded (stride 0 along T), in junk storage."""
    buf = _junk(x, x.shape)
    buf[:, 0] = x[:, 0]
    return buf[:, :1].expand(x.shape)


# kind -> {argument: view}; "targets_expand" also makes every target the same id (below).
KINDS = {
    "targets_column": dict(targets=column),
    "targets_expand": dict(targets=expanded),
    "targets_every_other": dict(targets=every_other),
    "targets_transposed": dict(targets=transposed),
    "bias_every_other": dict(bias=every_other),
    "hidden_from_TBH": dict(hidden=from_tbh),
    "hidden_strided_H": dict(hidden=column),
    "weight_transposed": dict(weight=transposed),
}
LOSS_KINDS = {
    **KINDS,
    "vectors_a": dict(
        mask=transposed,
        advantages=every_other,  # (B,)
        old_logprobs=transposed,
        ref_logprobs=every_other,
        importance_sampling_ratio=expanded,  # (B, T) stride 0 from one value
    ),
    "vectors_b": dict(
        mask=column,
        advantages=row_expanded,  # per token, one value per row
        old_logprobs=every_other,
        ref_logprobs=column,
        importance_sampling_ratio=every_other,
    ),
}
ALL_VIEWS = dict(
    targets=every_other,
    bias=every_other,
    hidden=from_tbh,
    weight=transposed,
    mask=transposed,
    advantages=every_other,
    old_logprobs=transposed,
    ref_logprobs=column,
    importance_sampling_ratio=every_other,
)


def _inputs(dtype=torch.float32, seed=0, kind=None):
    inp = grpo_inputs(B=B, T=T, H=H, V=V, dtype=dtype, seed=seed, bias=True)
    g = torch.Generator().manual_seed(seed + 100)
    r = (torch.rand(B, T, generator=g) * 2).to(DEVICE)
    inp["importance_sampling_ratio"] = torch.where(inp["mask"], r, float("nan"))
    if kind == "targets_expand":
        inp["targets"] = inp["targets"][:1, :1].expand(B, T).clone()  # one id on every token
    if kind == "vectors_b":  # per-token advantages, one value per row
        inp["advantages"] = inp["advantages"][:, None].expand(B, T).clone()
    if kind == "vectors_a":
        inp["importance_sampling_ratio"] = torch.full((B, T), 1.3, device=DEVICE)
    return inp


def _viewed(inp, views):
    out = dict(inp)
    for name, view in views.items():
        out[name] = view(inp[name])
        a, b = out[name], inp[name]
        same = torch.equal(a.nan_to_num(), b.nan_to_num()) if a.is_floating_point() else torch.equal(a, b)
        assert same, name
        assert not out[name].is_contiguous(), name
    return out


# ----------------------------------------------------------------------------- calls

# Upstream gradients of chunked_logprobs' outputs: made once, outside any compiled region.
G_LP, G_ENT = torch.randn(2, B, T, generator=torch.Generator().manual_seed(1)).to(DEVICE)
LOSS_TENSORS = ("mask", "advantages", "old_logprobs", "ref_logprobs", "importance_sampling_ratio")


def _logprobs_fwd(inp, impl, h, w, b):
    """(outputs, objective): logp and entropy, and sum(G_LP * logp + G_ENT * entropy)."""
    logp, ent = fastgrpo.chunked_logprobs(
        h, w, inp["targets"], bias=b, temperature=TEMP, return_entropy=True, impl=impl
    )
    return dict(logp=logp, entropy=ent), (logp * G_LP + ent * G_ENT).sum()


def _loss_fwd(inp, impl, h, w, b):
    out = fastgrpo.fused_grpo_loss(
        h,
        w,
        inp["targets"],
        inp["mask"],
        inp["advantages"],
        old_logprobs=inp["old_logprobs"],
        ref_logprobs=inp["ref_logprobs"],
        bias=b,
        importance_sampling_ratio=inp["importance_sampling_ratio"],
        impl=impl,
        **LOSS_HP,
    )
    return dict(loss=out.loss, logp=out.logprobs, entropy=out.entropy), out.loss


def _call(entry, inp, impl, compiled=False):
    """An entry point's outputs and the gradients of its objective w.r.t. hidden, weight, bias
    (leaves keep the inputs' strides); ``compiled``: the forward under torch.compile."""
    fwd = ENTRIES[entry][0]
    h, w, b = leaf(inp["hidden"]), leaf(inp["weight"]), leaf(inp["bias"])

    def fn(hidden, weight, bias):
        return fwd(inp, impl, hidden, weight, bias)

    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="eager")
    out, objective = fn(h, w, b)
    objective.backward()
    return dict(out, dhidden=h.grad, dweight=w.grad, dbias=b.grad)


def _logprobs_reference(inp, dtype):
    h, w, b = (leaf(inp[k], dtype) for k in ("hidden", "weight", "bias"))
    logp, ent = reference_logprobs(h, w, inp["targets"], b, TEMP, compute_dtype=dtype)
    (logp * G_LP.to(logp.dtype) + ent * G_ENT.to(ent.dtype)).sum().backward()
    return dict(logp=logp, entropy=ent, dhidden=h.grad, dweight=w.grad, dbias=b.grad)


def _loss_reference(inp, dtype):
    m = inp["mask"]
    clean = {k: torch.where(m, inp[k], 0.0) for k in ("old_logprobs", "ref_logprobs", "importance_sampling_ratio")}
    adv = inp["advantages"]
    h, w, b = (leaf(inp[k], dtype) for k in ("hidden", "weight", "bias"))
    loss, logp, ent, _ = reference_grpo_loss(
        h,
        w,
        inp["targets"].clamp(min=0),
        m,
        adv if adv.dim() == 1 else torch.where(m, adv, 0.0),
        bias=b,
        params=GRPOLossParams(**LOSS_HP),
        compute_dtype=dtype,
        **clean,
    )
    loss.backward()
    z = torch.zeros((), dtype=logp.dtype)
    return dict(
        loss=loss,
        logp=torch.where(m, logp, z),
        entropy=torch.where(m, ent, z),
        dhidden=h.grad,
        dweight=w.grad,
        dbias=b.grad,
    )


ENTRIES = {"logprobs": (_logprobs_fwd, _logprobs_reference), "loss": (_loss_fwd, _loss_reference)}


def _err(x, r):
    x, r = x.detach(), r.detach()
    if x.dim() == 0:
        return abs(float(x) - float(r)) / max(1.0, abs(float(r)))
    return rel_err(x, r)


def _check(got, want, budget, what):
    bad = {k: (_err(got[k], want[k]), budget(k)) for k in want if not _err(got[k], want[k]) <= budget(k)}
    assert not bad, f"{what}: {bad}"


# ----------------------------------------------------------------------------- strided views


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_logprobs_strided_views(impl, kind):
    """chunked_logprobs on one strided argument: the contiguous call's answer and float64's (fp32)."""
    inp = _inputs(seed=2, kind=kind)
    inp["targets"] = inp["targets"].clamp(min=0)  # no mask here: every token counts
    got = _call("logprobs", _viewed(inp, KINDS[kind]), impl)
    _check(got, _call("logprobs", inp, impl), lambda k: 1e-6, "vs contiguous")
    _check(got, _logprobs_reference(inp, torch.float64), lambda k: 2e-5, "vs float64")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("kind", list(LOSS_KINDS))
def test_loss_strided_views(impl, kind):
    """fused_grpo_loss (masked rows, NaN / -inf / -100 padding) on strided arguments: loss, logp,
    entropy and gradients as the contiguous call and float64 give them (fp32)."""
    inp = _inputs(seed=3, kind=kind)
    got = _call("loss", _viewed(inp, LOSS_KINDS[kind]), impl)
    _check(got, _call("loss", inp, impl), lambda k: 1e-6, "vs contiguous")
    _check(got, _loss_reference(inp, torch.float64), lambda k: 2e-5, "vs float64")


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_all_views_every_dtype(impl, dtype, entry):
    """Every argument strided at once, in every dtype. 16-bit: no worse than the same-dtype
    materialized reference's own error vs float64, plus slack (the existing tests' budget), and
    the contiguous call's answer up to the reordering of a sum."""
    reference = ENTRIES[entry][1]
    inp = _inputs(dtype=dtype, seed=11)  # test_grpo_loss's 16-bit seed
    if entry == "logprobs":
        inp["targets"] = inp["targets"].clamp(min=0)
    views = {k: v for k, v in ALL_VIEWS.items() if entry == "loss" or k not in LOSS_TENSORS}
    got = _call(entry, _viewed(inp, views), impl)
    plain = _call(entry, inp, impl)
    exact = reference(inp, torch.float64)
    # A strided layout may reorder a sum (the epilogue's reductions follow memory order): a few
    # fp32 ulps, at most one 16-bit rounding step.
    _check(got, plain, lambda k: 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps, "vs contiguous")
    if dtype == torch.float32:
        _check(got, exact, lambda k: 2e-5, "vs float64")
        return
    same = reference(inp, dtype)

    def budget(k):
        return 1.5 * _err(same[k], exact[k]) + (1e-3 if k == "loss" else 2e-3)

    _check(got, exact, budget, "vs float64")


# The lifted refusals' terms (issue 27): a softcapped, scaled head and the entropy bonus over TRL's top-entropy mask.
HEAD_AND_BONUS = dict(LOSS_HP, logit_scale=0.8, final_logit_softcapping=2.5, entropy_coef=0.2)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_all_views_with_a_softcapped_head_and_the_entropy_bonus(impl):
    """Every argument strided at once, the entropy mask too (a transposed 0/1 float view), with a softcapped,
    scaled head and the entropy bonus: the contiguous call's answer and float64's (fp32)."""
    inp = _inputs(seed=13)
    g = torch.Generator().manual_seed(14)
    inp["entropy_mask"] = (torch.rand(B, T, generator=g) < 0.6).float().to(DEVICE)
    views = dict(ALL_VIEWS, entropy_mask=transposed)

    def run(x):
        h, w, b = leaf(x["hidden"]), leaf(x["weight"]), leaf(x["bias"])
        out = fastgrpo.fused_grpo_loss(
            h, w, x["targets"], x["mask"], x["advantages"], old_logprobs=x["old_logprobs"],
            ref_logprobs=x["ref_logprobs"], bias=b, importance_sampling_ratio=x["importance_sampling_ratio"],
            entropy_mask=x["entropy_mask"], impl=impl, **HEAD_AND_BONUS,
        )  # fmt: skip
        out.loss.backward()
        return dict(loss=out.loss, logp=out.logprobs, entropy=out.entropy, dhidden=h.grad, dweight=w.grad,
                    dbias=b.grad)  # fmt: skip

    got = run(_viewed(inp, views))
    _check(got, run(inp), lambda k: 1e-5, "vs contiguous")
    m = inp["mask"]
    clean = {k: torch.where(m, inp[k], 0.0) for k in ("old_logprobs", "ref_logprobs", "importance_sampling_ratio")}
    h, w, b = (leaf(inp[k], torch.float64) for k in ("hidden", "weight", "bias"))
    loss, logp, ent, _ = reference_grpo_loss(
        h, w, inp["targets"].clamp(min=0), m, inp["advantages"], bias=b, params=GRPOLossParams(**HEAD_AND_BONUS),
        compute_dtype=torch.float64, entropy_mask=inp["entropy_mask"], **clean,
    )  # fmt: skip
    loss.backward()
    z = torch.zeros((), dtype=logp.dtype)
    want = dict(loss=loss, logp=torch.where(m, logp, z), entropy=torch.where(m, ent, z), dhidden=h.grad,
                dweight=w.grad, dbias=b.grad)  # fmt: skip
    _check(got, want, lambda k: 2e-5, "vs float64")


@needs_triton
@pytest.mark.parametrize("eps", [0.0, 2.0**-12], ids=["exact", "filtered"])
def test_kernel_launchers_take_strided_vectors(eps):
    """Direct callers of the launchers (no public-op boundary): strided targets, active and bias
    (and a transposed weight) into the fused forward and either backward; strided bias, targets,
    lse and grad into the row kernels; the same numbers as contiguous copies."""
    from fastgrpo.kernels import linear_logprobs_triton
    from fastgrpo.kernels.logits_rows import row_grad_, row_stats

    inp = _inputs(seed=5)
    N = B * T
    h, w, b = inp["hidden"].reshape(N, H), inp["weight"], inp["bias"]
    y = inp["targets"].reshape(-1).clamp(min=0)
    active = inp["mask"].reshape(-1)
    g_lp, g_ent = G_LP.reshape(-1), G_ENT.reshape(-1)

    def fused(weight, bias, targets, act):
        hh, ww, bb = leaf(h), leaf(weight), leaf(bias)
        logp, ent = linear_logprobs_triton(hh, ww, bb, targets, act, TEMP, eps)
        (logp * g_lp + ent * g_ent).sum().backward()
        return dict(logp=logp, entropy=ent, dhidden=hh.grad, dweight=ww.grad, dbias=bb.grad)

    got = fused(transposed(w), every_other(b), column(y), column(active))
    _check(got, fused(w, b, y, active), lambda k: 1e-6, "fused vs contiguous")

    z = (h.double() @ w.double().T).float()
    want = row_stats(z, b, y, 1 / TEMP)
    got = row_stats(z, every_other(b), column(y), 1 / TEMP)
    for name, x, r in zip(("logp", "lse", "entropy"), got, want, strict=True):
        assert rel_err(x, r) < 1e-6, name
    lse = want[1]
    dz = row_grad_(z.clone(), every_other(b), column(y), column(lse), every_other(g_lp), 1 / TEMP)
    assert rel_err(dz, row_grad_(z.clone(), b, y, lse, g_lp, 1 / TEMP)) < 1e-6


# ----------------------------------------------------------------------------- out-of-range labels

BAD_LABELS = [pytest.param(V + 5, id="V+5"), pytest.param(-3, id="-3")]
BAD = {(0, 0): V + 5, (2, 0): -3}  # active tokens: grpo_inputs masks row 1 only wholly


@pytest.fixture
def unchecked(monkeypatch):
    """The host-side value checks off, as while torch.compile traces."""
    monkeypatch.setattr(checks, "values_checked", lambda: False)


def _bad_inputs(entry):
    inp = _inputs(seed=7)
    if entry == "logprobs":  # no mask: every other token valid
        inp["targets"] = inp["targets"].clamp(min=0)
    for pos, label in BAD.items():
        assert inp["mask"][pos]
        inp["targets"][pos] = label
    return inp


def _assert_nan_at_bad(out):
    logp = out["logp"]
    for pos, label in BAD.items():
        assert torch.isnan(logp[pos]), f"label {label}: logp {float(logp[pos])}"
    others = torch.ones_like(logp, dtype=torch.bool)
    for pos in BAD:
        others[pos] = False
    assert torch.isfinite(logp[others]).all()
    if "loss" in out:
        assert torch.isnan(out["loss"]), f"loss {float(out['loss'])}"
    for k in ("dhidden", "dweight", "dbias"):
        assert torch.isnan(out[k]).any(), f"{k} finite"


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_out_of_range_labels_are_nan_under_compile(impl, entry):
    """torch.compile skips the host check: the op itself turns labels V + 5 and -3 on active
    tokens into NaN (logp there, the loss, the gradients); the other tokens stay finite."""
    _assert_nan_at_bad(_call(entry, _bad_inputs(entry), impl, compiled=True))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_out_of_range_labels_are_nan_without_the_host_check(unchecked, impl, entry):
    _assert_nan_at_bad(_call(entry, _bad_inputs(entry), impl))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_masked_ignore_index_changes_nothing(impl, compiled):
    """Masked tokens holding -100 give exactly what they give holding 0."""
    inp = _inputs(seed=8)
    assert (inp["targets"] == -100).any()
    got = _call("loss", inp, impl, compiled)
    want = _call("loss", dict(inp, targets=inp["targets"].clamp(min=0)), impl, compiled)
    for k in want:
        assert torch.isfinite(got[k]).all() and torch.equal(got[k], want[k]), k


def test_eager_host_check_still_names_the_label():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1003\), got values in \[-3, 1008\]"):
        _call("loss", _bad_inputs("loss"), "torch")


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param("torch", id="torch-rows"),
        pytest.param("triton", id="triton-rows", marks=needs_triton),
    ],
)
@pytest.mark.parametrize("label", BAD_LABELS)
def test_row_kernels_read_nothing_outside_the_row(rows, label):
    """The row kernels on a workspace slice whose neighbours hold plausible logits: a bad id
    reads none of them (-3 on the first row would read the row before, V + 5 on the last the row
    after) and reports NaN; that row's gradient is NaN, the other rows are untouched."""
    R = 9
    g = torch.Generator().manual_seed(9)
    big = torch.randn(R + 2, V, generator=g).to(DEVICE)
    z = big[1 : R + 1]
    y = torch.randint(0, V, (R,), generator=g).to(DEVICE)
    stats, grad_ = chunked._rows(rows)
    good = stats(z, None, y, 1.0)
    bad_row = 0 if label < 0 else R - 1
    y_bad = y.clone()
    y_bad[bad_row] = label
    logp, lse, ent = stats(z, None, y_bad, 1.0)
    assert torch.isnan(logp[bad_row]), float(logp[bad_row])
    keep = torch.arange(R, device=DEVICE) != bad_row
    assert torch.equal(logp[keep], good[0][keep]) and torch.equal(lse, good[1]) and torch.equal(ent, good[2])
    g_lp = torch.ones(R, device=DEVICE)
    dz = grad_(z.clone(), None, y_bad, lse, g_lp, 1.0)
    assert torch.isnan(dz[bad_row]).all()
    assert torch.equal(dz[keep], grad_(z.clone(), None, y, lse, g_lp, 1.0)[keep])
