"""benchmarks/gpu_run.sh, the plan of a GPU device call, is checked here on the CPU so that the first
GPU call does not fail on a typo: its syntax, its plan and budgets, the refusal of an unknown stage, and
a dry run (GPU_RUN_DRY=1) that invokes every stage's command line --quick-sized."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
DEFAULT_PLAN = ["tests", "ops-7b", "generate-128", "step", "train"]  # issue 23's order
KNOBS = (  # the script's environment variables
    *(f"{s}_BUDGET" for s in ("TESTS", "OPS", "STAGE", "GENERATE", "STEP", "TRAIN", "TRL", "CALL")),
    *("GRACE", "TRAIN_BENCHES", "TESTS_FAST", "TESTS_KERNELS", "GENERATE_BACKENDS", "GENERATE_ARGS", "STEP_ARGS"),
    *("GPU_RUN_DRY", "GPU_RUN_PLAN", "OUT", "RESULTS"),
)


def run(*stages, cwd, timeout=600, **env):
    """The script under bash, with this interpreter's environment first on PATH (it calls `python`) and
    none of its knobs inherited from the caller."""
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(SCRIPT), *stages], cwd=cwd, env=base | env, capture_output=True, text=True, timeout=timeout
    )


def exit_codes(out: Path) -> list[tuple[str, str, str]]:
    """(stage, rc, seconds) per line of exit_codes.txt ("stage=rc 12s")."""
    lines = (out / "exit_codes.txt").read_text().splitlines()
    return [re.fullmatch(r"([\w.-]+)=(\S+) (\d+)s", line).groups() for line in lines]


def plan(*stages, tmp_path, **env) -> dict[str, int]:
    r = run(*stages, cwd=tmp_path, GPU_RUN_PLAN="1", **env)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith("plan:"), line
    return {m[0]: int(m[1]) for m in re.findall(r"([\w.-]+)\((\d+)s\)", line)}


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_default_plan_is_the_issues_order_and_fits_seven_minutes(tmp_path):
    budgets = plan(tmp_path=tmp_path)
    assert list(budgets) == DEFAULT_PLAN
    assert sum(budgets.values()) + 20 == 420  # + the ~20 s install: 7 minutes of the 8-minute call
    r = run(cwd=tmp_path, GPU_RUN_PLAN="1")
    grace, call = (int(x) for x in re.search(r"grace=(\d+)s call=(\d+)s", r.stdout).groups())
    # every stage run to its hard cut (budget + grace) still ends by CALL_BUDGET, 10 s before the limit
    assert sum(budgets.values()) + 20 + len(budgets) * grace <= call <= 470
    # the second call: step and train with the budgets of a call of their own, shorter than 8 minutes
    second = plan("step", "train", tmp_path=tmp_path)
    assert list(second) == ["step", "train"] and 20 + sum(second.values()) + 2 * grace < 400
    assert plan(tmp_path=tmp_path, TRAIN_BUDGET="45")["train"] == 45


@pytest.mark.parametrize("env", [{}, {"TRAIN_BENCHES": "1.5b 8b_lora"}], ids=["stage", "train-entry"])
def test_unknown_names_are_refused_before_anything_runs(tmp_path, env):
    out = tmp_path / "out"
    stages = ("tests", "ops-9b") if not env else ("train",)
    r = run(*stages, cwd=tmp_path, OUT=str(out), RESULTS=str(tmp_path / "results"), GPU_RUN_DRY="1", **env)
    assert r.returncode != 0
    assert ("unknown stage: ops-9b" if not env else "unknown TRAIN_BENCHES entry: 8b_lora") in r.stderr
    assert not out.exists()  # refused before the install and the device lines


def test_a_stage_past_its_budget_is_cut_and_the_next_one_runs(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    r = run("ops-quick", "tests", cwd=tmp_path, OUT=str(out), RESULTS=str(results), GPU_RUN_DRY="1",
            OPS_BUDGET="2", GRACE="1", timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    codes = exit_codes(out)
    assert [(s, rc) for s, rc, _ in codes] == [("install", "skipped/0"), ("ops-quick", "124"), ("tests", "0")]
    assert int(codes[1][2]) <= 3 + 2  # cut at budget + grace (timeout's TERM), not run to its end
    assert (out / "results.tgz").exists()


@pytest.mark.slow  # 90-110 s on 2 CPU cores
def test_dry_run_of_the_default_plan(tmp_path):
    # relative OUT and RESULTS, as the issue's command line has them; both under tmp_path (the cwd)
    r = run(cwd=tmp_path, OUT="out", RESULTS="results", GPU_RUN_DRY="1")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out, results = tmp_path / "out", tmp_path / "results"
    codes = exit_codes(out)
    assert [s for s, _, _ in codes] == ["install", *DEFAULT_PLAN]
    assert all(rc == "0" for s, rc, _ in codes if s != "install"), codes
    # the first lines: the device and free memory, then (after the install) the versions
    first = r.stdout.splitlines()
    assert first[1].startswith("device: cpu") and first[2].startswith("host memory:")
    assert first[3].startswith("plan: tests(")
    assert "torch: " in (out / "env.txt").read_text()
    # every stage ran its command: the benches' rows landed, --quick-sized
    for name in ("bench_ops", "bench_generate", "bench_step", "bench_train"):
        assert (results / f"{name}.jsonl").stat().st_size > 0, name
    step = [json.loads(line) for line in (results / "bench_step.jsonl").read_text().splitlines()]
    assert {r["trainer"] for r in step} == {"fastgrpo", "trl", "trl+fastgrpo"}
    train = [json.loads(line) for line in (results / "bench_train.jsonl").read_text().splitlines()]
    # 1.5b full then 7b LoRA (--model tiny here), each with stock TRL's update beside it (--trl-contrast)
    fits = [(bool(r["use_peft"]), r["trainer"]) for r in train if r["kind"] == "find-max"]
    assert fits == [(False, "fastgrpo"), (False, "trl"), (True, "fastgrpo"), (True, "trl")]
    assert {(r["G"], r["rows"]) for r in train if not r["use_peft"]} == {(8, 1)}
    assert {(r["lora_r"], r["beta"]) for r in train if r["use_peft"]} == {(16, 0.04)}
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert "results/bench_train.jsonl" in names and "results/train.txt" in names
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "exit_codes.txt", "results.tgz"]


@pytest.mark.slow  # 50-90 s on 2 CPU cores (ops-quick and trl, ~100 s more, are left to a manual dry run)
def test_dry_run_of_the_stages_of_their_own_calls(tmp_path):
    out = tmp_path / "out"
    stages = ["ops-8b", "generate", "generate-256"]
    r = run(*stages, cwd=tmp_path, OUT=str(out), RESULTS=str(tmp_path / "results"), GPU_RUN_DRY="1",
            GENERATE_ARGS="--backends hf continuous")  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert [(s, rc) for s, rc, _ in exit_codes(out)] == [("install", "skipped/0"), *((s, "0") for s in stages)]
