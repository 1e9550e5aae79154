"""cuBLAS-side helpers shared by the paths that hand their gradient GEMMs to torch.

Launchers call them through this module (``_gemm.mm(...)``), so the compile gate can capture a
launcher's Triton launches at real head sizes without running its GEMMs on the CPU.
"""

import warnings

import torch


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b (cuBLAS on CUDA; fp32 accumulation inside one call)."""
    return torch.mm(a, b, out=out)


def colsum(z: torch.Tensor) -> torch.Tensor:
    """(V,) fp32 column sums of a (n, V) chunk: its share of dBias."""
    return z.sum(0, dtype=torch.float32)


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with ``acc`` an fp32 accumulator that sums across calls.

    On CUDA, 16-bit products go straight into the fp32 accumulator (cuBLAS with an fp32 C):
    no temporary of acc's size. Elsewhere the product is formed in the inputs' dtype first.
    """
    global _OUT_DTYPE_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _OUT_DTYPE_OK:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError) as e:  # a torch without addmm(out_dtype=) on CUDA
            _OUT_DTYPE_OK = False
            warnings.warn(
                f"torch.addmm(out_dtype=float32) unavailable ({e}); 16-bit products are formed in full "
                "before the fp32 sum (one temporary of the accumulator's shape)",
                stacklevel=2,
            )
    acc.add_(a @ b)


_OUT_DTYPE_OK = True
