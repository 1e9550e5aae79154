"""What a user's first runs of the TRL paths and the benchmarks do with the Quickstart's install.

Without TRL (an extra), every TRL path says in one line which extra to install, before building a
model. Benchmarks write to ``./fastgrpo-bench`` of the working directory unless ``--out`` names
another folder, so a run in a checkout leaves the committed ``benchmarks/results`` alone."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks import bench_generate, bench_ops, bench_step, bench_train, bench_trl

from fastgrpo.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
INSTALL = "pip install 'fastgrpo[trl]'"
MISSING = f"trl not installed ({INSTALL})"
BENCHES = (bench_ops, bench_train, bench_trl, bench_generate, bench_step)


@pytest.fixture
def no_trl(monkeypatch):
    """``trl`` neither found nor importable, as after ``pip install -e .``."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    monkeypatch.setitem(sys.modules, "trl", None)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# ----------------------------------------------------------------------------- A: TRL is an extra


def test_pyproject_has_the_trl_extra():
    text = (REPO / "pyproject.toml").read_text()
    assert '\ntrl = ["trl>=1.16"]\n' in text


def test_trl_dropin_says_which_extra_before_building_a_model(no_trl, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_trl, "save_model", lambda *a: pytest.fail("no model should be built"))
    monkeypatch.setattr(C, "environment", lambda *a: pytest.fail("nothing should run"))
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "trl-dropin", "--quick", "--out", str(tmp_path)])
    assert exc.value.code == f"fastgrpo bench trl-dropin: error: {MISSING}"  # printed to stderr, exit status 1
    assert capsys.readouterr().out == "" and not any(tmp_path.iterdir())


def test_trl_dropin_help_needs_no_trl(no_trl, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "trl-dropin", "--help"])
    assert exc.value.code == 0 and INSTALL in capsys.readouterr().out


def test_the_adapter_import_is_one_line_naming_the_extra(no_trl, monkeypatch):
    monkeypatch.delitem(sys.modules, "fastgrpo.integrations.trl", raising=False)
    with pytest.raises(ImportError) as exc:
        importlib.import_module("fastgrpo.integrations.trl")
    assert one_line(str(exc.value)) == f"fastgrpo.integrations.trl needs TRL >= 1.16: {MISSING}"
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_trl_example_exits_with_one_line_before_loading_anything():
    """``python examples/trl_grpo.py --tiny`` with trl unimportable: exit status 1, one line on stderr."""
    script = (
        "import runpy, sys; sys.modules['trl'] = None; sys.argv = ['examples/trl_grpo.py', '--tiny']; "
        "runpy.run_path('examples/trl_grpo.py', run_name='__main__')"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 1 and res.stdout == ""
    assert one_line(res.stderr) == f"trl_grpo.py: error: {MISSING}"


def test_bench_step_says_so_first_and_its_trl_rows_say_missing(no_trl, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_step, "make_setup", lambda *a: pytest.fail("nothing should be built"))
    assert bench_step.main(["--quick", "--trainers", "trl", "trl+fastgrpo", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_step.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == [f"missing: {MISSING}"] * 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"fastgrpo bench step: {MISSING}: the trl and trl+fastgrpo rows will say so"
    assert "Traceback" not in err


def test_bench_train_trl_contrast_says_so_before_fastgrpo_rows(no_trl, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_train, "build_model", lambda *a: pytest.fail("no model should be built"))
    argv = ["--quick", "--trl-contrast", "--time-budget", "0", "--no-plot", "--out", str(tmp_path)]
    assert bench_train.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_train.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows if r["trainer"] == "trl"} == {f"missing: {MISSING}"}
    err = capsys.readouterr().err
    said = err.index(f"trl contrast: missing: {MISSING}; the trl rows will say so")
    assert said < err.index("fastgrpo packing")  # before fastgrpo's first row, not after its rows


# ----------------------------------------------------------------------------- B: results go to ./fastgrpo-bench


@pytest.mark.parametrize("bench", BENCHES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_default_out_is_fastgrpo_bench_of_the_working_directory(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert C.default_out_dir() == tmp_path / "fastgrpo-bench"
    assert bench.parse_args(["--quick"]).out == tmp_path / "fastgrpo-bench"
    assert bench.parse_args(["--quick", "--out", "benchmarks/results"]).out == Path("benchmarks/results")
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: ./fastgrpo-bench; --out benchmarks/results adds to the committed tables)" in help_text


def test_quick_run_without_out_writes_to_fastgrpo_bench_not_the_checkout(monkeypatch, tmp_path, capsys):
    committed = REPO / "benchmarks" / "results"

    def snapshot():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in committed.rglob("*") if p.is_file()}

    before = snapshot()
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "ops", "--quick", "--tokens", "64", "--impls", "naive", "gemm-floor", "--modes", "fwd",
            "--heads", "frozen", "--repeats", "1", "--no-plot"]  # fmt: skip
    assert cli_main(argv) == 0
    out = tmp_path / "fastgrpo-bench"
    assert len((out / "bench_ops.jsonl").read_text().splitlines()) == 2 and (out / "bench_ops.csv").is_file()
    assert (out / "cpu-quick" / "bench_ops.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastgrpo-bench"]
    assert snapshot() == before
    assert f"appended 2 rows to {out / 'bench_ops'}.jsonl/.csv" in capsys.readouterr().err


def test_gpu_run_passes_out_to_every_bench():
    """gpu_run.sh updates the tables it means to: every bench call names its --out."""
    script = (REPO / "benchmarks" / "gpu_run.sh").read_text().replace("\\\n", " ")
    bench = re.compile(r"^\s*[^#]*\bbench (ops|train|trl-dropin|generate|step)\b")  # calls, not comments
    calls = [line for line in script.splitlines() if bench.match(line)]
    assert len(calls) >= 6
    for line in calls:
        assert "--out " in line, line


def test_gitignore_covers_the_default_output_folders():
    lines = (REPO / ".gitignore").read_text().splitlines()
    for folder in ("fastgrpo-bench/", "fastgrpo-output/", "runs/"):
        assert folder in lines
