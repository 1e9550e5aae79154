"""Forward+backward of the GRPO loss: fused (triton, chunked torch) vs naive logits vs the bare GEMM floor.

Every row runs on the same inputs in one process: DAPO loss, beta=0.04 with reference log-probs,
epsilon=0.2, epsilon_high=0.28, gradients w.r.t. hidden and the lm_head weight (trainable head).

    python benchmarks/bench_fused_vs_naive.py                  # CUDA: bf16, Qwen2.5-7B head, N=16384
    python benchmarks/bench_fused_vs_naive.py --quick          # CPU smoke test: fp32, tiny shapes
    python benchmarks/bench_fused_vs_naive.py --shapes 4096,32000,8192 --out results/

``gemm-floor`` times only the 4 lm_head GEMM passes a trainable head needs (logits forward;
logits recompute, dHidden, dWeight in backward) on 4096-token chunks, so it fits where full
logits would not. TFLOP/s counts 2*N*H*V per pass for every row, masked tokens included.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import device_name, git_commit, version

import fastgrpo
from fastgrpo.reference import reference_grpo_loss

IMPLS = ("fused-triton", "fused-torch", "naive", "gemm-floor")
RUN_ORDER = ("naive", "fused-torch", "fused-triton", "gemm-floor")  # the naive row is the reference
HYPER = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
PARAMS = fastgrpo.GRPOLossParams(**HYPER)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        h, v, n = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be H,V,N (three integers), got {text!r}") from None
    if min(h, v, n) < 1:
        raise argparse.ArgumentTypeError(f"H, V and N must be >= 1, got {text!r}")
    return h, v, n


def make_inputs(H, V, N, rows, dtype, device, seed):
    """Right-padded batch: each row loses a random tail of 0..50% of its tokens (~25% on average)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = rows if N % rows == 0 else 1
    T = N // B
    hidden = torch.randn(B, T, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    pad = torch.randint(0, T // 2 + 1, (B, 1), generator=g)
    mask = (torch.arange(T)[None, :] < T - pad).to(device)
    advantages = torch.randn(B, generator=g).to(device)
    with torch.no_grad():  # old/ref log-probs near the current policy, so the clip and KL terms are live
        logp = fastgrpo.chunked_logprobs(hidden, weight, targets, impl="torch")
    old = torch.where(mask, logp + 0.1 * torch.randn(B, T, generator=g).to(device), 0.0)
    ref = torch.where(mask, logp + 0.1 * torch.randn(B, T, generator=g).to(device), 0.0)
    return dict(hidden=hidden, weight=weight, targets=targets, mask=mask, advantages=advantages, old=old, ref=ref)


def make_fn(impl, x, chunk):
    """A closure running one forward+backward; returns (loss, dHidden, dWeight), or Nones for the floor."""
    h, w = x["hidden"], x["weight"]
    args = (h, w, x["targets"], x["mask"], x["advantages"])
    if impl in ("fused-triton", "fused-torch"):
        backend = impl.split("-")[1]

        def loss_fn():
            return fastgrpo.fused_grpo_loss(
                *args, old_logprobs=x["old"], ref_logprobs=x["ref"], impl=backend, **HYPER
            ).loss
    elif impl == "naive":

        def loss_fn():
            return reference_grpo_loss(*args, old_logprobs=x["old"], ref_logprobs=x["ref"], params=PARAMS)[0]
    else:
        return make_floor_fn(h.detach().reshape(-1, h.shape[-1]), w.detach(), chunk)

    def fn():
        loss = loss_fn()
        dh, dw = torch.autograd.grad(loss, (h, w))
        return loss.detach(), dh, dw

    return fn


def make_floor_fn(h2d, w, chunk):
    N, V = h2d.shape[0], w.shape[0]
    buf = h2d.new_empty(min(chunk, N), V)  # one reused logits chunk: memory stays bounded
    dh, dw = torch.empty_like(h2d), torch.empty_like(w)

    def fn():
        for s in range(0, N, chunk):  # forward: logits
            hc = h2d[s : s + chunk]
            torch.mm(hc, w.T, out=buf[: hc.shape[0]])
        for s in range(0, N, chunk):  # backward: recompute, then dHidden and dWeight from the chunk
            hc = h2d[s : s + chunk]
            z = buf[: hc.shape[0]]
            torch.mm(hc, w.T, out=z)
            torch.mm(z, w, out=dh[s : s + chunk])
            if s == 0:  # dWeight sums over chunks
                torch.mm(z.T, hc, out=dw)
            else:
                dw.addmm_(z.T, hc)
        return None, None, None

    return fn


def time_fn(fn, device, warmup_ms, rep_ms, cpu_repeats):
    """(median, p20, p80) in ms."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8]))
    fn()  # warm-up
    times = []
    for _ in range(cpu_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def measured_call(make, device):
    """Build the row's closure and call it once, untimed: (fn, outputs, peak MiB over what was live before).

    The peak counts the closure's own buffers (gemm-floor) and the returned gradients.
    """
    if device.type != "cuda":
        fn = make()
        return fn, fn(), None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn = make()
    out = fn()
    torch.cuda.synchronize()
    return fn, out, (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def failure(e: Exception) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "OOM"
    lines = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {lines[0] if lines else ''}"[:200]


def run_row(impl, x, device, args, ref):
    """One row of the table; never raises (OOM and errors are results)."""
    h = x["hidden"]
    N, H, V = h.shape[0] * h.shape[1], h.shape[2], x["weight"].shape[0]
    dtype = str(h.dtype).removeprefix("torch.")
    row = dict(impl=impl, N=N, H=H, V=V, dtype=dtype, status="ok", active_tokens=int(x["mask"].sum()))
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if impl == "fused-triton" and device.type != "cuda" and not interpreting:
        return row | dict(status="skipped: needs CUDA (or TRITON_INTERPRET=1 on CPU)"), None
    fn = out = None
    try:
        fn, out, row["peak_extra_mib"] = measured_call(lambda: make_fn(impl, x, args.chunk), device)
        if ref is not None and out[0] is not None:
            ref_name, ref_out = ref
            row["ref"] = ref_name
            for key, a, b in zip(("loss_rel_diff", "dhidden_rel_err", "dweight_rel_err"), out, ref_out, strict=True):
                row[key] = rel_err(a, b)
        row["ms"], row["p20_ms"], row["p80_ms"] = time_fn(fn, device, args.warmup_ms, args.rep_ms, args.repeats)
        row["tflops"] = 4 * 2 * N * H * V / (row["ms"] * 1e-3) / 1e12
    except Exception as e:  # OOM and every other failure are reported in the row
        row["status"], out = failure(e), None
    finally:
        fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row, out


def bench_shape(H, V, N, dtype, device, args):
    x = make_inputs(H, V, N, args.rows, dtype, device, args.seed)
    rows, ref = {}, None
    for impl in (i for i in RUN_ORDER if i in args.impls):
        row, out = run_row(impl, x, device, args, ref)
        rows[impl] = row
        # naive is the yardstick; where it does not fit, fused-triton is checked against fused-torch
        if out is not None and ref is None and impl in ("naive", "fused-torch"):
            ref = (impl, out)
    floor = rows.get("gemm-floor", {}).get("ms")
    for row in rows.values():
        if floor and row.get("ms"):
            row["x_floor"] = row["ms"] / floor
    del x, ref
    gc.collect()
    return [rows[i] for i in IMPLS if i in rows]


COLUMNS = [
    ("impl", "impl", "{}"),
    ("N", "N", "{}"),
    ("H", "H", "{}"),
    ("V", "V", "{}"),
    ("dtype", "dtype", "{}"),
    ("ms", "median ms", "{:.3f}"),
    ("p20_ms", "p20 ms", "{:.3f}"),
    ("p80_ms", "p80 ms", "{:.3f}"),
    ("x_floor", "x gemm-floor", "{:.2f}"),
    ("peak_extra_mib", "peak extra MiB", "{:.0f}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("loss_rel_diff", "loss rel diff", "{:.2e}"),
    ("dhidden_rel_err", "dHidden rel err", "{:.2e}"),
    ("dweight_rel_err", "dWeight rel err", "{:.2e}"),
    ("ref", "vs", "{}"),
    ("status", "status", "{}"),
]


def markdown(rows, device):
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        no_mem = "n/a" if device.type != "cuda" and r["status"] == "ok" else "-"
        cells = [
            fmt.format(r[key]) if r.get(key) is not None else (no_mem if key == "peak_extra_mib" else "-")
            for key, _, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metadata(device, dtype, args):
    return dict(
        device=device_name(device),
        torch=torch.__version__,
        triton=version("triton"),
        python=sys.version.split()[0],
        git_commit=git_commit(),
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([sys.executable, *sys.argv]),
        dtype=str(dtype).removeprefix("torch."),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        loss=HYPER,
        rows_per_batch=args.rows,
        floor_chunk=args.chunk,
        timing=dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        if device.type == "cuda"
        else dict(method="time.perf_counter", warmup=1, repeats=args.repeats, threads=torch.get_num_threads()),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny fp32 shape on CPU (H=64, V=2000, N=256)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[], metavar="H,V,N", help="extra shapes")
    p.add_argument("--only-shapes", action="store_true", help="run only --shapes, not the default shape")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda if available (cpu with --quick)")
    p.add_argument("--rows", type=int, default=16, help="batch rows B (T = N / B)")
    p.add_argument("--chunk", type=int, default=4096, help="gemm-floor token chunk")
    p.add_argument("--warmup-ms", type=int, default=500, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=int, default=3000, help="do_bench measuring time (CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --quick, else torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write fused_vs_naive.json and fused_vs_naive.md here")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.threads or args.quick:  # tiny CPU shapes time mostly thread wake-ups with more than one
        torch.set_num_threads(args.threads or 1)
    default = (64, 2000, 256) if args.quick else (3584, 152064, 16384)
    shapes = ([] if args.only_shapes else [default]) + args.shapes
    meta = metadata(device, dtype, args)
    print(f"# fused vs naive GRPO loss fwd+bwd on {meta['device']} ({meta['dtype']}), commit {meta['git_commit']}")

    rows = []
    for H, V, N in shapes:
        print(f"shape H={H} V={V} N={N} ...", file=sys.stderr, flush=True)
        try:
            rows += bench_shape(H, V, N, dtype, device, args)
        except Exception as e:  # the inputs themselves failed: one row says so
            dt = str(dtype).removeprefix("torch.")
            rows.append(dict(impl="(inputs)", N=N, H=H, V=V, dtype=dt, status=failure(e)))
    table = markdown(rows, device)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fused_vs_naive.json").write_text(json.dumps(dict(metadata=meta, rows=rows), indent=2) + "\n")
        (args.out / "fused_vs_naive.md").write_text(
            f"# fused vs naive GRPO loss fwd+bwd\n\n`{meta['command']}`\n\n"
            f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['git_commit']}, "
            f"{meta['utc']}\n\n{table}\n"
        )
        print(f"wrote {args.out / 'fused_vs_naive.json'} and {args.out / 'fused_vs_naive.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
