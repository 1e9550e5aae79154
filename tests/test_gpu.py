"""The fused and chunked paths on CUDA at real sizes, against the torch twin (skipped without CUDA)."""

import pytest
import torch

import fastgrpo

from helpers import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batch(B, T, H, V, dtype, seed=0, pad=0.25):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).div_(H**0.25).to(dtype)
    weight = torch.randn(V, H, device="cuda", generator=g).div_(H**0.25).to(dtype)
    targets = torch.randint(0, V, (B, T), device="cuda", generator=g)
    lengths = (T * (1 - pad * torch.rand(B, device="cuda", generator=g))).long()
    mask = torch.arange(T, device="cuda")[None] < lengths[:, None]
    adv = torch.randn(B, device="cuda", generator=g)
    old = torch.randn(B, T, device="cuda", generator=g) * 0.1 - 5
    return hidden, weight, targets, mask, adv, old


def _loss_and_grads(impl, hidden, weight, targets, mask, adv, old):
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    out = fastgrpo.fused_grpo_loss(
        h, w, targets, mask, adv, old_logprobs=old, ref_logprobs=old, beta=0.04, epsilon_high=0.28, impl=impl
    )
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_qwen_vocab_16k_tokens_matches_torch_path(dtype, impl):
    batch = _batch(16, 1024, 1536 if dtype == torch.bfloat16 else 512, 151_936, dtype)
    fused, dh, dw = _loss_and_grads(impl, *batch)
    ref, rdh, rdw = _loss_and_grads("torch", *batch)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(float(fused.loss) - float(ref.loss)) < tol * max(1.0, abs(float(ref.loss)))
    m = batch[3]
    assert rel_err(fused.logprobs[m], ref.logprobs[m]) < tol
    assert rel_err(dh, rdh) < tol and rel_err(dw, rdw) < tol


def test_int64_offsets_large_n_and_v():
    """N * H and V * H past 2**31 elements; only the last tokens are live so it stays cheap."""
    N, H, V = 262_144, 8_192, 262_144
    hidden = torch.randn(1, N, H, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16).div_(H**0.5)
    targets = torch.full((1, N), V - 1, device="cuda")
    mask = torch.zeros(1, N, dtype=torch.bool, device="cuda")
    mask[0, -5:] = True
    adv = torch.ones(1, device="cuda")
    old = torch.zeros(1, N, device="cuda")  # old = ref = 0: the clip and KL terms are live
    r, rdh, rdw = _loss_and_grads("torch", hidden, weight, targets, mask, adv, old)
    for impl in ("fused", "chunked"):
        f, fdh, fdw = _loss_and_grads(impl, hidden, weight, targets, mask, adv, old)
        assert torch.isfinite(f.loss) and abs(float(f.loss) - float(r.loss)) < 2e-2 * max(1.0, abs(float(r.loss)))
        assert rel_err(fdh[0, -5:], rdh[0, -5:]) < 2e-2 and torch.all(fdh[0, :-64] == 0)
        assert rel_err(fdw[-1000:], rdw[-1000:]) < 2e-2
        del f, fdh, fdw


def test_frozen_head_skips_dweight():
    hidden, weight, targets, mask, adv, old = _batch(4, 512, 1024, 32_000, torch.bfloat16)
    h = hidden.requires_grad_()
    for impl in ("fused", "chunked"):
        out = fastgrpo.fused_grpo_loss(h, weight, targets, mask, adv, impl=impl)
        out.loss.backward()
        assert weight.grad is None and h.grad is not None and torch.isfinite(h.grad).all()


def _peak_extra(impl, B=8, T=2048, H=3584, V=152_064):
    """Peak memory of one fwd+bwd above the inputs, and the bf16 gradients' size (7B head, 16K tokens)."""
    hidden, weight, targets, mask, adv, old = _batch(B, T, H, V, torch.bfloat16, pad=0.0)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fastgrpo.fused_grpo_loss(h, w, targets, mask, adv, old_logprobs=old, ref_logprobs=old, beta=0.04, impl=impl)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, dh.numel() * 2, dw.numel() * 2


def test_fused_peak_memory_is_the_gradients_plus_one_chunk():
    """Fused path, N <= V: vocabulary-outer backward, so beyond the bf16 gradients only the fp32
    dHidden accumulator and one d loss / d logits chunk; no fp32 dWeight."""
    from fastgrpo.kernels import linear_dlogits

    peak, dh, dw = _peak_extra("fused")
    bound = dh + dw + 2 * dh + linear_dlogits.WORKSPACE_BYTES + (64 << 20)  # + O(N) statistics and slack
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB (grads {(dh + dw) / 2**20:.0f})"


def test_chunked_peak_memory_is_its_workspace_plus_what_it_holds():
    """Chunked path: the workspace, dHidden, and dWeight in fp32 (accumulator) plus bf16 (held)."""
    from fastgrpo.ops import chunked

    peak, dh, dw = _peak_extra("chunked")
    bound = chunked.WORKSPACE_BYTES + dh + 3 * dw + (64 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB (grads {(dh + dw) / 2**20:.0f})"


def test_fp32_accumulating_gemm_takes_the_out_dtype_route():
    """cuBLAS adds bf16 products straight into the fp32 accumulator (no fallback warning)."""
    import warnings

    from fastgrpo.kernels import _gemm

    a = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1000, 200, device="cuda", dtype=torch.bfloat16)
    acc = torch.ones(300, 200, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _gemm.accumulate_mm(acc, a, b)
    assert _gemm._OUT_DTYPE_OK
    assert rel_err(acc, 1 + a.double() @ b.double()) < 1e-5


def _compiled_kernels():
    """(kernel name, CompiledKernel) of every fastgrpo Triton kernel the JIT has compiled so far on CUDA."""
    import inspect

    from fastgrpo.kernels import linear_dlogits, linear_logprobs, logits_rows
    from triton.runtime.jit import JITFunction

    for module in (linear_logprobs, linear_dlogits, logits_rows):
        for name, fn in inspect.getmembers(module, lambda f: isinstance(f, JITFunction)):
            for entry in getattr(fn, "device_caches", {}).values():
                for kernel in entry[0].values():  # the kernel cache comes first in every Triton 3.x layout
                    yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", kernel


def test_jit_kernels_compiled_for_this_gpu_do_not_spill():
    """The compile gate's promise, read off the JIT's own binaries on this GPU: run every public path
    (fused fwd/bwd, filter, chunked row kernels; trainable and frozen; bf16 and fp32) at the Qwen2.5-7B
    head, then no compiled variant may spill or exceed shared memory. FASTGRPO_JIT_REPORT names a file for
    the table (registers, spills, shared memory) that the GPU run keeps."""
    import os

    H, V = 3584, 152_064
    for dtype in (torch.bfloat16, torch.float32):
        batch = _batch(2, 700, H, V, dtype)
        for impl in ("fused", "chunked"):
            _loss_and_grads(impl, *batch)
        hidden, weight, targets, mask, adv, old = batch
        h = hidden.detach().requires_grad_()
        fastgrpo.fused_grpo_loss(h, weight, targets, mask, adv, impl="fused").loss.backward()  # frozen head
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        fastgrpo.fused_grpo_loss(h, w, targets, mask, adv, impl="fused", grad_filter_eps=1e-6).loss.backward()
    torch.cuda.synchronize()
    rows = []
    for name, k in _compiled_kernels():
        k._init_handles()
        md = k.metadata
        rows.append((name, md.num_warps, md.num_stages, k.n_regs, k.n_spills, md.shared))
    assert rows, "no fastgrpo kernel was compiled"
    table = "\n".join(["kernel | warps | stages | regs | spills | shared B"] + [" | ".join(map(str, r)) for r in rows])
    if os.environ.get("FASTGRPO_JIT_REPORT"):
        with open(os.environ["FASTGRPO_JIT_REPORT"], "a") as f:
            f.write(f"# {torch.cuda.get_device_name()}\n{table}\n")
    assert not [r for r in rows if r[4] > 0], f"spills:\n{table}"
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    assert not [r for r in rows if r[5] > limit], f"shared memory over {limit}:\n{table}"
