"""pytest-benchmark suite for the same cases as ``fastgrpo bench ops`` (same inputs, same closures).

    pytest benchmarks/test_ops_bench.py --benchmark-only                  # CUDA: Qwen2.5-7B head, N = 16K, bf16
    pytest benchmarks/test_ops_bench.py --benchmark-only -k "fwd+bwd and trainable"
    FASTGRPO_BENCH_SHAPE=4096,128256,65536 pytest benchmarks/test_ops_bench.py --benchmark-only

Without CUDA the tiny ``--quick`` head runs in fp32. Every case synchronizes the device inside
the timed call; ``extra_info`` carries the peak memory above the inputs and the GEMM-floor
FLOPs, so ``--benchmark-json`` holds everything the table shows except the ratios, which
``fastgrpo bench ops`` computes within one run. A missing peer or an out-of-memory case is
reported as skipped with its reason, never dropped.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks.bench_ops import HEAD_KINDS, HEADS, MODES, measure_memory, mode_closure
from fastgrpo.benchmarks.ops_impls import (
    FLOOR,
    GRADS_IN_FORWARD,
    IMPLS,
    Missing,
    configure_compile,
    floor_fns,
    floor_passes,
    make_inputs,
)

configure_compile()
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _shape() -> tuple[int, int, int]:
    text = os.environ.get("FASTGRPO_BENCH_SHAPE")
    if text:
        h, v, n = (int(t) for t in text.split(","))
        return h, v, n
    return (*HEADS["qwen2.5-7b"], 16384) if CUDA else (*HEADS["tiny"], 256)


@pytest.fixture(scope="module")
def inputs():
    H, V, N = _shape()
    return make_inputs(H, V, N, rows=8, dtype=DTYPE, device=DEVICE)


@pytest.mark.parametrize("head", HEAD_KINDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", [FLOOR, *IMPLS])
def test_ops(benchmark, inputs, impl, mode, head):
    x = inputs
    x.weight.requires_grad_(head == "trainable")
    if impl in GRADS_IN_FORWARD and mode == "bwd":
        pytest.skip("n/a: gradients are computed in the forward")
    if impl == FLOOR:
        make = lambda: floor_fns(x, 4096)[mode]  # noqa: E731
    else:
        make = lambda: mode_closure(IMPLS[impl](x, mode), mode, x.grad_inputs)  # noqa: E731

    def call(fn):
        out = fn()
        C.synchronize(DEVICE)
        return out

    try:  # the same measurement as `fastgrpo bench ops`: peak above the inputs, retained state included
        measured = measure_memory(lambda: partial(call, make()), DEVICE)
        fn, peak, first_call_s = measured[0], measured[2], measured[3]
        del measured  # the outputs: nothing but the inputs stays on the device while timing
        active, H, V = int(x.mask.sum()), x.hidden.shape[-1], x.weight.shape[0]
        benchmark.extra_info.update(
            impl=impl,
            mode=mode,
            head=head,
            N=x.mask.numel(),
            H=H,
            V=V,
            dtype=str(DTYPE),
            peak_extra_mib=peak,
            first_call_s=first_call_s,
            floor_flops=floor_passes(mode, head == "trainable") * 2 * active * H * V,
            device=C.device_name(DEVICE),
        )
        benchmark.pedantic(fn, rounds=5 if CUDA else 2, warmup_rounds=1, iterations=1)
    except Missing as e:
        pytest.skip(str(e))
    except Exception as e:
        if C.is_oom(e):
            pytest.skip("OOM")
        raise
    finally:
        C.free_memory(DEVICE)
