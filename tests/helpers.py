"""Shared inputs and tolerances for the fused-op tests."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_OK = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
# Every path of the public ops: the torch twin, the 3-GEMM chunked path (Triton row kernels under
# the interpreter on CPU) and the on-chip fused kernels.
IMPLS = [
    pytest.param("torch", id="torch"),
    pytest.param("chunked", id="chunked"),
    pytest.param(
        "fused", id="fused", marks=pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1")
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def grpo_inputs(B=3, T=13, H=72, V=1003, dtype=torch.float32, seed=0, bias=False, device=DEVICE):
    """A GRPO micro-batch with awkward sizes: right padding, one fully masked row, drifted
    old/ref log-probs, and garbage (NaN / -inf) wherever the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g) / H**0.25 * 2
    weight = torch.randn(V, H, generator=g) / H**0.25
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[min(1, B - 1)] = 0  # a fully masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        logits = (hidden.double() @ weight.double().T + (0 if b is None else b.double())).log_softmax(-1)
        cur = logits.gather(-1, targets[..., None]).squeeze(-1).float()
    # Drifts large enough that many tokens land outside [1 - 0.2, 1 + 0.28] in both directions.
    old = torch.where(mask, cur + 0.3 * torch.randn(B, T, generator=g), float("nan"))
    ref = torch.where(mask, cur - 0.3 * torch.randn(B, T, generator=g), float("-inf"))
    targets = torch.where(mask, targets, -100)  # ignore-index padding, as collators write it
    adv = torch.randn(B, generator=g)
    out = dict(
        hidden=hidden.to(device, dtype),
        weight=weight.to(device, dtype),
        targets=targets.to(device),
        mask=mask.to(device),
        advantages=adv.to(device),
        old_logprobs=old.to(device),
        ref_logprobs=ref.to(device),
    )
    if b is not None:
        out["bias"] = b.to(device, dtype)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max magnitude (0-safe)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def leaf(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_()


def loss_args(inp: dict) -> tuple[tuple, dict]:
    """``grpo_inputs`` output as the positional and policy-log-prob arguments of the fused loss."""
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"])
    return args, dict(old_logprobs=inp.get("old_logprobs"), ref_logprobs=inp.get("ref_logprobs"))


def train_config(embedded, out, **values):
    """The embedded preset on the session's embedded model, with small steps (2 prompts x 8)."""
    from fastgrpo.train.config import build_config
    from fastgrpo.train.embedded import EMBEDDED_PRESET

    model, data = embedded
    base = {**EMBEDDED_PRESET, "model": model, "dataset": data, "output_dir": str(out), "disable_tqdm": True}
    base["overwrite_output_dir"] = True  # tests reuse their folders
    base.update(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_resample_rounds=1)
    return build_config((base, "test"), (values, "test overrides"))
