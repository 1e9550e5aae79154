"""The 3-GEMM chunked path: row kernels, the workspace bound, routes, the forward-formed gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgrpo
from fastgrpo.ops import api, checks, chunked
from fastgrpo.ops.loss import GRPOLossParams, grpo_loss_from_logprobs, loss_spec, token_terms, token_weights
from fastgrpo.ops.reference import reference_grpo_loss

from helpers import DEVICE, DTYPES, TRITON_OK, grpo_inputs, leaf, loss_args, rel_err

ROWS = [
    pytest.param("torch", id="torch-rows"),
    pytest.param("triton", id="triton-rows", marks=pytest.mark.skipif(not TRITON_OK, reason="triton rows")),
]


def _rows_inputs(R, V, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, V, generator=g) * 3).to(DEVICE, dtype)
    b = None
    if bias:
        b = torch.randn(V, generator=g)
        b[V // 3] = float("-inf")  # a banned token: p = 0, and 0 * log 0 counts as 0
        b = b.to(DEVICE, dtype)
    y = torch.randint(0, V, (R,), generator=g)
    y[y == V // 3] = 0
    return z, b, y.to(DEVICE), torch.randn(R, generator=g).to(DEVICE)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_row_kernels_against_float64(rows, dtype, bias):
    R, V, temp = 37, 1003, 0.7
    z, b, y, g = _rows_inputs(R, V, dtype, seed=R + bias, bias=bias)
    stats, grad_ = chunked._rows(rows)
    logp, lse, ent = stats(z, b, y, 1 / temp)
    dz = grad_(z.clone(), b, y, lse, g, 1 / temp)

    u = (z.double() + (0 if b is None else b.double())) / temp
    u = u.requires_grad_()
    lp_all = u.log_softmax(-1)
    want_lp = lp_all.gather(1, y[:, None]).squeeze(1)
    want_ent = -(lp_all.exp() * torch.where(torch.isfinite(lp_all), lp_all, 0.0)).sum(-1)
    (want_dz,) = torch.autograd.grad((want_lp * g.double()).sum(), u)
    want_dz = want_dz / temp  # d / d z = d / d u * inv_temp
    assert rel_err(logp, want_lp) < 1e-5 and rel_err(ent, want_ent) < 1e-5
    assert rel_err(lse, torch.logsumexp(u.detach(), -1)) < 1e-6
    # One ulp of the 16-bit store: the CPU interpreter rounds toward zero, GPUs to nearest (half an ulp).
    tol = 1e-6 if dtype == torch.float32 else 2 ** -(7 if dtype == torch.bfloat16 else 10)
    assert dz.dtype == dtype and rel_err(dz, want_dz) < tol


def _loss(inp, impl, **kw):
    h, w = leaf(inp["hidden"]), leaf(inp["weight"])
    b = leaf(inp.get("bias"))
    args, lp = loss_args(inp)
    mod = fastgrpo.FusedGRPOLoss(impl=impl, **kw)
    out = mod(h, w, *args[2:], **lp, bias=b)
    out.loss.backward()
    return out, mod.last_route, (h.grad, w.grad, None if b is None else b.grad)


@pytest.mark.parametrize("rows", ROWS)
def test_workspace_stays_within_its_budget(rows, monkeypatch):
    """A budget of a few rows: many chunks, every workspace within the budget, same answer."""
    inp = grpo_inputs(B=4, T=9, seed=21, bias=True)
    V = inp["weight"].shape[0]
    budget = 5 * chunked.row_cost(V, torch.float32, rows) + 7
    sizes = []
    alloc = chunked._alloc_workspace

    def watch(n, vocab, dtype, device):
        ws = alloc(n, vocab, dtype, device)
        sizes.append(ws.numel() * ws.element_size())
        return ws

    monkeypatch.setattr(chunked, "_alloc_workspace", watch)
    monkeypatch.setattr(chunked, "_rows_impl", lambda device: rows)
    hp = dict(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    small, path, g_small = _loss(inp, "chunked", workspace_bytes=budget, **hp)
    assert path == "chunked" and sizes and max(sizes) <= budget
    big, _, g_big = _loss(inp, "chunked", **hp)
    twin, _, g_twin = _loss(inp, "torch", **hp)
    assert abs(float(small.loss) - float(big.loss)) < 1e-6 and abs(float(small.loss) - float(twin.loss)) < 1e-6
    for a, b, c in zip(g_small, g_big, g_twin, strict=True):
        assert rel_err(a, b) < 1e-5 and rel_err(a, c) < 1e-5
    if DEVICE.type == "cpu":
        assert torch.equal(small.logprobs, big.logprobs)
    else:  # cuBLAS picks its GEMM by the chunk's row count, so the rounding may differ
        assert rel_err(small.logprobs, big.logprobs) < 1e-6


def test_workspace_must_hold_one_row():
    inp = grpo_inputs(seed=22)
    args, lp = loss_args(inp)
    with pytest.raises(ValueError, match="workspace_bytes=16 is below one token's logits row"):
        fastgrpo.fused_grpo_loss(*args, **lp, impl="chunked", workspace_bytes=16)
    with pytest.raises(ValueError, match="workspace_bytes must be > 0"):
        fastgrpo.FusedGRPOLoss(impl="chunked", workspace_bytes=0)
    with pytest.raises(TypeError, match="workspace_bytes must be an int"):
        fastgrpo.fused_grpo_loss(*args, **lp, impl="chunked", workspace_bytes=1.5e9)


@pytest.mark.parametrize("loss_type", fastgrpo.LOSS_TYPES)
def test_token_weights_give_the_epilogue_loss(loss_type):
    """sum(w * per_token) is the loss the epilogue aggregates its own way, for every loss type."""
    inp = grpo_inputs(B=4, seed=23)
    m = inp["mask"]
    p = GRPOLossParams(loss_type=loss_type, beta=0.04, max_completion_length=13, epsilon_high=0.28)
    g = torch.Generator().manual_seed(5)
    logp = torch.where(m, -torch.rand(m.shape, generator=g, dtype=torch.float64).to(DEVICE) * 4, 0.0)
    old, ref = (torch.where(m, inp[k], 0.0).double() for k in ("old_logprobs", "ref_logprobs"))
    adv = inp["advantages"].double()
    spec = loss_spec(loss_type)
    log_ratio = torch.where(m, logp - old, 0.0)
    # A row weight (VESPO's) is known only from the whole row: given it, the per-token decomposition holds too.
    row_weight = None if spec.row_weight is None else spec.row_weight(log_ratio, m, None, adv[:, None], p)
    for num_items in (None, 57):
        if num_items is not None and spec.normalizer.micro_batch != "num_items":
            continue
        loss, _ = grpo_loss_from_logprobs(logp, logp, m, adv, old, ref, p, num_items)
        per_token, _, _ = token_terms(logp, log_ratio, ref, adv[:, None], m, p, None, row_weight)
        w = token_weights(m, p, num_items).double()
        assert torch.allclose((w * torch.where(m, per_token, 0.0)).sum(), loss.double(), rtol=1e-6, atol=0)


def test_routes():
    cpu = torch.device("cpu")
    assert api.IMPLS == ("auto", "chunked", "fused", "triton", "torch") and fastgrpo.ops.IMPLS == api.IMPLS
    assert api.route("auto", cpu) == "torch"
    assert api.route("chunked", cpu) == "chunked"
    assert api.route("chunked", cpu, importance_sampling_level="sequence") == "torch"
    assert api.route("chunked", cpu, loss=False) == "torch"
    assert api.route("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        api.route("cuda", cpu)
    inp = grpo_inputs(seed=24)
    _, path, _ = _loss(inp, "chunked", importance_sampling_level="sequence")
    assert path == "torch"
    if TRITON_OK:
        assert api.route("triton", DEVICE) == api.route("fused", DEVICE) == "fused"


def test_auto_weighs_memory_on_cuda(monkeypatch):
    """On CUDA, auto takes the chunked path only when what it holds fits the budget."""
    cuda = torch.device("cuda")
    N, H, V = 16384, 3584, 152064
    extra = chunked.extra_bytes(N, H, V, torch.bfloat16)
    assert extra == (1 << 30) + N * H * 2 + V * H * 6
    monkeypatch.setattr(api, "_memory_budget", lambda device: extra)
    assert api.route("auto", cuda, shape=(N, H, V)) == "chunked"
    monkeypatch.setattr(api, "_memory_budget", lambda device: extra - 1)
    assert api.route("auto", cuda, shape=(N, H, V)) == "fused"
    assert api.route("auto", cuda, shape=(N, H, V), trainable_head=False) == "chunked"
    assert api.route("auto", cuda, loss=False) == "fused"
    assert api.route("auto", cuda, shape=(N, H, V), importance_sampling_level="sequence") == "fused"


def test_gradients_scale_with_the_upstream_gradient_and_survive_retain_graph():
    inp = grpo_inputs(seed=25, bias=True)
    h, w, b = leaf(inp["hidden"]), leaf(inp["weight"]), leaf(inp["bias"])
    args, lp = loss_args(inp)
    out = fastgrpo.fused_grpo_loss(h, w, *args[2:], **lp, bias=b, beta=0.04, impl="chunked")
    out.loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    (-2.5 * out.loss).backward()
    for g1, t in zip(first, (h, w, b), strict=True):
        assert torch.allclose(t.grad, -2.5 * g1, rtol=1e-6, atol=1e-9)


def test_frozen_head_and_no_grad_skip_the_gradient_gemms(monkeypatch):
    inp = grpo_inputs(seed=26)
    calls = []
    real = chunked.accumulate_mm
    monkeypatch.setattr(chunked, "accumulate_mm", lambda *a: calls.append(1) or real(*a))
    args, lp = loss_args(inp)
    h = leaf(inp["hidden"])
    out = fastgrpo.fused_grpo_loss(h, inp["weight"], *args[2:], **lp, impl="chunked")
    out.loss.backward()
    want = fastgrpo.fused_grpo_loss(leaf(inp["hidden"]), inp["weight"], *args[2:], **lp, impl="torch")
    assert not calls and h.grad is not None and abs(float(out.loss) - float(want.loss)) < 1e-6
    stats_only = []
    monkeypatch.setattr(chunked, "_token_grad", lambda *a: stats_only.append(1))
    with torch.no_grad():
        out = fastgrpo.fused_grpo_loss(leaf(inp["hidden"]), leaf(inp["weight"]), *args[2:], **lp, impl="chunked")
    assert not stats_only and abs(float(out.loss) - float(want.loss)) < 1e-6


def test_extra_bytes_per_path():
    """The memory each path holds beyond its inputs and gradients, as the memory plan reports it."""
    from fastgrpo.kernels.linear_dlogits import WORKSPACE_BYTES as DLOGITS

    N, H, V, bf16 = 16384, 3584, 152064, torch.bfloat16
    assert api.extra_bytes("chunked", N, H, V, bf16) == (1 << 30) + N * H * 2 + V * H * 6
    assert api.extra_bytes("chunked", N, H, V, bf16, trainable_head=False) == (1 << 30) + N * H * 2
    assert api.extra_bytes("fused", N, H, V, bf16) == DLOGITS + 4 * N * H  # N <= V: fp32 dHidden
    assert api.extra_bytes("fused", 4 * V, H, V, bf16) == DLOGITS + 4 * V * H  # N > V: fp32 dWeight
    assert api.extra_bytes("fused", N, H, V, torch.float32) == DLOGITS  # fp32 sums in place
    assert api.extra_bytes("fused", 8, H, V, bf16, trainable_head=False) == 8 * V * 2  # a small chunk
    with pytest.raises(ValueError, match="path must be one of"):
        api.extra_bytes("auto", N, H, V, bf16)


@pytest.mark.parametrize("rows", ROWS)
def test_row_kernels_banned_leading_block(rows):
    """Rows whose first tiles are all -inf (a banned block at the vocabulary start) stay finite."""
    R, V = 9, 700
    z, b, y, g = _rows_inputs(R, V, torch.float32, seed=3, bias=True)
    b[:300] = float("-inf")
    y = 300 + y % (V - 300)
    stats, grad_ = chunked._rows(rows)
    logp, lse, ent = stats(z, b, y, 1.0)
    dz = grad_(z.clone(), b, y, lse, g, 1.0)
    u = (z.double() + b.double()).requires_grad_()
    lp_all = u.log_softmax(-1)
    want_lp = lp_all.gather(1, y[:, None]).squeeze(1)
    want_ent = -(lp_all.exp() * torch.where(torch.isfinite(lp_all), lp_all, 0.0)).sum(-1)
    (want_dz,) = torch.autograd.grad((want_lp * g.double()).sum(), u)
    assert rel_err(logp, want_lp) < 1e-5 and rel_err(ent, want_ent) < 1e-5
    assert torch.isfinite(dz).all() and rel_err(dz, want_dz) < 1e-6


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_empty_batch(impl):
    """B = 0 gives a zero loss and zero gradients on every path, not a reshape error."""
    h = torch.randn(0, 5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    out = fastgrpo.fused_grpo_loss(h, w, y, torch.zeros(0, 5, device=DEVICE), torch.zeros(0, device=DEVICE), impl=impl)
    out.loss.backward()
    assert out.loss.item() == 0 and out.logprobs.shape == (0, 5)
    assert h.grad.shape == h.shape and not w.grad.any()


def test_balanced_chunks_keep_the_chunk_count_and_drop_the_small_tail():
    """Equal chunks, 64-row aligned where that fits: as few chunks as the budget allows, none larger."""
    assert chunked.balanced_chunks(4096, 3530) == 2048  # not 3530 + 566
    assert chunked.balanced_chunks(16384, 3530) == 3328  # 4 x 3328 + 3072
    assert chunked.balanced_chunks(37, 5) == 5 and chunked.balanced_chunks(0, 7) == 7
    assert chunked.balanced_chunks(130, 128) == 65  # the 64-row rounding would leave 128 + 2
    g = torch.Generator().manual_seed(0)
    for n, most in torch.randint(1, 5000, (300, 2), generator=g).tolist():
        rows = chunked.balanced_chunks(n, most)
        chunks = -(-n // most)
        assert 0 < rows <= most and -(-n // rows) == chunks, (n, most, rows)
        assert rows == -(-n // chunks) or 2 * (n - rows * (chunks - 1)) >= rows  # even split, or a long tail


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_accumulation_in_the_weights_dtype(dtype):
    """grad_accumulation="input": dWeight summed in a 16-bit weight's dtype over many chunks stays within a
    few bf16/fp16 roundings of the fp32 accumulator and of float64; fp32 weights are unaffected."""
    inp = grpo_inputs(B=4, T=17, seed=31, dtype=dtype, bias=True)
    V = inp["weight"].shape[0]
    budget = 7 * chunked.row_cost(V, dtype, "torch")  # ~8 chunks over the 4 x 17 tokens
    grads = {}
    for acc in ("fp32", "input"):
        out, _, grads[acc] = _loss(inp, "chunked", workspace_bytes=budget, grad_accumulation=acc, beta=0.04)
        assert grads[acc][1].dtype == dtype
    want = _float64_grads(inp, beta=0.04)
    if dtype == torch.float32:
        assert all(torch.equal(a, b) for a, b in zip(grads["fp32"], grads["input"], strict=True))
        return
    unit = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # the dtype's relative rounding
    base = rel_err(grads["fp32"][1], want[1])
    assert rel_err(grads["input"][1], grads["fp32"][1]) < 2 * unit  # measured: 0.7 unit over 7 chunks
    assert rel_err(grads["input"][1], want[1]) < base + 2 * unit
    for i in (0, 2):  # dHidden and dBias never sum across chunks
        assert torch.equal(grads["input"][i], grads["fp32"][i])


def _float64_grads(inp, **hp):
    """(dHidden, dWeight, dBias) of TRL's loss transcribed, in float64."""
    m = inp["mask"]
    h, w, b = (leaf(inp[k], torch.float64) for k in ("hidden", "weight", "bias"))
    loss = reference_grpo_loss(
        h, w, inp["targets"].clamp(min=0), m, inp["advantages"],
        old_logprobs=torch.where(m, inp["old_logprobs"], 0.0), ref_logprobs=torch.where(m, inp["ref_logprobs"], 0.0),
        bias=b, params=GRPOLossParams(**hp), compute_dtype=torch.float64,
    )[0]  # fmt: skip
    loss.backward()
    return h.grad, w.grad, b.grad


def test_grad_accumulation_input_holds_no_fp32_weight_buffer():
    w = torch.zeros(5, 3, dtype=torch.bfloat16)
    assert chunked._DWeight(w, "input", True).acc.dtype == torch.bfloat16
    assert chunked._DWeight(w, "fp32", True).acc.dtype == torch.float32
    assert not chunked._DWeight(w, "input", False).acc.any()  # no chunk: zeros, not garbage
    N, H, V = 4096, 3584, 152064
    fp32 = chunked.extra_bytes(N, H, V, torch.bfloat16)
    assert fp32 - chunked.extra_bytes(N, H, V, torch.bfloat16, grad_accumulation="input") == 4 * V * H
    with pytest.raises(ValueError, match="grad_accumulation must be one of"):
        fastgrpo.FusedGRPOLoss(grad_accumulation="bf16")


class _Syncs(TorchDispatchMode):
    """Ops that read device data back to the host (a sync on CUDA), seen while active."""

    NAMES = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if name in self.NAMES or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_a_chunked_call_reads_back_once(monkeypatch):
    """Forward and backward of the chunked path: one device-to-host transfer (the value checks and the
    active-token count together), no other op that waits for the device."""
    inp = grpo_inputs(B=4, T=9, seed=32, bias=True)
    args, lp = loss_args(inp)
    mask = inp["mask"].float()  # a float mask adds the 0/1 check
    adv = inp["advantages"][:, None].expand(4, 9).contiguous()  # per-token advantages: a masked check
    ratio = torch.rand(4, 9, device=DEVICE) + 0.5
    reads = []
    real = checks.read_back
    monkeypatch.setattr(checks, "read_back", lambda v: reads.append(v.numel()) or real(v))
    h, w = leaf(inp["hidden"]), leaf(inp["weight"])
    num_items = torch.tensor(30.0, device=DEVICE)
    with _Syncs() as syncs:
        out = fastgrpo.fused_grpo_loss(
            h, w, args[2], mask, adv, **lp, beta=0.04, impl="chunked", num_items_in_batch=num_items,
            importance_sampling_ratio=ratio,
        )  # fmt: skip
        out.loss.backward()
    assert syncs.seen == [] and len(reads) == 1, (syncs.seen, reads)
    want = fastgrpo.fused_grpo_loss(
        leaf(inp["hidden"]), inp["weight"], args[2], mask, adv, **lp, beta=0.04, impl="torch",
        num_items_in_batch=num_items, importance_sampling_ratio=ratio,
    )  # fmt: skip
    assert abs(float(out.loss) - float(want.loss)) < 1e-6


def test_one_read_back_still_names_each_bad_value():
    """The checks share one transfer; each bad value still gets its own line, in the old order."""
    inp = grpo_inputs(B=3, T=5, seed=33)
    args, lp = loss_args(inp)
    h, w, y, m, adv = args
    cases = [
        (dict(mask=m.float() * 2), "mask must hold only 0 and 1"),
        (dict(advantages=adv * float("nan")), "advantages must be finite"),
        (dict(targets=torch.where(m, y + 10_000, y)), r"targets must lie in \[0, 1003\), got values in \[10"),
        (dict(importance_sampling_ratio=-torch.ones(3, 5)), "importance_sampling_ratio must be finite and >= 0"),
        (dict(num_items_in_batch=torch.tensor(0.0)), "num_items_in_batch must be > 0"),
    ]
    for change, message in cases:
        call = dict(hidden=h, weight=w, targets=y, mask=m, advantages=adv, **lp) | change
        with pytest.raises(ValueError, match=message):
            fastgrpo.fused_grpo_loss(**call, impl="chunked")


def test_active_indices_without_a_second_sync(monkeypatch):
    """The chunk loop's token positions: nonzero_static with the count the checks read back, nothing for
    no token (torch < 2.9 crashed on it on CUDA), and nonzero where the device has no nonzero_static."""
    active = torch.tensor([True, False, True, True, False], device=DEVICE)
    want = torch.tensor([0, 2, 3], device=DEVICE)
    assert torch.equal(chunked._active_indices(active, 3), want)
    assert torch.equal(chunked._active_indices(active, None), want)
    assert chunked._active_indices(active[:0], 0).shape == (0,)

    def missing(*a, **k):
        raise NotImplementedError("no nonzero_static kernel")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    assert torch.equal(chunked._active_indices(active, 3), want)
