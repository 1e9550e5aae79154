"""What every launcher does to its arguments at the boundary; torch only.

- Per-token and per-vocabulary vectors (targets, active, bias, lse, entropy, upstream
  coefficients) reach the kernels as bare pointers indexed with unit stride, so a strided view
  (``pairs[:, 1]``, ``expand``, ``b[::2]``) would be read as the wrong elements.
  ``as_contiguous`` copies the few that are not contiguous: O(N) or O(V) bytes against the
  O(N x V x H) GEMM work. Hidden states and the weight are never copied: the kernels take both
  of their strides.
- A target outside [0, V) cannot be refused on the host while ``torch.compile`` traces (the
  check reads data back), so the ops flag it instead: the forward kernels read nothing out of
  bounds and report logp = NaN for that token, and ``nan_where_invalid`` makes its gradient NaN
  too, so a bad label never turns into a plausible finite loss or update. The torch twins in
  ``fastgrpo.ops.twin`` use the same ``nan_where_invalid`` (this module is torch only) and read a
  clamped id where the kernels mask their load.
"""

import torch


def as_contiguous(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor made contiguous (a no-op when it already is); None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def nan_where_invalid(grad_logp: torch.Tensor, targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """d loss / d logp with NaN where the target is invalid and the coefficient nonzero.

    Such a token's logp is NaN, so whatever used it has a NaN gradient; an upstream that happens
    to be finite there (``logp.sum()``) must not yield a finite update. A zero coefficient (a
    masked token, or a loss that reads only the entropy) stays 0: that token adds nothing.
    """
    bad = ((targets < 0) | (targets >= vocab)) & (grad_logp != 0)
    return torch.where(bad, float("nan"), grad_logp)


def logit_scales(temperature: float, logit_scale: float = 1.0, softcap: float | None = None) -> tuple[float, float]:
    """The kernels' (inv_temp, softcap) pair for softmax(t(z) / temperature), t(z) = logit_scale * z, or with a
    softcap (Gemma 2's final_logit_softcapping) softcap * tanh(logit_scale * z / softcap): (logit_scale /
    temperature, 0), or (softcap / temperature, logit_scale / softcap), which the kernels (and the torch twins)
    apply as inv_temp * tanh(softcap * z). A nonzero second entry is HAS_SOFTCAP."""
    if softcap is None:
        return logit_scale / temperature, 0.0
    return softcap / temperature, logit_scale / softcap


def kernel_scales(inv_temp: float, softcap: float) -> tuple[float, float | None]:
    """``logit_scales``' pair as the kernels take it: without a softcap (0) the second entry is None, a
    constexpr, so the kernel's parameters, and its compile, are those of the bare temperature."""
    return (inv_temp, softcap if softcap else None)
