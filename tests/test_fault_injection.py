"""Crash safety: ``fastgrpo train`` killed with SIGKILL at random moments, also mid-checkpoint, resumes
with ``--resume_from_checkpoint latest`` from the last complete checkpoint and ends with the same
``metrics.jsonl`` as a run never interrupted; a half-written checkpoint is never ``latest``."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastgrpo.train import checkpoint as ckpt

DRIVER = Path(__file__).parent / "fault_driver.py"
STEPS = 10
VOLATILE = ("tokens_per_second", "step_time", "time/", "peak_memory_gb", "memory/")
SEED = 20261204
pytestmark = pytest.mark.slow


def _args(out: Path) -> list[str]:
    # The embedded default (no --model), short, a checkpoint after every step.
    return ["--output_dir", str(out), "--max_steps", str(STEPS), "--save_steps", "1", "--disable_tqdm", "true",
            "--plot", "false"]  # fmt: skip


def _start(out: Path, resume: bool, pause: tuple[int, Path] | None = None) -> subprocess.Popen:
    hook = [] if pause is None else [str(pause[0]), str(pause[1])]
    # Killed before the first checkpoint: the folder holds that run's metrics rows, which a fresh start
    # replaces only when asked to.
    extra = ["--resume_from_checkpoint", "latest"] if resume else ["--overwrite_output_dir", "true"]
    cmd = [sys.executable, str(DRIVER), *hook, "--", *_args(out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, "timed out waiting for the kill point"
        time.sleep(0.02)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _check_latest_is_complete(out: Path) -> None:
    """Every checkpoint ``latest`` could pick holds all its files, and loads."""
    for path in ckpt.list_checkpoints(out):
        names = {p.name for p in path.iterdir()}
        assert {"model.safetensors", "config.yaml", ckpt.STATE_FILE, "tokenizer.json"} <= names, (path, names)
        assert ckpt.load_trainer_state(path)["step"] == int(path.name.rsplit("-", 1)[1])


def _finish(out: Path) -> None:
    resume = bool(ckpt.list_checkpoints(out))  # killed before the first checkpoint: start again
    proc = _start(out, resume=resume)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _assert_same_run(reference: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for want, row in zip(reference, got, strict=True):
        diff = {k: (want[k], row.get(k)) for k in want if not _same(want[k], row.get(k))}
        assert not diff, f"step {want['step']} differs from the uninterrupted run: {diff}"


@pytest.fixture(scope="module")
def reference(embedded, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _start(out, resume=False)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    return _rows(out)


def test_sigkill_at_random_moments_resumes_to_the_same_run(reference, tmp_path, capsys):
    """Five kills in one run, each after a seeded random number of logged steps plus a random delay
    (mid-step, mid-log or mid-save, as it falls), each followed by a resume."""
    rng = random.Random(SEED)
    out = tmp_path / "run"
    trials = []
    for _ in range(5):
        done = _lines(out)
        target = min(STEPS - 1, done + rng.randint(1, 2))
        delay = rng.uniform(0.0, 0.4)
        trials.append((target, round(delay, 3)))
        proc = _start(out, resume=bool(ckpt.list_checkpoints(out)))
        _wait(proc, lambda: _lines(out) >= target)  # noqa: B023 (waited on here, in this iteration)
        time.sleep(delay)
        _kill(proc)
        _check_latest_is_complete(out)
    with capsys.disabled():
        print(f"\nfault injection, seed {SEED}: kills after (logged steps, delay s) {trials}")
    _finish(out)
    _check_latest_is_complete(out)
    _assert_same_run(reference, _rows(out))


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(reference, tmp_path):
    """Killed with checkpoint-4's files written but not yet renamed into place: latest is
    checkpoint-3, the half-written directory is never picked, and the resume ends as the uninterrupted run."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = _start(out, resume=False, pause=(4, marker))
    _wait(proc, marker.exists)
    _kill(proc)
    assert any(p.name.startswith(f".{ckpt.PREFIX}4.") for p in out.iterdir())  # the unpublished copy is there
    assert ckpt.resolve_checkpoint("latest", out)[0].name == f"{ckpt.PREFIX}3"
    _check_latest_is_complete(out)
    _finish(out)
    _assert_same_run(reference, _rows(out))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the resume removed the partial copy


def test_a_metrics_row_cut_short_is_dropped_on_resume(tmp_path):
    from fastgrpo.train.tracking import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLog(tmp_path, resume_step=1)
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damage inside the file is not a crash's
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)
