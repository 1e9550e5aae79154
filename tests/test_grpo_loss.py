"""fused_grpo_loss (every path) against TRL's formulas on float64 materialized logits."""

import itertools

import pytest
import torch

import fastgrpo
from fastgrpo import GRPOLossParams
from fastgrpo.ops.reference import reference_grpo_loss

from helpers import DEVICE, IMPLS, TRITON_OK, grpo_inputs, leaf, loss_args, rel_err

HP = dict(epsilon=0.2, epsilon_high=0.28)
MATRIX = list(itertools.product(fastgrpo.LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (None, 1.5), (1.0, 0.7)))


def _clean(x, mask, fill=0.0):
    """The reference multiplies by the mask as TRL does, so it needs finite padding."""
    return None if x is None else torch.where(mask, x, fill)


def _run_fused(inp, impl, dtype=None, **hp):
    h, w = leaf(inp["hidden"], dtype), leaf(inp["weight"], dtype)
    b = leaf(inp.get("bias"), dtype)
    out = fastgrpo.fused_grpo_loss(
        h,
        w,
        inp["targets"],
        inp["mask"],
        inp["advantages"],
        old_logprobs=inp.get("old_logprobs"),
        ref_logprobs=inp.get("ref_logprobs"),
        bias=b,
        impl=impl,
        **hp,
    )
    out.loss.backward()
    return out, h.grad, w.grad, None if b is None else b.grad


def _run_reference(inp, compute_dtype=torch.float64, **hp):
    m = inp["mask"]
    num_items = hp.pop("num_items_in_batch", None)
    is_ratio = hp.pop("importance_sampling_ratio", None)
    sampling = _clean(hp.pop("sampling_logprobs", None), m)
    entropy_mask = hp.pop("entropy_mask", None)
    params = GRPOLossParams(**hp)
    h = leaf(inp["hidden"], compute_dtype)
    w = leaf(inp["weight"], compute_dtype)
    b = leaf(inp.get("bias"), compute_dtype)
    adv = inp["advantages"]
    loss, logp, ent, metrics = reference_grpo_loss(
        h,
        w,
        inp["targets"].clamp(min=0),
        m,
        adv if adv.dim() == 1 else _clean(adv, m),
        old_logprobs=_clean(inp.get("old_logprobs"), m),
        ref_logprobs=_clean(inp.get("ref_logprobs"), m),
        bias=b,
        params=params,
        num_items_in_batch=num_items,
        compute_dtype=compute_dtype,
        importance_sampling_ratio=is_ratio,
        sampling_logprobs=sampling,
        entropy_mask=entropy_mask,
    )
    loss.backward()
    return loss, logp, ent, metrics, h.grad, w.grad, None if b is None else b.grad


def _check_against_reference(out, grads, ref, tol):
    loss, logp, ent, metrics, dh, dw, db = ref
    m = out.logprobs != 0
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss) - float(loss)) <= tol * max(1.0, abs(float(loss))), (float(out.loss), float(loss))
    assert rel_err(out.logprobs[m], logp[m]) < tol
    for name, g, r in zip(("dhidden", "dweight", "dbias"), grads, (dh, dw, db), strict=True):
        if r is not None:
            assert rel_err(g, r) < tol, name
    assert set(out.metrics) == set(metrics)
    for k, v in metrics.items():
        assert abs(float(out.metrics[k]) - float(v)) < tol, k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level,beta,delta,temperature", MATRIX)
def test_loss_matrix_fp32(impl, loss_type, level, beta, delta, temperature):
    inp = grpo_inputs(seed=fastgrpo.LOSS_TYPES.index(loss_type) * 2 + (level == "sequence"))
    hp = dict(
        HP,
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=beta,
        delta=delta,
        temperature=temperature,
        max_completion_length=13 if loss_type == "dr_grpo" else None,
    )
    if loss_type == "cispo":
        hp["epsilon_high"] = 1.1  # cispo caps the ratio itself at epsilon_high
    out, *grads = _run_fused(inp, impl, **hp)
    _check_against_reference(out, grads, _run_reference(inp, **hp), tol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "extra",
    [
        dict(loss_type="grpo", per_token_adv=True),
        dict(loss_type="dapo", bias=True, use_bias_correction_kl=True, beta=0.04),
        dict(loss_type="dapo", num_items_in_batch=57, beta=0.04),
        dict(loss_type="bnpo", no_old=True, beta=0.1),
        dict(loss_type="sapo", importance_sampling_level="sequence", per_token_adv=True),
        dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.04, no_old=True),
        dict(loss_type="dapo", is_ratio="token", beta=0.04),
        dict(loss_type="grpo", is_ratio="row", importance_sampling_level="sequence"),
        dict(loss_type="cispo", is_ratio="token"),
        dict(loss_type="vespo", per_token_adv=True, beta=0.04),
        dict(loss_type="vespo", is_ratio="token", vespo_k_pos=1.0, vespo_lambda_neg=0.5),
        dict(loss_type="vespo", is_ratio="row", use_bias_correction_kl=True, beta=0.04, no_old=True),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_loss_variants(impl, extra):
    extra = dict(extra)
    per_token = extra.pop("per_token_adv", False)
    no_old = extra.pop("no_old", False)
    inp = grpo_inputs(seed=7, bias=extra.pop("bias", False))
    if per_token:
        g = torch.Generator().manual_seed(8)
        adv = torch.randn(inp["mask"].shape, generator=g).to(DEVICE)
        inp["advantages"] = torch.where(inp["mask"], adv, float("nan"))  # NaN padding must not leak
    if no_old:
        inp["old_logprobs"] = None
    hp = dict(HP, **extra)
    if "is_ratio" in hp:  # TRL's truncated pi_old / pi_sampler correction, NaN where masked
        B, T = inp["mask"].shape
        g = torch.Generator().manual_seed(9)
        r = torch.rand(B, T if hp.pop("is_ratio") == "token" else 1, generator=g).to(DEVICE) * 2
        hp["importance_sampling_ratio"] = torch.where(inp["mask"], r, float("nan")) if r.shape[1] == T else r
    out, *grads = _run_fused(inp, impl, **hp)
    ref_hp = dict(hp)
    ratio = ref_hp.get("importance_sampling_ratio")
    if ratio is not None and ratio.shape == inp["mask"].shape:  # a (B, 1) row ratio has no padding to clean
        ref_hp["importance_sampling_ratio"] = _clean(ratio, inp["mask"])
    _check_against_reference(out, grads, _run_reference(inp, **ref_hp), tol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence"), ("cispo", "token")])
def test_loss_16bit_earns_its_tolerance(impl, dtype, loss_type, level):
    """16-bit error vs float64 is no worse than the same-dtype naive PyTorch path's, plus slack."""
    inp = grpo_inputs(seed=11, dtype=dtype)
    hp = dict(HP, loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    out, dh, dw, _ = _run_fused(inp, impl, **hp)
    exact = _run_reference(inp, **hp)
    same = _run_reference(inp, compute_dtype=dtype, **hp)
    loss_err = abs(float(out.loss) - float(exact[0]))
    loss_budget = abs(float(same[0]) - float(exact[0]))
    assert loss_err <= 1.5 * loss_budget + 1e-3 * max(1.0, abs(float(exact[0])))
    for name, g, s, r in (("dhidden", dh, same[4], exact[4]), ("dweight", dw, same[5], exact[5])):
        err, budget = rel_err(g, r), rel_err(s, r)
        assert err <= 1.5 * budget + 2e-3, f"{name}: {err:.2e} vs same-dtype reference {budget:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_gives_zero_loss_and_zero_grads(impl):
    inp = grpo_inputs(seed=3)
    inp["mask"] = torch.zeros_like(inp["mask"])
    for loss_type in fastgrpo.LOSS_TYPES:
        out, dh, dw, _ = _run_fused(inp, impl, loss_type=loss_type, beta=0.04, max_completion_length=13)
        assert float(out.loss) == 0.0
        assert torch.all(dh == 0) and torch.all(dw == 0)
        assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("impl", IMPLS)
def test_module_matches_function(impl):
    inp = grpo_inputs(seed=5)
    mod = fastgrpo.FusedGRPOLoss(loss_type="grpo", beta=0.04, epsilon_high=0.28, impl=impl)
    args, logprobs = loss_args(inp)
    got = mod(*args, **logprobs)
    want, *_ = _run_fused(inp, impl, loss_type="grpo", beta=0.04, epsilon_high=0.28)
    assert torch.allclose(got.loss, want.loss.detach(), rtol=1e-6, atol=1e-7)
    assert "loss_type='grpo'" in repr(mod)


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_impls_agree_with_each_other():
    inp = grpo_inputs(seed=9, bias=True)
    a, *ga = _run_fused(inp, "torch", loss_type="dapo", beta=0.04)
    for impl in ("triton", "fused", "chunked"):
        b, *gb = _run_fused(inp, impl, loss_type="dapo", beta=0.04)
        assert abs(float(a.loss) - float(b.loss)) < 1e-6, impl
        for x, y in zip(ga, gb, strict=True):
            assert rel_err(x, y) < 1e-5, impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["sampler", "old", "per-token-advantages", "sequence-level"])
def test_off_policy_sequence_mask(impl, case):
    """TRL's off_policy_mask_threshold: a negative-advantage row whose mean log(pi_sampling / pi) is above the
    threshold loses its policy term, not its KL; the sampler's log-probs (NaN where masked, as vLLM leaves
    them), else the old ones, measure it. Rows are both kept and dropped here, on every path."""
    from fastgrpo.ops.loss import off_policy_mask

    inp = grpo_inputs(B=8, seed=41)
    m = inp["mask"]
    g = torch.Generator().manual_seed(42)
    hp = dict(HP, loss_type="dapo", beta=0.04, off_policy_mask_threshold=0.02)
    if case == "sampler":
        noise = (0.3 * torch.randn(m.shape, generator=g) + 0.1 * torch.arange(8)[:, None]).to(DEVICE)
        hp["sampling_logprobs"] = torch.where(m, inp["old_logprobs"] + noise, float("nan"))
    if case == "per-token-advantages":
        adv = torch.randn(m.shape, generator=g).to(DEVICE)
        inp["advantages"] = torch.where(m, adv, float("nan"))
    if case == "sequence-level":
        hp.update(loss_type="grpo", importance_sampling_level="sequence")
    out, *grads = _run_fused(inp, impl, **hp)
    ref = _run_reference(inp, **hp)
    _check_against_reference(out, grads, ref, tol=2e-5)
    sampling = hp.get("sampling_logprobs", inp["old_logprobs"])
    adv = inp["advantages"]
    adv = adv[:, None] if adv.dim() == 1 else torch.where(m, adv, 0.0)
    keep = off_policy_mask(adv, ref[1].float(), sampling, m, 0.02)
    live = m.any(1, keepdim=True) if keep.shape[1] == 1 else m
    kept = keep.expand(m.shape)[live.expand(m.shape)]
    assert kept.min() == 0 and kept.max() == 1  # the mask both keeps and drops
    assert fastgrpo.ops.route("chunked", DEVICE, couples_rows=True) == "torch"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="dapo", entropy_coef=0.05, beta=0.04),
        dict(loss_type="grpo", entropy_coef=0.3, entropy_mask=True, temperature=0.7, bias=True),
        dict(loss_type="bnpo", entropy_coef=-0.2, num_items_in_batch=57),
        dict(loss_type="cispo", entropy_coef=0.1, entropy_mask=True, epsilon_high=1.1, is_ratio=True),
        dict(loss_type="grpo", entropy_coef=0.2, entropy_mask=True, importance_sampling_level="sequence"),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_entropy_bonus(impl, case):
    """TRL's entropy_coef: the loss minus coef x the mean entropy over the loss tokens the top-entropy mask keeps,
    its gradient through every path's backward (on the chunked path, formed in the row kernels' forward); the
    mask also gates the policy term. Held to the float64 transcription, and the bonus moves the gradient."""
    hp = dict(HP, **case)
    inp = grpo_inputs(B=5, seed=51, bias=hp.pop("bias", False))
    m = inp["mask"]
    g = torch.Generator().manual_seed(52)
    if hp.pop("entropy_mask", False):  # a 0/1 float mask, set on padding too (only the loss mask's tokens count)
        hp["entropy_mask"] = (torch.rand(m.shape, generator=g) < 0.6).float().to(DEVICE)
    if hp.pop("is_ratio", False):
        r = torch.rand(m.shape, generator=g).to(DEVICE) * 2
        hp["importance_sampling_ratio"] = torch.where(m, r, float("nan"))
    out, *grads = _run_fused(inp, impl, **hp)
    ref_hp = dict(hp)
    if "importance_sampling_ratio" in ref_hp:
        ref_hp["importance_sampling_ratio"] = _clean(ref_hp["importance_sampling_ratio"], m)
    ref = _run_reference(inp, **ref_hp)
    _check_against_reference(out, grads, ref, tol=2e-5)
    assert float(out.metrics["policy_loss"]) != float(out.loss)
    without = _run_reference(inp, **dict(ref_hp, entropy_coef=0.0))
    assert rel_err(ref[4], without[4]) > 1e-3  # the bonus changes d hidden: the comparison above can fail


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
def test_row_kernels_match_twin_and_float64(dtype, softcap):
    """The Triton row kernels (statistics; gradient with the entropy term) against their torch twins and a float64
    autograd of g * logp + g_H * H, with a -inf bias (without a cap a banned token: p = 0 adds nothing; with one,
    tanh makes it -cap, as transformers does) and an odd row count; a cap of 4 saturates these logits."""
    from fastgrpo.kernels._args import logit_scales
    from fastgrpo.kernels.logits_rows import row_grad_, row_stats

    from fastgrpo.ops.chunked import _row_grad_torch_, _row_stats_torch

    g = torch.Generator().manual_seed(61)
    R, V = 37, 1003
    z = (3 * torch.randn(R, V, generator=g)).to(DEVICE, dtype)
    bias = torch.randn(V, generator=g).to(DEVICE, dtype)
    bias[7] = float("-inf")
    y = torch.randint(0, V, (R,), generator=g).to(DEVICE)
    g_lp, g_ent = torch.randn(R, generator=g).to(DEVICE), torch.randn(R, generator=g).to(DEVICE)
    inv_temp, cap = logit_scales(0.7, 1.3, softcap)
    stats = row_stats(z, bias, y, inv_temp, cap)
    logp, lse, ent = stats
    got = row_grad_(z.clone(), bias, y, lse, g_lp, inv_temp, ent, g_ent, softcap=cap)
    twin = _row_grad_torch_(z.clone(), bias, y, lse, g_lp, inv_temp, ent, g_ent, softcap=cap)
    zz = (z.double() + bias.double()).requires_grad_()
    t = zz * 1.3
    u = (t if softcap is None else softcap * torch.tanh(t / softcap)) / 0.7
    lp_all = u.log_softmax(-1)
    h = -(lp_all.exp() * torch.where(torch.isfinite(lp_all), lp_all, 0.0)).sum(-1)
    want_logp = lp_all.gather(1, y[:, None]).squeeze(1)
    (g_lp.double() * want_logp + g_ent.double() * h).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b, want in zip(("logp", "lse", "entropy"), stats, _row_stats_torch(z, bias, y, inv_temp, cap),
                                (want_logp, u.logsumexp(-1), h), strict=True):  # fmt: skip
        assert rel_err(a, want) < tol and rel_err(b, want) < tol, name
    want = torch.nan_to_num(zz.grad, nan=0.0)  # d / d z
    assert rel_err(got.float(), want) < tol and rel_err(twin.float(), want) < tol
    assert torch.all(got[:, 7] == 0)  # the derivative of a -inf logit (tanh'(-inf) = 0 with a cap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case",
    [
        dict(loss_type="dapo", final_logit_softcapping=2.0, beta=0.04),
        dict(loss_type="grpo", final_logit_softcapping=3.0, logit_scale=0.6, temperature=0.7, bias=True),
        dict(loss_type="cispo", logit_scale=1.15, epsilon_high=1.1),
        dict(loss_type="dapo", final_logit_softcapping=2.5, entropy_coef=0.2, entropy_mask=True),
        dict(loss_type="grpo", final_logit_softcapping=2.5, importance_sampling_level="sequence", beta=0.04),
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_logit_transform(impl, case):
    """A softcapped (Gemma 2) or scaled (Cohere) head on every path, with the temperature, bias, KL, entropy
    bonus and GSPO, held to the float64 transcription; the transform moves the loss (the check can fail)."""
    hp = dict(HP, **case)
    inp = grpo_inputs(B=4, seed=71, bias=hp.pop("bias", False))
    if hp.pop("entropy_mask", False):
        g = torch.Generator().manual_seed(72)
        hp["entropy_mask"] = (torch.rand(inp["mask"].shape, generator=g) < 0.5).to(DEVICE)
    out, *grads = _run_fused(inp, impl, **hp)
    _check_against_reference(out, grads, _run_reference(inp, **hp), tol=2e-5)
    plain = _run_reference(inp, **dict(hp, logit_scale=1.0, final_logit_softcapping=None))
    assert abs(float(out.loss) - float(plain[0])) > 1e-3


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_logit_transform_with_gradient_filtering_stays_within_eps():
    """The fused backward's filter bounds dropped entries by eps x the token's scale x the transform's largest
    slope (inv_temp x cap's tanh' at 0): with a softcap the filtered gradient stays within that of the exact one."""
    inp = grpo_inputs(B=4, seed=73)
    hp = dict(HP, loss_type="dapo", final_logit_softcapping=2.0, logit_scale=0.8, temperature=0.9)
    exact, *g_exact = _run_fused(inp, "fused", **hp)
    filtered, *g_filt = _run_fused(inp, "fused", grad_filter_eps=2.0**-12, **hp)
    assert float(filtered.loss) == float(exact.loss)
    for a, b in zip(g_filt[:2], g_exact[:2], strict=True):
        assert rel_err(a, b) < 1e-3
