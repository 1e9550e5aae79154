"""``fastgrpo bench ops``: time and peak memory of GRPO loss implementations against the GEMM floor.

Every row of one run uses the same inputs (see ``ops_impls``: fastgrpo's chunked, fused and torch paths,
naive PyTorch eager and compiled, Liger-Kernel's fused-linear and Triton GRPO losses, TRL's
chunked log-prob path, and the bare lm_head GEMMs), at lm_head shapes of real models:

    fastgrpo bench ops                                   # CUDA: all heads x N in {4K, 16K, 64K}, bf16
    fastgrpo bench ops --models qwen2.5-7b --tokens 16384 --modes fwd+bwd --heads trainable
    fastgrpo bench ops --quick                           # CPU smoke test: tiny head, fp32

Per row: median time with p20/p80 (CUDA events via ``triton.testing.do_bench`` after warm-up;
``perf_counter`` on CPU), peak memory above the inputs (``torch.cuda.max_memory_allocated``
after a reset; gradients included), TFLOP/s counting 2*N*H*V per GEMM pass of the floor
(4 passes fwd+bwd for a trainable head, 3 frozen), the time ratio to the bare GEMMs measured in
the same run, the memory floor (dHidden + dWeight) and the ratio to it, and the loss/gradient
error against naive (or fastgrpo-torch where naive does not fit). Modes: ``fwd`` (training
forward, graph kept), ``bwd`` (backward of a retained graph), ``fwd+bwd``. Liger's
fused-linear loss and fastgrpo's chunked path compute their gradients during the forward: their bwd
rows say n/a and their fwd rows are held to the fwd+bwd floor and to the floor's ``3gemm`` row (logits,
dHidden and dWeight once each). Liger's Triton loss runs out of place in the bwd row (its
in-place backward overwrites the logits a repeated backward reads). Out of memory, a missing
peer and a time budget running out are results in the row, never a crash.

Rows are appended to ``<out>/bench_ops.jsonl`` and ``.csv`` with device, versions and commit;
the run's table and plots (time and memory against N per implementation) go to ``<out>/<device>/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks.ops_impls import (
    FLOOR,
    GRADS_IN_FORWARD,
    IMPLS,
    REFERENCES,
    Missing,
    configure_compile,
    float64_reference,
    floor_fns,
    floor_passes,
    make_inputs,
)

# Output heads of public checkpoints: (H, V).
HEADS = {
    "qwen2.5-1.5b": (1536, 151_936),
    "qwen2.5-7b": (3584, 152_064),
    "llama3-8b": (4096, 128_256),
    "tiny": (96, 2003),  # --quick: nothing a multiple of a tile
}
MODES = ("fwd", "bwd", "fwd+bwd")
HEAD_KINDS = ("trainable", "frozen")
ALL_IMPLS = (FLOOR, *IMPLS)  # the floor first: its times are known before any budget runs out
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAME = "bench_ops"

COLUMNS = [
    ("model", "head", "{}"),
    ("N", "N", "{}"),
    ("head", "grad", "{}"),
    ("mode", "mode", "{}"),
    ("impl", "impl", "{}"),
    ("ms", "median ms", "{:.3f}"),
    ("p20_ms", "p20", "{:.3f}"),
    ("p80_ms", "p80", "{:.3f}"),
    ("x_floor", "x GEMM floor", "{:.2f}"),
    ("x_floor_3gemm", "x 3-GEMM floor", "{:.2f}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("peak_extra_mib", "peak extra MiB", "{:.0f}"),
    ("mem_floor_mib", "floor MiB", "{:.0f}"),
    ("x_mem_floor", "x mem floor", "{:.2f}"),
    ("loss_rel_diff", "loss rel diff", "{:.1e}"),
    ("dhidden_rel_err", "dH rel err", "{:.1e}"),
    ("dweight_rel_err", "dW rel err", "{:.1e}"),
    ("status", "status", "{}"),
]
CSV_FIELDS = [
    *(c[0] for c in COLUMNS),
    "H",
    "V",
    "dtype",
    "active_tokens",
    "first_call_s",
    "vs",
]


def rel_err(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    """||a - b|| / ||b|| in float64, chunk by chunk: ``b`` may live on the CPU, and no float64 copy
    of a whole gradient is ever made on the device."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    num = den = 0.0
    for s in range(0, a.numel(), chunk):
        ac, bc = a[s : s + chunk].double(), b[s : s + chunk].to(a.device).double()
        num += float((ac - bc).square().sum())
        den += float(bc.square().sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def mode_closure(loss_fn, mode: str, grad_inputs):
    """The callable a mode times. ``bwd`` runs the forward once here and keeps its graph."""
    if mode == "fwd":
        return loss_fn
    if mode == "fwd+bwd":

        def fwd_bwd():
            loss = loss_fn()
            return (loss.detach(), *torch.autograd.grad(loss, grad_inputs))

        return fwd_bwd
    loss = loss_fn()
    return lambda: torch.autograd.grad(loss, grad_inputs, retain_graph=True)


def measure_memory(make, device: torch.device):
    """Build a mode's closure, warm it up (compile, autotune), then call it once more for its peak.

    Returns (fn, outputs, peak MiB above what was live before ``make``, first-call seconds): the
    closure's retained state (bwd: the forward's graph; the floor: its buffers) counts.
    """
    C.free_memory(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    fn = make()
    fn()
    C.synchronize(device)
    first_call_s = time.perf_counter() - t0
    out, peak = C.peak_extra_mib(fn, device, base)
    return fn, out, peak, first_call_s


def compare(out, ref) -> dict:
    """Errors of a fwd+bwd call's (loss, dHidden[, dWeight]) against the reference's CPU copies."""
    name, expected = ref
    keys = ("loss_rel_diff", "dhidden_rel_err", "dweight_rel_err")
    fields = {key: rel_err(a, b) for key, a, b in zip(keys, out, expected, strict=False)}
    return fields | {"vs": name}


def run_impl(impl, x, mode, device, args, ref):
    """One row's fields; never raises (OOM and every other failure are the row's status).

    A fwd+bwd call's outputs are checked against ``ref`` right after the memory call and then
    dropped, so nothing but the inputs is on the device while the row is timed. Returns
    (fields, CPU copies of the outputs when this impl becomes the reference, else None).
    """
    fields, mine = {}, None
    try:
        if impl == FLOOR:
            make = lambda: floor_fns(x, args.floor_chunk)[mode]  # noqa: E731 (its buffers count)
        else:
            make = lambda: mode_closure(IMPLS[impl](x, mode), mode, x.grad_inputs)  # noqa: E731
        fn, out, fields["peak_extra_mib"], fields["first_call_s"] = measure_memory(make, device)
        if mode == "fwd+bwd" and impl != FLOOR:
            try:
                if ref is not None:
                    fields |= compare(out, ref)
                elif impl in REFERENCES:
                    mine = (impl, tuple(t.detach().cpu() for t in out))
            except Exception as e:  # a failed check is reported, the timing still runs
                fields["vs"] = f"check failed: {C.failure(e)}"
        out = None
        fields["ms"], fields["p20_ms"], fields["p80_ms"] = C.time_ms(
            fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_repeats=args.repeats
        )
        return fields, mine
    except Exception as e:
        return fields | {"status": C.failure(e)}, None
    finally:
        C.free_memory(device)


def unavailable(impl, x) -> str | None:
    """Why ``impl`` cannot run on these inputs at all (missing package, needs CUDA), else None."""
    if impl == FLOOR:
        return None
    try:
        IMPLS[impl](x, "fwd+bwd")
    except Missing as e:
        return str(e)
    except Exception:  # a real failure: let the measured rows report it
        pass
    return None


def bench_config(model, N, head, x, device, args, deadline=None) -> list[dict]:
    """All rows of one (head shape, N, trainable/frozen): the floor first, every impl in every mode,
    then the ratios. Past ``deadline`` (time.monotonic) no new row starts."""
    H, V = HEADS[model]
    trainable = head == "trainable"
    x.weight.requires_grad_(trainable)
    active = int(x.mask.sum())
    # dHidden covers every position (padding included); dWeight only for a trainable head.
    mem_floor = (N * H + (V * H if trainable else 0)) * x.hidden.element_size() / 2**20
    base = dict(model=model, H=H, V=V, N=N, head=head, dtype=str(x.hidden.dtype).removeprefix("torch."))
    rows, ref = [], None
    if "fwd+bwd" in args.modes and any(i != FLOOR for i in args.impls):
        try:
            ref = ("float64", float64_reference(x))
        except Exception as e:  # e.g. OOM: the first reference impl's own outputs stand in, and say so
            print(f"float64 reference: {C.failure(e)}; errors are against {'/'.join(REFERENCES)}", file=sys.stderr)
        C.free_memory(device)
    for impl in (i for i in ALL_IMPLS if i in args.impls):
        why = unavailable(impl, x)
        if why is not None:  # one row for the impl, not one per mode
            rows.append(dict(base, impl=impl, mode="*", active_tokens=active, status=why))
            continue
        modes = [m for m in MODES if m in args.modes]
        if impl == FLOOR and "fwd+bwd" in modes and GRADS_IN_FORWARD & set(args.impls):
            modes.append("3gemm")  # what a path that forms its gradients in the forward is held to
        for mode in modes:
            row = dict(base, impl=impl, mode=mode, active_tokens=active, status="ok")
            rows.append(row)
            if impl in GRADS_IN_FORWARD and mode == "bwd":
                row["status"] = "n/a: gradients are computed in the forward"
                continue
            if deadline is not None and time.monotonic() > deadline:
                row["status"] = "skipped: time budget"
                continue
            fields, mine = run_impl(impl, x, mode, device, args, ref)
            row.update(fields)
            ref = ref or mine
            if mode != "fwd" and "ms" in row:
                row["mem_floor_mib"] = mem_floor
    floor = {r["mode"]: r["ms"] for r in rows if r["impl"] == FLOOR and r.get("ms")}
    for r in rows:
        if r.get("ms"):
            # A forward that also computes the gradients is held to the whole fwd+bwd floor.
            mode = "fwd+bwd" if r["impl"] in GRADS_IN_FORWARD else r["mode"]
            r["tflops"] = floor_passes(mode, trainable) * 2 * active * H * V / (r["ms"] * 1e-3) / 1e12
            if mode in floor:
                r["x_floor"] = r["ms"] / floor[mode]
            if r["impl"] in GRADS_IN_FORWARD and r["mode"] != "bwd" and "3gemm" in floor:
                r["x_floor_3gemm"] = r["ms"] / floor["3gemm"]
        if r.get("peak_extra_mib") is not None and r.get("mem_floor_mib"):
            r["x_mem_floor"] = r["peak_extra_mib"] / r["mem_floor_mib"]
    return rows


def plot(rows, run_dir: Path, meta: dict) -> list[Path]:
    """One PNG per (mode, head kind): time and peak memory against N, a line per impl and head shape."""
    paths = []
    for mode in MODES:
        for head in HEAD_KINDS:
            sel = [r for r in rows if r["mode"] == mode and r["head"] == head and r.get("ms")]
            if not sel:
                continue
            multi = len({r["model"] for r in sel}) > 1
            series_t, series_m = {}, {}
            for r in sel:
                label = f"{r['impl']} ({r['model']})" if multi else r["impl"]
                series_t.setdefault(label, []).append((r["N"], r["ms"]))
                series_m.setdefault(label, []).append((r["N"], r.get("peak_extra_mib")))
            panels = [
                dict(title="median time", xlabel="tokens N", ylabel="ms", series=series_t),
                dict(title="peak memory above inputs", xlabel="tokens N", ylabel="MiB", series=series_m),
            ]
            if not any(p[1] is not None for s in series_m.values() for p in s):
                panels = panels[:1]  # no allocator statistics on CPU
            title = f"GRPO loss {mode}, {head} head, {meta['dtype']} on {meta['device']} ({meta['git_commit'][:10]})"
            paths.append(C.line_plots(run_dir / f"{NAME}_{mode.replace('+', '_')}_{head}.png", panels, title))
    return paths


def head_shape(text: str) -> str:
    """A known head's name, or "H,V" (registered under that name)."""
    if text in HEADS:
        return text
    try:
        h, v = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(HEADS)} or H,V (two integers), got {text!r}"
        ) from None
    if min(h, v) < 1:
        raise argparse.ArgumentTypeError(f"H and V must be >= 1, got {text!r}")
    HEADS[text] = (h, v)
    return text


def parse_args(argv):
    p = C.parser("fastgrpo bench ops", __doc__)
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny head (H 96, V 2003), N 256 and 1024, fp32"
    )
    p.add_argument(
        "--models",
        nargs="+",
        type=head_shape,
        metavar="NAME|H,V",
        help=f"head shapes: {', '.join(sorted(HEADS))}, or your own hidden,vocab sizes such as 5120,152064 "
        "(default: the three real heads)",
    )
    p.add_argument("--tokens", nargs="+", type=int, help="N values (default: 4096 16384 65536)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--heads", nargs="+", choices=HEAD_KINDS, default=list(HEAD_KINDS))
    p.add_argument("--impls", nargs="+", choices=ALL_IMPLS, default=list(ALL_IMPLS))
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="default: cuda when available (cpu with --quick)")
    p.add_argument("--rows", type=int, default=8, help="sequences per batch (T = N / rows)")
    p.add_argument("--pad-frac", type=float, default=0.0, help="mean right-padding fraction per row (0: packed)")
    p.add_argument("--floor-chunk", type=int, default=4096, help="tokens per GEMM in the floor")
    p.add_argument("--warmup-ms", type=int, default=100, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=int, default=500, help="do_bench measuring time (CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="seconds; no row starts past it (skipped rows say so)")
    p.add_argument("--out", type=Path, help=C.OUT_HELP)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or C.default_out_dir()  # resolved against the working directory now
    for name in ("rows", "floor_chunk", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tokens and min(args.tokens) < 1:
        p.error("--tokens must be >= 1")
    if not 0 <= args.pad_frac < 0.5:
        p.error("--pad-frac must be in [0, 0.5)")
    if args.quick:
        args.models = args.models or ["tiny"]
        args.tokens = args.tokens or [256, 1024]
        args.device = args.device or "cpu"
    args.models = args.models or ["qwen2.5-1.5b", "qwen2.5-7b", "llama3-8b"]
    args.tokens = args.tokens or [4096, 16384, 65536]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastgrpo bench ops: error: --device cuda but CUDA is not available")
    if device.type == "cpu" and not args.quick:
        print("fastgrpo bench ops: no CUDA device, so real head shapes run on the CPU (slow); --quick is the "
              "CPU smoke run", file=sys.stderr)  # fmt: skip
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    threads = torch.get_num_threads()
    if args.threads or args.quick:  # tiny CPU shapes time mostly thread wake-ups with more threads
        torch.set_num_threads(args.threads or 1)
    try:
        return run(args, device, dtype)
    finally:  # called in-process (tests, notebooks), the caller keeps its own thread count
        torch.set_num_threads(threads)


def run(args, device: torch.device, dtype: torch.dtype) -> int:
    meta = C.environment(device) | dict(dtype=str(dtype).removeprefix("torch."), loss="dapo beta=0.04 eps=0.2/0.28")
    out = args.out or C.default_out_dir()
    run_dir = out / ("cpu-quick" if args.quick else C.slug(meta["device"]))
    print(f"# GRPO loss ops on {meta['device']} ({meta['dtype']}), commit {meta['git_commit']}", flush=True)
    configure_compile()
    start, rows = time.monotonic(), []
    deadline = None if args.time_budget is None else start + args.time_budget
    for model in args.models:
        H, V = HEADS[model]
        for N in args.tokens:
            over = deadline is not None and time.monotonic() > deadline
            x = None
            try:
                if not over:
                    print(f"{model} H={H} V={V} N={N} ...", file=sys.stderr, flush=True)
                    x = make_inputs(H, V, N, args.rows, dtype, device, args.seed, args.pad_frac)
            except Exception as e:  # the inputs themselves do not fit: one row per config says so
                over = C.failure(e)
            for head in args.heads:
                if x is None:
                    status = "skipped: time budget" if over is True else f"inputs: {over}"
                    new = [dict(model=model, H=H, V=V, N=N, head=head, impl="*", mode="*", status=status)]
                else:
                    new = bench_config(model, N, head, x, device, args, deadline)
                rows += new
                C.append_rows(out, NAME, new, meta, CSV_FIELDS)  # as they land: a killed run keeps its rows
            del x
            C.free_memory(device)
    table = C.markdown_table(rows, COLUMNS)
    print(table)
    path = C.write_run(run_dir, NAME, "GRPO loss: fused ops vs peers vs the GEMM floor", meta, table)
    plots = [] if args.no_plot else plot(rows, run_dir, meta)
    print(f"appended {len(rows)} rows to {out / NAME}.jsonl/.csv; wrote {path}", file=sys.stderr)
    for p in plots:
        print(f"wrote {p}", file=sys.stderr)
    ran = any(r["status"] == "ok" and r["impl"] != FLOOR for r in rows)
    if not ran:
        print("fastgrpo bench ops: no implementation row ran (see the status column)", file=sys.stderr)
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
