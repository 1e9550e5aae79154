"""Ahead-of-time compile gate: every Triton launch the public ops make, compiled for sm_80,
sm_90a and sm_100a on a CPU-only machine, and checked for what makes a kernel slow.

How it works:

1. **Capture.** Each *recipe* calls a public launcher (a torch.library op) with CPU tensors of
   a real head's shapes (``torch.empty``: nothing is touched). While capturing,
   ``JITFunction.run`` records the launch (kernel, bound arguments, constexprs, ``num_warps``,
   ``num_stages``, grid) instead of running it, the launchers pick their tiles for the target
   GPU (``linear_logprobs.target_gpu``), and the launchers' bulk fills and copies are no-ops.
2. **Specialize.** Each launch is bound by triton's own binder for the target
   (``create_function_from_signature`` + ``JITFunction._pack_args``), so the compiled kernel has
   exactly the JIT's specialization for those arguments (16-divisibility of pointers and ints):
   compiling without it invents spills that the real launch does not have.
3. **Compile, deduplicated** by (kernel, signature, constexprs, attributes, options, arch), with
   ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, in a process pool. ``ptxas -v``
   (triton's own, with triton's flags) gives registers, stack and spills; ``cuobjdump`` gives the
   SASS, whose instructions are counted.
4. **Rules** (any violation fails the gate; see ``violations``):
   - *spills*: spill stores or loads > 0 bytes;
   - *shared memory*: triton's dynamic shared memory over the chip's per-block maximum
     (A100 163 KiB, H100 / B200 227 KiB);
   - *tensor cores*: a kernel whose TTIR has a ``tt.dot`` on 16-bit or TF32 inputs must have
     tensor-core instructions (HMMA on sm_80, HGMMA or HMMA on sm_90a, UTC*MMA - tcgen05 - or
     HMMA on sm_100a). IEEE fp32 dots are exempt;
   - *atomics*: no atomic in the PTX may carry acquire/release semantics (``atom`` / ``red``
     with ``.acq_rel``, ``.acquire``, ``.release``; the default of ``tl.atomic_add`` is
     ``acq_rel``), and the SASS may have no more ``MEMBAR`` than the PTX has explicit fences
     (``fence.*`` / ``membar.*``): a relaxed RED needs no fence, so a MEMBAR beyond those is one
     that an atomic's ordering put there, once per atomic site, in the hot loop.

Adding launches: write a recipe ``fn(capture, head, dtype)`` that calls launchers inside
``with capture.variant("label"):`` and append it to ``RECIPES`` (see ``linear_logprobs_fwd_recipe``).
Launchers must choose their configs from ``linear_logprobs._target`` (or honour ``target_gpu``).

Run: ``python -m fastgrpo.benchmarks.compile_gate [--out DIR] [--jobs 2]``. Writes
``DIR/compile_gate.md`` and ``DIR/compile_gate.jsonl`` and exits 1 on any violation.
``--self-test`` compiles toy kernels that break each rule and exits 0 only if every rule fires.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- targets, heads


@dataclasses.dataclass(frozen=True)
class Arch:
    arch: int  # triton's GPUTarget arch
    name: str
    capability: tuple[int, int]
    sm_count: int
    smem_limit: int  # max dynamic shared memory per block, bytes
    tensor_core_ops: tuple[str, ...]  # SASS opcodes that are tensor-core MMAs


ARCHS = {
    80: Arch(80, "sm_80", (8, 0), 108, 163 * 1024, ("HMMA",)),
    # HMMA stays legal on Hopper/Blackwell (mma.sync, e.g. for dots too small for wgmma / tcgen05).
    90: Arch(90, "sm_90a", (9, 0), 132, 227 * 1024, ("HGMMA", "HMMA")),
    100: Arch(100, "sm_100a", (10, 0), 148, 227 * 1024, ("UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCIMMA", "HMMA")),
}


@dataclasses.dataclass(frozen=True)
class Head:
    name: str
    H: int
    V: int


HEADS = (
    Head("qwen2.5-1.5b", 1536, 151936),
    Head("qwen2.5-7b", 3584, 152064),
    Head("llama-3-8b", 4096, 128256),
    Head("gemma-2-9b", 3584, 256000),
    Head("gemma-2-2b", 2304, 256000),
    Head("gpt-2", 768, 50257),
)
# name -> (dtype, torch.backends.cuda.matmul.allow_tf32 during the launch)
DTYPES = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-tf32": (torch.float32, True),
    "fp32-ieee": (torch.float32, False),
}
# A micro-batch's token count, both ways the JIT specializes an int: 16-divisible, and not. A
# batch's live-token count is any number, and the odd one is what spilled on a GPU (the bf16
# d-logits kernel with an entropy gradient at N = 1,203: 168 B of local memory on an H200) while
# this gate, then compiling 4,096 only, saw none.
TOKEN_COUNTS = (4096, 4093)


# ----------------------------------------------------------------------------- capture


@dataclasses.dataclass
class Launch:
    variant: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict


class Capture:
    """Records launches instead of running them; ``variant`` labels the ones a block makes."""

    def __init__(self, full: bool = False) -> None:
        self.full = full  # recipes: every flag combination, not a covering set
        self.launches: list[Launch] = []
        self._variant = "?"

    @contextlib.contextmanager
    def variant(self, label: str) -> Iterator[None]:
        previous, self._variant = self._variant, label
        try:
            yield
        finally:
            self._variant = previous

    def record(self, kernel, args, kwargs) -> None:
        self.launches.append(Launch(self._variant, kernel, args, dict(kwargs)))


@contextlib.contextmanager
def capturing(capture: Capture, arch: Arch) -> Iterator[None]:
    """Launches go to ``capture``; launchers configure for ``arch``; bulk tensor work is skipped.

    The launchers' zero-fills and copies of gradient-sized buffers (GBs at real heads) only feed
    kernels that are not run here, so ``torch.zeros``, ``Tensor.zero_`` and ``Tensor.copy_``
    return uninitialised memory / do nothing while capturing. Shapes, strides, offsets and
    data-pointer alignment (what the specialization sees) are unchanged.
    """
    import triton.runtime.jit as jit
    from fastgrpo.kernels import _gemm, linear_logprobs

    def run(self, *args, grid, warmup, **kwargs):
        capture.record(self, args, kwargs)
        return None

    # The launchers' cuBLAS GEMMs (through ``_gemm``) only consume the kernels' outputs.
    gemms = (_gemm.mm, _gemm.accumulate_mm, _gemm.colsum)
    _gemm.mm = lambda a, b, out: out
    _gemm.accumulate_mm = lambda acc, a, b: None
    _gemm.colsum = lambda z: torch.empty(z.shape[1], dtype=torch.float32)
    saved = (jit.JITFunction.run, torch.zeros)
    jit.JITFunction.run = run
    torch.zeros = lambda *a, **k: torch.empty(*a, **k)
    torch.Tensor.copy_ = lambda self, *a, **k: self
    torch.Tensor.zero_ = lambda self: self
    try:
        with linear_logprobs.target_gpu(arch.capability, arch.sm_count):
            yield
    finally:
        jit.JITFunction.run, torch.zeros = saved
        _gemm.mm, _gemm.accumulate_mm, _gemm.colsum = gemms
        del torch.Tensor.copy_, torch.Tensor.zero_


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: picklable, hashable (the deduplication key)."""

    module: str
    qualname: str
    arch: int
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple

    @property
    def kernel(self) -> str:
        return self.qualname


def _knob(path: str, default=None):
    import triton

    obj = triton
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


_BINDERS: dict = {}


def specialize(launch: Launch, arch: int) -> Job:
    """The JIT's own binding of a captured launch for ``arch`` (what ``JITFunction.run`` does)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    cached = _BINDERS.get((id(fn), arch))
    if cached is None:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        cached = _BINDERS[(id(fn), arch)] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = cached
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or bool(_knob("knobs.runtime.debug", False))
    for key, knob in (
        ("instrumentation_mode", "knobs.compilation.instrumentation_mode"),
        ("fpsan_homomorphic_casts", "knobs.compilation.fpsan_homomorphic_casts"),
    ):
        value = _knob(knob, None)
        if value is not None:
            kwargs[key] = value
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Job(
        module=fn.fn.__module__,
        qualname=fn.fn.__qualname__,
        arch=arch,
        signature=tuple(signature.items()),
        constexprs=tuple(sorted((k, v) for k, v in constexprs.items())),
        attrs=tuple(sorted((k, json.dumps(v)) for k, v in attrs.items())),
        options=tuple(sorted((k, v) for k, v in options.__dict__.items())),
    )


# ----------------------------------------------------------------------------- recipes

Recipe = Callable[[Capture, Head, torch.dtype], None]


def _head_tensors(head: Head, dtype: torch.dtype, n: int):
    hidden = torch.empty(n, head.H, dtype=dtype)
    weight = torch.empty(head.V, head.H, dtype=dtype)
    bias = torch.empty(head.V, dtype=dtype)
    targets = torch.zeros(n, dtype=torch.int64)
    return hidden, weight, bias, targets


def linear_logprobs_fwd_recipe(capture: Capture, head: Head, dtype: torch.dtype) -> None:
    """Every forward launch: with/without the ``active`` mask, with/without bias; and the softcapped head
    (Gemma 2) with both, its register maximum."""
    from fastgrpo.kernels.linear_logprobs import linear_logprobs_fwd

    for n in TOKEN_COUNTS:
        hidden, weight, bias, targets = _head_tensors(head, dtype, n)
        active = torch.ones(n, dtype=torch.bool)
        for use_bias, use_active, softcap in (*itertools.product((False, True), (False, True), (0.0,)), (1, 1, 0.03)):
            label = "fwd" + (" bias" if use_bias else "") + (" active" if use_active else "")
            with capture.variant(label + (" softcap" if softcap else "")):
                b, a = bias if use_bias else None, active if use_active else None
                linear_logprobs_fwd(hidden, weight, b, targets, a, 1.0, softcap)


# Backward flag combinations: (need_dweight, bias: "" | "frozen-bias" | "bias", entropy grad, filter).
# Every combination is 24 compiles per (dtype, arch, shape class); CI compiles a pairwise covering
# set (every value pair of every two factors appears in some row) plus the all-on row, which is
# the register-pressure maximum. ``--full`` compiles all 24.
BWD_PAIRWISE = (
    (True, "", True, True),
    (False, "", False, False),
    (True, "frozen-bias", True, False),
    (False, "frozen-bias", False, True),
    (True, "bias", False, True),
    (False, "bias", True, False),
    (True, "bias", True, True),
)
# With a softcapped head (Gemma 2): the all-on row of each backward kernel (the filtered one, the exact
# d-logits one) and the all-off row.
BWD_SOFTCAP = ((True, "bias", True, True), (True, "", True, False), (False, "", False, False))
BWD_ALL = tuple(
    (dw, b, e, f)
    for dw in (True, False)
    for b in ("", "frozen-bias", "bias")
    for e in (True, False)
    for f in (True, False)
)


def linear_logprobs_bwd_recipe(capture: Capture, head: Head, dtype: torch.dtype) -> None:
    """Backward launches: trainable/frozen head, no/frozen/trainable bias, entropy gradient
    present/absent, gradient filter off/on (``BWD_PAIRWISE``, or ``BWD_ALL`` with ``--full``),
    each with its loop order's chunk launches (tails included), at every ``TOKEN_COUNTS``."""
    for n in TOKEN_COUNTS:
        _bwd_launches(capture, head, dtype, n)


def _bwd_launches(capture: Capture, head: Head, dtype: torch.dtype, n: int) -> None:
    from fastgrpo.kernels.linear_logprobs import linear_logprobs_bwd

    hidden, weight, bias, targets = _head_tensors(head, dtype, n)
    lse, entropy = (torch.empty(n, dtype=torch.float32) for _ in range(2))
    # Every token live, as in a real batch: the exact backward compacts dead tokens away.
    g_lp, g_ent = (torch.ones(n, dtype=torch.float32) for _ in range(2))
    rows = [(*row, 0.0) for row in (BWD_ALL if capture.full else BWD_PAIRWISE)]
    for need_dw, bias_mode, use_ent, use_filter, softcap in rows + [(*row, 0.03) for row in BWD_SOFTCAP]:
        words = ("bwd", "trainable" if need_dw else "frozen", bias_mode, "dent" if use_ent else "")
        words += ("filter" if use_filter else "", "softcap" if softcap else "")
        with capture.variant(" ".join(w for w in words if w)):
            linear_logprobs_bwd(
                hidden,
                weight,
                bias if bias_mode else None,
                targets,
                lse,
                entropy,
                g_lp,
                g_ent if use_ent else None,
                1.0,
                softcap,
                need_dw,
                bias_mode == "bias",
                2.0**-12 if use_filter else 0.0,
            )


def logits_rows_recipe(capture: Capture, head: Head, dtype: torch.dtype) -> None:
    """The chunked path's row kernels on its default workspace: a full chunk and an odd tail,
    with and without bias, the gradient with and without the entropy term."""
    from fastgrpo.kernels.logits_rows import row_grad_, row_stats

    from fastgrpo.ops.chunked import WORKSPACE_BYTES, chunk_rows

    rows = chunk_rows(head.V, dtype, WORKSPACE_BYTES, "triton")
    ws = torch.empty(rows, head.V, dtype=dtype)
    bias = torch.empty(head.V, dtype=dtype)
    stats = torch.empty(rows, dtype=torch.float32)
    for n in (rows, 37):
        targets = torch.zeros(n, dtype=torch.int64)
        for use_bias in (False, True):
            b = bias if use_bias else None
            for softcap in (0.0, 0.03):
                cap = " softcap" if softcap else ""
                with capture.variant("rows stats" + (" bias" if use_bias else "") + cap):
                    row_stats(ws[:n], b, targets, 1.0, softcap)
                with capture.variant("rows grad" + (" bias" if use_bias else "") + cap):
                    row_grad_(ws[:n], b, targets, stats[:n], stats[:n], 1.0, softcap=softcap)
                with capture.variant("rows grad dent" + (" bias" if use_bias else "") + cap):
                    row_grad_(ws[:n], b, targets, stats[:n], stats[:n], 1.0, stats[:n], stats[:n], softcap=softcap)


# (query heads, KV heads, head dim) of the families the graph sampler runs (slot_model.SUPPORTED).
ATTENTION = {"qwen2.5-1.5b": (12, 2, 128), "qwen2.5-7b": (28, 4, 128), "llama-3-8b": (32, 8, 128)}


def decode_attention_recipe(capture: Capture, head: Head, dtype: torch.dtype) -> None:
    """The graph sampler's split-KV decode step: 128 slots at a 4K cap (prompt 256) and an odd count at an
    odd length, so both divisibility specializations of the strides compile."""
    from fastgrpo.kernels.decode_attention import decode_attention_triton

    if head.name not in ATTENTION:
        return
    H, KV, D = ATTENTION[head.name]
    for slots, length in ((128, 4352), (37, 4093)):
        q = torch.empty(slots, H, D, dtype=dtype)
        keys, values = (torch.empty(slots, KV, length, D, dtype=dtype) for _ in range(2))
        lengths = torch.full((slots,), length, dtype=torch.int64)
        with capture.variant(f"decode {slots}x{length}"):
            decode_attention_triton(q, keys, values, lengths, D**-0.5)


RECIPES: list[Recipe] = [linear_logprobs_fwd_recipe, linear_logprobs_bwd_recipe, logits_rows_recipe,
                         decode_attention_recipe]  # fmt: skip


@dataclasses.dataclass
class Use:
    """Who makes a compile's launch: the (variant, dtype, head) triples sharing its specialization."""

    variants: set = dataclasses.field(default_factory=set)
    dtypes: set = dataclasses.field(default_factory=set)
    heads: set = dataclasses.field(default_factory=set)
    launches: int = 0


def collect(recipes=None, heads=HEADS, dtypes=None, archs=None, full=False) -> dict[Job, Use]:
    """Run every recipe for every (arch, dtype, head); the distinct compiles and who needs them."""
    recipes = RECIPES if recipes is None else recipes
    dtypes = DTYPES if dtypes is None else dtypes
    archs = ARCHS if archs is None else archs
    jobs: dict[Job, Use] = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in archs.values():
            for dname, (dtype, allow_tf32) in dtypes.items():
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                for head in heads:
                    capture = Capture(full)
                    with capturing(capture, arch):
                        for recipe in recipes:
                            recipe(capture, head, dtype)
                    for launch in capture.launches:
                        use = jobs.setdefault(specialize(launch, arch.arch), Use())
                        use.variants.add(launch.variant)
                        use.dtypes.add(dname)
                        use.heads.add(head.name)
                        use.launches += 1
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return jobs


# ----------------------------------------------------------------------------- compile + inspect


def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        return nv.get_ptxas(arch).path
    path = getattr(_knob("knobs.nvidia"), name, None)
    if path is not None and getattr(path, "path", None):
        return path.path
    return str(Path(nv.__file__).parent / "bin" / name)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}
_PTX_ATOMIC = re.compile(r"^\s*(?:@%?!?\w+\s+)?((?:atom|red)\.[\w.]+)", re.MULTILINE)
_PTX_FENCE = re.compile(r"^\s*(?:@%?!?\w+\s+)?((?:fence|membar)\.[\w.:]*)", re.MULTILINE)
_SASS_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", re.MULTILINE)
_TTIR_DOT = re.compile(r"tt\.dot\s[^\n]*?(?:inputPrecision\s*=\s*(\w+))?[^\n]*?:\s*tensor<[0-9x]+x(\w+)[^>]*>")


def compile_job(job: Job) -> dict:
    """Compile one job and inspect it; runs in a pool worker."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    fn = importlib.import_module(job.module)
    for part in job.qualname.split("."):
        fn = getattr(fn, part)
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs), {k: json.loads(v) for k, v in job.attrs})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
    except Exception as e:  # a compile failure is a violation too, reported with its message
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", seconds=0.0)
    ptx = kernel.asm["ptx"]
    info = dict(shared=int(kernel.metadata.shared or 0))
    arch_name = ("sm_%da" if job.arch >= 90 else "sm_%d") % job.arch
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx_path.write_text(ptx)
        options = dict(job.options)
        fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
        # triton's make_cubin flags (without -lineinfo, which changes nothing measured here)
        cmd = [_tool("ptxas", job.arch), *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}"]
        log = subprocess.run([*cmd, str(ptx_path), "-o", str(cubin)], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run(
            [_tool("cuobjdump", job.arch), "--dump-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    for key, pattern in _PTXAS.items():
        found = pattern.findall(log)
        info[key] = max((int(x) for x in found), default=0)
    ops = Counter(m.group(1) for m in _SASS_OP.finditer(sass))
    info["sass_ops"] = dict(ops)
    info["ptx_atomics"] = dict(Counter(_PTX_ATOMIC.findall(ptx)))
    info["ptx_fences"] = dict(Counter(_PTX_FENCE.findall(ptx)))
    # TTIR prints inputPrecision only when it is not the default, ieee.
    dots = [(prec or "ieee", dtype) for prec, dtype in _TTIR_DOT.findall(kernel.asm["ttir"])]
    info["dots"] = sorted(set(f"{d}/{p}" if d == "f32" else d for p, d in dots))
    info["needs_tensor_cores"] = any(d != "f32" or p != "ieee" for p, d in dots)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _arg_name(job: Job, path: tuple) -> str:
    name = job.signature[path[0]][0]
    return name if len(path) == 1 else f"{name}{list(path[1:])}"


def summarize(job: Job, info: dict) -> dict:
    arch = ARCHS[job.arch]
    ops = info.get("sass_ops", {})
    row = dict(
        kernel=job.qualname,
        arch=arch.name,
        constexprs={_arg_name(job, k): v for k, v in job.constexprs},
        options={k: v for k, v in job.options if k in ("num_warps", "num_stages")},
        registers=info.get("registers"),
        stack=info.get("stack"),
        spill_stores=info.get("spill_stores"),
        spill_loads=info.get("spill_loads"),
        shared=info.get("shared"),
        tensor_core=sum(ops.get(op, 0) for op in arch.tensor_core_ops),
        red=ops.get("RED", 0) + ops.get("REDG", 0),
        atom=ops.get("ATOM", 0) + ops.get("ATOMG", 0),
        membar=ops.get("MEMBAR", 0),
        ptx_atomics=info.get("ptx_atomics", {}),
        ptx_fences=info.get("ptx_fences", {}),
        dots=info.get("dots", []),
        compile_s=info.get("seconds"),
    )
    if "error" in info:
        row["error"] = info["error"]
    row["violations"] = violations(row, info, arch)
    return row


_ORDERED = (".acq_rel", ".acquire", ".release")


def violations(row: dict, info: dict, arch: Arch) -> list[str]:
    """The gate's rules (module docstring) applied to one compiled kernel."""
    if "error" in info:
        return [f"compile failed: {info['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads (stack {row['stack']} B)")
    if row["shared"] > arch.smem_limit:
        out.append(f"shared memory {row['shared']} B > {arch.smem_limit} B on {arch.name}")
    if info["needs_tensor_cores"] and row["tensor_core"] == 0:
        out.append(
            f"dot on {'/'.join(row['dots'])} without tensor-core instructions ({'/'.join(arch.tensor_core_ops)})"
        )
    ordered = {a: n for a, n in row["ptx_atomics"].items() if any(s in a for s in _ORDERED)}
    if ordered:
        out.append(f"atomics with acquire/release semantics: {ordered}")
    fences = sum(row["ptx_fences"].values())
    if row["membar"] > fences:
        out.append(f"{row['membar']} MEMBAR in SASS but {fences} explicit fences in PTX (atomic ordering)")
    return out


# ----------------------------------------------------------------------------- run, report


def _pool_init(cache_dir: str | None) -> None:
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_all(jobs, n_workers: int, cache_dir: str | None = None) -> list[dict]:
    jobs = list(jobs)
    if n_workers <= 1:
        _pool_init(cache_dir)
        return [compile_job(j) for j in jobs]
    # Longest first (backward kernels), so the pool does not end on one long compile.
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].qualname != "_bwd_kernel")
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_pool_init, initargs=(cache_dir,)) as pool:
        done = dict(zip(order, pool.map(compile_job, [jobs[i] for i in order]), strict=True))
    return [done[i] for i in range(len(jobs))]


def _flags(constexprs: dict) -> str:
    on = [k.removeprefix("HAS_").lower() for k, v in constexprs.items() if k.startswith("HAS_") and v]
    return ",".join(on) or "-"


def _config(row: dict) -> str:
    c = row["constexprs"]
    tiles = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H") if k in c)
    # DOT_PRECISION only matters for fp32 operands (16-bit dots ignore it).
    prec = c.get("DOT_PRECISION", "") if any(d.startswith("fp32") for d in row.get("dtypes", ())) else ""
    return f"{tiles} w{row['options'].get('num_warps')} s{row['options'].get('num_stages')} {prec}".strip()


COLUMNS = (
    ("kernel", "kernel"),
    ("flags", "flags"),
    ("dtypes", "dtype"),
    ("arch", "arch"),
    ("heads", "head(s)"),
    ("config", "tiles warps stages prec"),
    ("registers", "regs"),
    ("spill", "spill B (st/ld)"),
    ("shared", "smem B"),
    ("tensor_core", "TC ops"),
    ("atomics", "RED/ATOM"),
    ("membar", "MEMBAR"),
    ("status", "status"),
)


def _cell(row: dict, key: str) -> str:
    if key == "flags":
        return _flags(row["constexprs"])
    if key == "config":
        return _config(row)
    if key == "spill":
        return f"{row['spill_stores']}/{row['spill_loads']}"
    if key == "atomics":
        return f"{row['red']}/{row['atom']}"
    if key in ("dtypes", "heads"):
        return ",".join(row[key])
    if key == "status":
        return "FAIL: " + "; ".join(row["violations"]) if row["violations"] else "ok"
    value = row.get(key)
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key).replace("|", "/") for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _header(meta: dict) -> str:
    return (
        f"# Compile gate ({meta['utc']})\n\n"
        f"triton {meta['triton']}, torch {meta['torch']}, git {meta['git_commit']}, {meta['jobs']} compiles "
        f"({meta['launches']} launches) in {meta['seconds']} s on {meta['workers']} workers; "
        f"{meta['violations']} violation(s).\n"
        f"Flags = the kernel's HAS_* constexprs that are on (bias, softcap, active, dent, dw, db, filter).\n"
    )


def run_gate(out: Path | None, n_workers: int, recipes=None, heads=HEADS, dtypes=None, archs=None, quiet=False):
    from ._common import git_commit, version

    t0 = time.perf_counter()
    uses = collect(recipes, heads, dtypes, archs)
    launches_seen = sum(u.launches for u in uses.values())
    t_capture = time.perf_counter() - t0
    jobs = list(uses)
    infos = compile_all(jobs, n_workers)
    rows = []
    for job, info in zip(jobs, infos, strict=True):
        row = summarize(job, info)
        use = uses[job]
        row.update(
            variants=sorted(use.variants),
            dtypes=sorted(use.dtypes, key=list(DTYPES).index) if dtypes is None else sorted(use.dtypes),
            heads=[h.name for h in heads if h.name in use.heads],
        )
        rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], _flags(r["constexprs"]), r["dtypes"], r["arch"], r["heads"]))
    n_bad = sum(bool(r["violations"]) for r in rows)
    meta = dict(
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        triton=version("triton"),
        torch=version("torch"),
        git_commit=git_commit(),
        jobs=len(jobs),
        launches=launches_seen,
        workers=n_workers,
        capture_seconds=round(t_capture, 1),
        seconds=round(time.perf_counter() - t0, 1),
        violations=n_bad,
    )
    table = markdown(rows)
    if not quiet:
        print(_header(meta))
        print(table)
        for r in rows:
            for v in r["violations"]:
                print(
                    f"VIOLATION {r['kernel']} [{_flags(r['constexprs'])}] {','.join(r['dtypes'])} {r['arch']} "
                    f"({','.join(r['heads'])}; {_config(r)}): {v}"
                )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_gate.md").write_text(_header(meta) + "\n" + table + "\n")
        with open(out / "compile_gate.jsonl", "w") as f:
            f.write(json.dumps(dict(meta=meta)) + "\n")
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
    return rows, meta


# ----------------------------------------------------------------------------- self-test

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _toy_acq_rel_atomic(x_ptr, acc_ptr, n, BLOCK: tl.constexpr):
        """Breaks the atomics rule: ``tl.atomic_add``'s default semantics are acq_rel."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.atomic_add(acc_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def _toy_dot(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """A plain (BM, K) x (K, BN) GEMM tile: spills with a huge fp32 tile on one warp, and
        overflows shared memory with many bf16 stages."""
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

except ImportError:  # pragma: no cover - triton is a dependency on Linux
    pass


def _toy_recipe(capture: Capture, head: Head, dtype: torch.dtype) -> None:
    x = torch.empty(4096, dtype=torch.float32)
    with capture.variant("toy acq_rel atomic"):
        _toy_acq_rel_atomic[(16,)](x, x, 4096, BLOCK=256)
    a, b, c = (torch.empty(256 * 1024, dtype=t) for t in (torch.float32, torch.float32, torch.float32))
    with capture.variant("toy spill"):
        _toy_dot[(1,)](a, b, c, 1024, BM=128, BN=128, BK=32, num_warps=1, num_stages=2)
    a, b = torch.empty(256 * 1024, dtype=torch.bfloat16), torch.empty(256 * 1024, dtype=torch.bfloat16)
    with capture.variant("toy smem"):
        _toy_dot[(1,)](a, b, c, 4096, BM=128, BN=256, BK=128, num_warps=8, num_stages=6)


def self_test(n_workers: int) -> int:
    """Every rule fires on a toy kernel built to break it (through the same capture/compile)."""
    rows, _ = run_gate(
        None,
        n_workers,
        recipes=[_toy_recipe],
        heads=HEADS[:1],
        dtypes={"toy": (torch.float32, True)},
        archs={90: ARCHS[90]},
        quiet=True,
    )
    expect = {"toy acq_rel atomic": "acquire/release", "toy spill": "spills", "toy smem": "shared memory"}
    ok = True
    for variant, needle in expect.items():
        found = [v for r in rows if variant in r["variants"] for v in r["violations"]]
        hit = any(needle in v for v in found)
        ok &= hit
        print(f"self-test {variant!r}: {'caught' if hit else 'MISSED'} -> {found}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastgrpo.benchmarks.compile_gate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compile")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--self-test", action="store_true", help="check that every rule fires on toy kernels")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces the JIT: compile in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastgrpo.benchmarks.compile_gate", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    if args.self_test:
        return self_test(args.jobs)
    rows, meta = run_gate(None if args.no_write else args.out, args.jobs)
    return 1 if meta["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
