"""``fastgrpo demo``: one GRPO loss step through the fused op, checked against materialized logits.

Builds a GRPO batch (groups of G completions of varied lengths, right-padded, group-normalized
advantages, old and reference log-probs a small step away), computes the DAPO loss and its
gradients with ``fastgrpo.fused_grpo_loss`` and with the naive full-logits reference, and prints
agreement, time and the logits memory the fused path never allocates.
"""

from __future__ import annotations

import argparse
import time

import torch

from .ops import GRPOLossParams, fused_grpo_loss
from .ops.api import IMPLS, route
from .ops.chunked import WORKSPACE_BYTES
from .ops.reference import reference_grpo_loss, reference_logprobs
from .ops.twin import CHUNK_BYTES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", type=int, default=2, help="prompts in the batch")
    p.add_argument("--num_generations", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max_completion_length", type=int, default=192, help="T")
    p.add_argument("--hidden_size", type=int, default=256, help="H")
    p.add_argument("--vocab_size", type=int, default=32_000, help="V")
    p.add_argument("--loss_type", default="dapo")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--impl", default="auto", choices=IMPLS)
    p.add_argument("--seed", type=int, default=0)


def make_batch(prompts, G, T, H, V, device, dtype, seed=0):
    """A synthetic GRPO micro-batch with the structure of a real one."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = prompts * G
    hidden = (torch.randn(B, T, H, generator=g) / H**0.25).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(device, dtype)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    rewards = torch.rand(B, generator=g).view(prompts, G)
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    drift = 0.05 * torch.randn(B, T, generator=g)
    return dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        advantages=adv.view(-1).to(device),
        drift=drift.to(device),
    )


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    b = make_batch(args.prompts, args.num_generations, args.max_completion_length, args.hidden_size,
                   args.vocab_size, device, dtype, args.seed)  # fmt: skip
    B, T, _ = b["hidden"].shape
    hp = dict(beta=args.beta, epsilon=0.2, epsilon_high=0.28, loss_type=args.loss_type, max_completion_length=T)
    params = GRPOLossParams(**hp)
    # Stand-ins for the sampling policy and the reference model: a small step away from the current one.
    current = _logp(b)
    kwargs = dict(old_logprobs=current + b["drift"], ref_logprobs=current - b["drift"].abs())
    inputs = (b["targets"], b["mask"], b["advantages"])
    fused = _timed(b, device, lambda h, w: fused_grpo_loss(h, w, *inputs, impl=args.impl, **kwargs, **hp).loss)
    naive = _timed(b, device, lambda h, w: reference_grpo_loss(h, w, *inputs, params=params, **kwargs)[0])
    fused_impl = route(args.impl, device, shape=(B * T, args.hidden_size, args.vocab_size), dtype=dtype)
    print(
        f"fastgrpo demo: {args.loss_type} loss, B={B} completions x T={T} (masked-in tokens {int(b['mask'].sum())}), "
        f"H={args.hidden_size}, V={args.vocab_size}, {dtype} on {device}"
    )
    return _report(fused, naive, fused_impl, B * T * args.vocab_size * 4 / 2**20, device)


def _timed(b, device: torch.device, fn):
    """(loss, dHidden, dWeight) in float64, seconds and peak extra MiB (CUDA; NaN elsewhere) of
    ``fn(hidden, weight)``'s forward and backward."""
    h = b["hidden"].detach().requires_grad_()
    w = b["weight"].detach().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    loss = fn(h, w)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
    return loss.detach().double(), h.grad.double(), w.grad.double(), dt, peak


def _report(fused, naive, fused_impl: str, logits_mb: float, device: torch.device) -> int:
    """Print the fused path against the materialized reference; 0 when they agree."""
    rel = lambda a, r: float((a - r).norm() / r.norm().clamp(min=1e-30))
    print(f"  loss   fused {fused[0]:.6f}   naive {naive[0]:.6f}   |diff| {abs(float(fused[0] - naive[0])):.2e}")
    print(f"  grads  rel. error dHidden {rel(fused[1], naive[1]):.2e}   dWeight {rel(fused[2], naive[2]):.2e}")
    print(f"  time   fused {fused[3] * 1e3:.1f} ms   naive {naive[3] * 1e3:.1f} ms (forward + backward)")
    if device.type == "cuda":
        print(f"  memory peak extra: fused {fused[4]:.0f} MiB   naive {naive[4]:.0f} MiB")
    held = {
        "fused": "none (logit tiles stay on chip)",
        "torch": f"at most {CHUNK_BYTES / 2**20:.0f} MiB at a time",
        "chunked": f"a workspace of at most {WORKSPACE_BYTES / 2**20:.0f} MiB",
    }[fused_impl]
    print(f"  the naive path built {logits_mb:.0f} MiB of fp32 logits (B x T x V); the fused path: {held}")
    loss_ok = abs(float(fused[0] - naive[0])) <= 1e-3 * max(1.0, abs(float(naive[0])))
    ok = loss_ok and rel(fused[1], naive[1]) < 2e-2
    print("  agreement: OK" if ok else "  agreement: MISMATCH")
    return 0 if ok else 1


def _logp(b):
    with torch.no_grad():
        return reference_logprobs(b["hidden"], b["weight"], b["targets"])[0].float()
