"""``fastgrpo bench ops`` runs every implementation on CPU, checks them against naive, and reports
missing peers, CUDA-only rows and out-of-memory as results."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastgrpo.benchmarks import bench_ops, ops_impls

from fastgrpo.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
CPU_IMPLS = [
    "naive", "fastgrpo-torch", "fastgrpo-chunked", "fastgrpo-chunked-input-acc", "naive-compile",
    "liger-fused-linear", "trl-chunked", "gemm-floor",
]  # fmt: skip
TRITON_IMPLS = ["naive", "fastgrpo-fused", "fastgrpo-fused-filter", "liger-triton"]
IN_FORWARD = ops_impls.GRADS_IN_FORWARD


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bench_ops.jsonl").read_text().splitlines()]


def _run(out, *extra, rc=0):
    argv = ["--quick", "--tokens", "128", "--repeats", "1", "--out", str(out), *extra]
    threads = torch.get_num_threads()
    assert bench_ops.main(argv) == rc
    # --quick times on one thread, but an in-process caller keeps its own setting afterwards.
    assert torch.get_num_threads() == threads
    return _rows(out)


def test_quick_run_every_cpu_impl_mode_and_head(tmp_path, capsys):
    # two sizes: the compiled rows then also go through a recompile (dynamic shapes)
    rows = _run(tmp_path, "--impls", *CPU_IMPLS, "--tokens", "64", "128")
    assert len(rows) == len(CPU_IMPLS) * 3 * 2 * 2 + 2 * 2  # + the floor's 3gemm row per head and N
    assert {(r["impl"], r["mode"], r["head"], r["N"]) for r in rows} == {
        (i, m, h, n) for i in CPU_IMPLS for m in bench_ops.MODES for h in bench_ops.HEAD_KINDS for n in (64, 128)
    } | {("gemm-floor", "3gemm", h, n) for h in bench_ops.HEAD_KINDS for n in (64, 128)}
    floor_ms = {(r["mode"], r["head"], r["N"]): r["ms"] for r in rows if r["impl"] == "gemm-floor"}
    for r in rows:
        if r["impl"] in IN_FORWARD and r["mode"] == "bwd":  # its forward computes the gradients
            assert r["status"] == "n/a: gradients are computed in the forward" and "ms" not in r
            continue
        assert r["status"] == "ok", r
        assert r["p20_ms"] <= r["ms"] <= r["p80_ms"]
        held_to = "fwd+bwd" if r["impl"] in IN_FORWARD else r["mode"]
        assert r["x_floor"] == pytest.approx(r["ms"] / floor_ms[held_to, r["head"], r["N"]])
        if r["impl"] in IN_FORWARD:
            assert r["x_floor_3gemm"] == pytest.approx(r["ms"] / floor_ms["3gemm", r["head"], r["N"]])
        assert r["device"] and r["torch"] == torch.__version__ and r["git_commit"] and r["trl"] and r["liger-kernel"]
        assert r["N"] == r["active_tokens"] and (r["H"], r["V"]) == bench_ops.HEADS["tiny"]
        if r["impl"] == "gemm-floor":
            assert r["x_floor"] == 1.0
        if r["mode"] == "fwd+bwd" and r["impl"] != "gemm-floor":
            assert r["vs"] == "float64"  # fp32: every implementation, naive included, agrees with float64
            assert r["loss_rel_diff"] < 1e-5 and r["dhidden_rel_err"] < 1e-5
            assert (r["dweight_rel_err"] < 1e-5) if r["head"] == "trainable" else "dweight_rel_err" not in r
    # TFLOP/s count 4 GEMM passes for a trainable head and 3 for a frozen one
    floor = {(r["mode"], r["head"], r["N"]): r for r in rows if r["impl"] == "gemm-floor"}
    for (mode, head, n), r in floor.items():
        bwd = 3 if head == "trainable" else 2
        passes = {"fwd": 1, "bwd": bwd, "fwd+bwd": 1 + bwd, "3gemm": bwd}[mode]
        assert r["tflops"] == pytest.approx(passes * 2 * n * 96 * 2003 / (r["ms"] * 1e-3) / 1e12)
    for r in rows:  # a forward that computes the gradients is held to the fwd+bwd floor's FLOPs
        if r["impl"] in IN_FORWARD and r["mode"] == "fwd":
            whole = floor["fwd+bwd", r["head"], r["N"]]
            assert r["tflops"] == pytest.approx(whole["tflops"] * whole["ms"] / r["ms"])
    with open(tmp_path / "bench_ops.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    run_dir = tmp_path / "cpu-quick"
    assert "| tiny | 128 | trainable | fwd+bwd | trl-chunked |" in (run_dir / "bench_ops.md").read_text()
    assert "| tiny | 128 | frozen | bwd | liger-fused-linear |" in capsys.readouterr().out
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    assert pngs == sorted(
        f"bench_ops_{m.replace('+', '_')}_{h}.png" for m in bench_ops.MODES for h in ("trainable", "frozen")
    )
    assert all((run_dir / p).stat().st_size > 5000 for p in pngs)


def test_triton_rows_under_the_interpreter_agree_with_naive(tmp_path):
    rows = _run(tmp_path, "--impls", *TRITON_IMPLS, "--modes", "fwd+bwd")
    assert [(r["impl"], r["head"]) for r in rows] == [(i, h) for h in bench_ops.HEAD_KINDS for i in TRITON_IMPLS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["vs"] == "float64" and r["loss_rel_diff"] < 1e-5 and r["dhidden_rel_err"] < 1e-5, r


def test_rows_say_why_an_impl_did_not_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.kernels", None)  # `import trl.kernels` now fails
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine without the interpreter

    def oom(x, mode):
        def loss():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        return loss

    monkeypatch.setitem(ops_impls.IMPLS, "naive", oom)
    rows = _run(tmp_path, "--heads", "frozen", "--impls", "naive", "fastgrpo-torch", "fastgrpo-fused",
                "liger-fused-linear", "trl-chunked")  # fmt: skip
    status = {(r["impl"], r["mode"]): r["status"] for r in rows}
    assert status == {
        ("naive", "fwd"): "OOM",
        ("naive", "bwd"): "OOM",
        ("naive", "fwd+bwd"): "OOM",
        ("fastgrpo-torch", "fwd"): "ok",
        ("fastgrpo-torch", "bwd"): "ok",
        ("fastgrpo-torch", "fwd+bwd"): "ok",
        ("fastgrpo-fused", "*"): "skipped: needs CUDA (or TRITON_INTERPRET=1 on CPU)",
        ("liger-fused-linear", "*"): status[("liger-fused-linear", "*")],
        ("trl-chunked", "*"): status[("trl-chunked", "*")],
    }
    assert status[("liger-fused-linear", "*")].startswith("missing: liger-kernel")
    assert status[("trl-chunked", "*")].startswith("missing: trl>=1.16")


def test_time_budget_and_appending_keep_one_table(tmp_path):
    _run(tmp_path, "--impls", "fastgrpo-torch", "--modes", "fwd")
    rows = _run(tmp_path, "--impls", "fastgrpo-torch", "--time-budget", "0", rc=1)  # 1: no row ran
    assert [r["status"] for r in rows[2:]] == ["skipped: time budget"] * 2
    lines = (tmp_path / "bench_ops.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("model,N,head,mode,impl,ms")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rows", "0"], "--rows must be >= 1"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--pad-frac", "0.7"], "--pad-frac must be in [0, 0.5)"),
        (["--impls", "cce"], "invalid choice: 'cce'"),
        (["--models", "qwen9"], "or H,V (two integers), got 'qwen9'"),
        (["--models", "0,100"], "H and V must be >= 1"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--quick", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_dispatches_to_the_benchmarks(tmp_path, capsys):
    assert cli_main(["bench"]) == 2
    assert "ops" in capsys.readouterr().err
    argv = ["bench", "ops", "--quick", "--tokens", "64", "--impls", "fastgrpo-torch", "--modes", "fwd"]
    assert cli_main([*argv, "--heads", "frozen", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]) == 0
    assert [r["status"] for r in _rows(tmp_path)] == ["ok"]


def test_a_head_shape_of_your_own(tmp_path):
    rows = _run(tmp_path, "--models", "40,301", "--tokens", "48", "--impls", "naive", "fastgrpo-torch",
                "--modes", "fwd+bwd", "--heads", "trainable")  # fmt: skip
    assert [(r["model"], r["H"], r["V"], r["N"], r["status"]) for r in rows] == [("40,301", 40, 301, 48, "ok")] * 2
    assert rows[1]["loss_rel_diff"] < 1e-5


def test_padded_rows_count_only_active_tokens(tmp_path):
    rows = _run(tmp_path, "--impls", "naive", "fastgrpo-torch", "gemm-floor", "--modes", "fwd+bwd",
                "--heads", "trainable", "--pad-frac", "0.25")  # fmt: skip
    active = rows[0]["active_tokens"]
    assert 0 < active < 128 and all(r["active_tokens"] == active for r in rows)
    fused = next(r for r in rows if r["impl"] == "fastgrpo-torch")
    assert fused["vs"] == "float64" and fused["loss_rel_diff"] < 1e-5 and fused["dhidden_rel_err"] < 1e-5


def test_pytest_benchmark_suite_runs(tmp_path):
    """The suite in benchmarks/ collects and runs its CPU cases (timing disabled)."""
    suite = str(REPO / "benchmarks" / "test_ops_bench.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), suite,
           "--benchmark-disable", "-k", "naive and not compile or floor"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "12 passed" in res.stdout


def test_peak_memory_counts_what_the_closure_retains(monkeypatch):
    """CUDA accounting with a fake allocator: the peak is taken above what was live before the
    closure was built, so a bwd closure's retained forward graph (or the floor's buffers) counts,
    as do the transient peak inside the call and the outputs it returns."""
    mib = 2**20
    state = dict(allocated=1000 * mib, peak=1000 * mib)  # the inputs

    def alloc(n):
        state["allocated"] += n
        state["peak"] = max(state["peak"], state["allocated"])

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)

    def make():
        alloc(300 * mib)  # retained: the forward's saved tensors

        def fn():
            alloc(50 * mib)  # transient workspace
            alloc(-50 * mib)
            alloc(20 * mib)  # the returned gradients
            return "grads"

        return fn

    fn, out, peak, first_call_s = bench_ops.measure_memory(make, torch.device("cuda"))
    # retained graph + the warm call's outputs (this fake never frees them) + the transient peak
    assert out == "grads" and peak == 300 + 20 + 50 and first_call_s >= 0


def test_rows_record_the_command_as_typed(tmp_path):
    """``fastgrpo bench ...`` rows record that line, never the interpreter or the checkout's path."""
    from fastgrpo.benchmarks import _common

    argv = ["bench", "ops", "--quick", "--tokens", "32", "--impls", "fastgrpo-torch", "--modes", "fwd"]
    assert cli_main([*argv, "--heads", "frozen", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]) == 0
    (row,) = _rows(tmp_path)
    assert row["command"].startswith("fastgrpo bench ops --quick --tokens 32 ") and sys.executable not in row["command"]
    root = Path(_common.REPO)
    assert _common.typed_command(["fastgrpo", "x", str(root / "benchmarks" / "out")]) == "fastgrpo x benchmarks/out"
    assert _common.typed_command(["fastgrpo", str(Path.home() / "runs")]) == "fastgrpo '~/runs'"
    assert _common._COMMAND is None  # the CLI's line does not stick to later in-process runs


def test_committed_results_carry_no_machine_paths():
    """Every committed row and run table names its command as typed: ``fastgrpo ...``."""
    import glob

    from fastgrpo.benchmarks import _common

    results = Path(_common.BENCH_DIR) / "results"
    commands = []
    for path in glob.glob(str(results / "*.jsonl")):
        commands += [json.loads(line).get("command") for line in Path(path).read_text().splitlines()]
    for path in glob.glob(str(results / "*.csv")):
        with open(path, newline="") as f:
            commands += [r["command"] for r in csv.DictReader(f) if "command" in r]
    for path in glob.glob(str(results / "*" / "*.md")):
        line = Path(path).read_text().splitlines()[2]
        if line.startswith("`"):  # a run's table (the compile gate's have none)
            commands.append(line.strip("`"))
    assert len(commands) > 100
    bad = [c for c in commands if not (c or "").startswith("fastgrpo ") or ".venv" in c or "/python" in c]
    assert not bad, bad[:3]
