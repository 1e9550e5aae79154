"""The ahead-of-time compile gate (``python -m fastgrpo.benchmarks.compile_gate``): every Triton
launch the public ops make, compiled for sm_80 / sm_90a / sm_100a with the JIT's own
specialization, has no register spill, fits shared memory, uses tensor cores for 16-bit and TF32
dots, and has no acquire/release atomics or fences they imply.

Needs no GPU (triton compiles for a GPUTarget on CPU with the ptxas / cuobjdump its wheel ships),
so it runs everywhere the suite runs; it is never skipped. The gate runs in a subprocess without
TRITON_INTERPRET (this suite's conftest sets it; the interpreter replaces the JIT). A few minutes
on 2 cores, most of it ``triton.compile``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gate(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "fastgrpo.benchmarks.compile_gate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_every_launch_compiles_clean_for_every_target(tmp_path):
    proc = _gate("--out", str(tmp_path))
    problems = [line for line in proc.stdout.splitlines() if line.startswith("VIOLATION")]
    assert proc.returncode == 0, "compile gate failed:\n" + "\n".join(
        problems or [proc.stdout[-3000:], proc.stderr[-3000:]]
    )
    lines = (tmp_path / "compile_gate.jsonl").read_text().splitlines()
    meta, rows = json.loads(lines[0])["meta"], [json.loads(line) for line in lines[1:]]
    assert meta["violations"] == 0 and rows and (tmp_path / "compile_gate.md").is_file()
    assert not [r for r in rows if r["violations"]]
    # Coverage: every kernel, every target, every operand kind; no compile silently missing.
    seen = {(r["kernel"], r["arch"], d) for r in rows for d in r["dtypes"]}
    kernels = ("_fwd_kernel", "_bwd_kernel", "_dlogits_kernel", "_row_stats_kernel", "_row_grad_kernel")
    kernels += ("_decode_kernel",)
    for kernel in kernels:
        for arch in ("sm_80", "sm_90a", "sm_100a"):
            for dtype in ("bf16", "fp16", "fp32-tf32", "fp32-ieee"):
                assert (kernel, arch, dtype) in seen, (kernel, arch, dtype)
    # The measurements are real: registers parsed, tensor cores where the dots need them, and the
    # backward's accumulators are relaxed REDs (no ATOM, which acq_rel would be).
    assert all(r["registers"] for r in rows)
    assert all(r["tensor_core"] > 0 for r in rows if r["dots"] and r["dtypes"] != ["fp32-ieee"])
    assert not [r for r in rows if r["kernel"].startswith("_row") and (r["dots"] or r["red"] or r["atom"])]
    bwd = [r for r in rows if r["kernel"] == "_bwd_kernel"]
    assert all(r["red"] > 0 and r["atom"] == 0 for r in bwd)


def test_the_gate_fails_kernels_that_break_its_rules():
    """Toy kernels (an acq_rel atomic, a spilling dot, a shared-memory overflow) compiled through
    the same capture / specialize / compile path are each caught."""
    proc = _gate("--self-test", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("caught") == 3


def test_tensor_core_and_fence_rules():
    from fastgrpo.benchmarks.compile_gate import ARCHS, violations

    row = dict(
        spill_stores=0,
        spill_loads=0,
        stack=0,
        shared=0,
        tensor_core=0,
        dots=["bf16"],
        ptx_atomics={"red.global.gpu.relaxed.add.f32": 4},
        ptx_fences={"fence.proxy.async.shared::cta": 3},
        membar=3,
    )
    assert any("tensor-core" in v for v in violations(row, dict(needs_tensor_cores=True), ARCHS[90]))
    assert violations(row, dict(needs_tensor_cores=False), ARCHS[90]) == []  # IEEE fp32 is exempt
    assert any("MEMBAR" in v for v in violations({**row, "membar": 19}, dict(needs_tensor_cores=False), ARCHS[90]))
