"""Issue 21, checkpoints and output folders: no code runs from a checkpoint, no run's data is lost to
another run or to a resume, and every refusal is one line before any model loads."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train import checkpoint as ckpt
from fastgrpo.train import trainer as trainer_mod
from fastgrpo.train.run_dir import LOCK_FILE, OWNER_FILE, RunDir
from fastgrpo.train.trainer import GRPOTrainer

from helpers import train_config

FAST = ["--disable_tqdm", "true", "--plot", "false"]


class _RunsCode:
    """What an attacker puts in a trainer state: unpickling it would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _names(out: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out)]


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def six_steps(embedded, tmp_path_factory) -> Path:
    """A finished 6-step run with a checkpoint after every step (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("six") / "run"
    GRPOTrainer(train_config(embedded, out, max_steps=6, save_steps=1, save_total_limit=None, plot=False)).train()
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: a refusal must come before it."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(trainer_mod, "build_models", refuse)


# ---- code execution ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["latest", "path"])
def test_a_trainer_state_that_would_run_code_is_refused_in_one_line(six_steps, tmp_path, capsys, spec, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    evil = _copy(six_steps / "checkpoint-6", out / "checkpoint-6")
    marker = tmp_path / "pwned"
    state = ckpt.load_trainer_state(evil)
    torch.save({**state, "extra": _RunsCode(marker)}, evil / ckpt.STATE_FILE)
    _no_model_load(monkeypatch)
    where = "latest" if spec == "latest" else str(evil)
    assert main(["train", "--output_dir", str(out), "--resume_from_checkpoint", where, *FAST]) == 2
    line = _err_line(capsys)
    assert not marker.exists()  # the command never ran
    assert f"{evil / ckpt.STATE_FILE} is refused" in line and "never unpickles code" in line
    assert "Traceback" not in capsys.readouterr().err


def test_trainer_state_loads_with_weights_only_and_no_allow_list(six_steps):
    state = torch.load(six_steps / "checkpoint-6" / ckpt.STATE_FILE, weights_only=True)
    assert state["step"] == 6 and isinstance(state["rng"]["numpy"][1], list)


# ---- timelines -----------------------------------------------------------------------------------


def test_resume_from_an_older_checkpoint_moves_the_later_timeline_aside(six_steps, embedded, tmp_path, capsys):
    out = _copy(six_steps, tmp_path / "run")
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-5"):
        shutil.rmtree(out / name)  # left: checkpoint-4 and checkpoint-6
    cfg = train_config(embedded, out, max_steps=5, save_steps=1, save_total_limit=1, plot=False,
                       resume_from_checkpoint=str(out / "checkpoint-4"))  # fmt: skip
    GRPOTrainer(cfg).train()
    said = capsys.readouterr().out
    aside = out / "abandoned-after-step-4"
    assert f"moved to {aside}" in said and "checkpoint-6, 2 metrics rows" in said
    assert _names(out) == ["checkpoint-5"]  # rotation kept the new head, not the abandoned step 6
    assert _names(aside) == ["checkpoint-6"] and _steps(aside) == [5, 6]
    assert _steps(out) == [1, 2, 3, 4, 5]
    GRPOTrainer(train_config(embedded, out, max_steps=7, plot=False, resume_from_checkpoint="latest")).train()
    assert _steps(out) == [1, 2, 3, 4, 5, 6, 7] and _names(out) == ["checkpoint-5", "checkpoint-7"]


def test_a_resave_killed_between_its_renames_is_restored(six_steps, embedded, tmp_path, capsys):
    out = _copy(six_steps, tmp_path / "run")
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-5", "checkpoint-6"):
        shutil.rmtree(out / name)
    # checkpoint-4 was being re-saved: moved aside, its new copy written but not yet renamed in.
    shutil.copytree(out / "checkpoint-4", out / ".checkpoint-4.tmp1234")
    os.replace(out / "checkpoint-4", out / ".checkpoint-4.old")
    trainer = GRPOTrainer(train_config(embedded, out, max_steps=4, plot=False, resume_from_checkpoint="latest"))
    trainer.close()
    assert trainer.step == 4 and "restored checkpoint-4" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("damage", [ckpt.STATE_FILE, "model.safetensors"])
def test_latest_passes_over_a_checkpoint_cut_short(six_steps, embedded, tmp_path, capsys, damage):
    out = _copy(six_steps, tmp_path / "run")
    file = out / "checkpoint-6" / damage
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    trainer = GRPOTrainer(train_config(embedded, out, max_steps=6, plot=False, resume_from_checkpoint="latest"))
    trainer.close()
    said = capsys.readouterr().out
    assert trainer.step == 5 and "checkpoint-6 cannot be resumed from" in said and "passing over it" in said
    assert _names(out / "abandoned-after-step-5") == ["checkpoint-6"]  # kept for a look, out of the timeline


def test_a_named_checkpoint_cut_short_is_one_line(six_steps, tmp_path, capsys, monkeypatch):
    out = _copy(six_steps, tmp_path / "run")
    file = out / "checkpoint-3" / ckpt.STATE_FILE
    file.write_bytes(file.read_bytes()[:1000])
    _no_model_load(monkeypatch)
    argv = ["train", "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-3"), *FAST]
    assert main(argv) == 2
    assert f"{file} is damaged or incomplete" in _err_line(capsys)


# ---- settings on resume --------------------------------------------------------------------------


def test_a_changed_learning_rate_applies_and_is_said(six_steps, embedded, tmp_path, capsys):
    out = _copy(six_steps, tmp_path / "run")
    cfg = train_config(embedded, out, max_steps=7, plot=False, learning_rate=0.01, loss_type="grpo",
                       resume_from_checkpoint="latest")  # fmt: skip
    row = GRPOTrainer(cfg).train()[-1]
    said = capsys.readouterr().out
    assert "learning_rate 0.0003 -> 0.01" in said and "loss_type dapo -> grpo" in said
    # constant_with_warmup, warmup over: the whole new rate, in the update and in what is recorded.
    assert row["step"] == 7 and row["learning_rate"] == pytest.approx(0.01)
    state = ckpt.load_trainer_state(out / "checkpoint-7")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert ckpt.load_saved_config(out / "checkpoint-7")["learning_rate"] == 0.01


@pytest.mark.parametrize(("field", "value", "shown"), [("seed", 5, "5"), ("shuffle_dataset", False, "false")])
def test_a_setting_the_checkpoint_overrides_is_refused_naming_it(six_steps, embedded, tmp_path, monkeypatch, field,
                                                                 value, shown):  # fmt: skip
    out = _copy(six_steps, tmp_path / "run")
    saved = ckpt.load_saved_config(out / "checkpoint-6")[field]
    _no_model_load(monkeypatch)
    cfg = train_config(embedded, out, max_steps=7, resume_from_checkpoint="latest", **{field: value})
    with pytest.raises(ValueError, match=rf"--{field} {shown} \(saved: {str(saved).lower()}\) cannot apply"):
        GRPOTrainer(cfg)


# ---- one run per folder, nothing overwritten -----------------------------------------------------


def test_the_embedded_default_never_overwrites_a_folder_the_user_named(six_steps, tmp_path, capsys, monkeypatch):
    out = _copy(six_steps, tmp_path / "runs" / "ow")
    before = (out / "metrics.jsonl").read_text()
    _no_model_load(monkeypatch)
    assert main(["train", "--output_dir", str(out), "--max_steps", "1", *FAST]) == 2
    assert "holds an earlier run (6 checkpoints, metrics.jsonl (6 rows))" in _err_line(capsys)
    assert _names(out) == [f"checkpoint-{i}" for i in range(1, 7)] and (out / "metrics.jsonl").read_text() == before


def test_the_embedded_default_replaces_only_its_own_folder(embedded, six_steps, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max_steps", "1", *FAST]) == 0
    own = tmp_path / "fastgrpo-output"
    assert (own / OWNER_FILE).is_file() and not (own / LOCK_FILE).exists()
    assert main(["train", "--max_steps", "2", *FAST]) == 0  # its own demo folder: replaced
    assert _steps(own) == [1, 2] and _names(own) == ["checkpoint-2"]
    shutil.rmtree(own)
    _copy(six_steps, own)  # the same path holding a run of the user's: refused
    assert main(["train", "--max_steps", "1", *FAST]) == 2
    assert "holds an earlier run" in _err_line(capsys) and len(_names(own)) == 6


def test_a_fresh_run_keeps_an_earlier_metrics_file_without_checkpoints(embedded, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    _no_model_load(monkeypatch)
    with pytest.raises(ValueError, match=r"holds an earlier run \(metrics.jsonl \(1 rows\)\)"):
        GRPOTrainer(train_config(embedded, out, overwrite_output_dir=False))
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "reward": 0.5}\n'


def test_a_second_run_in_the_same_folder_is_refused(embedded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fastgrpo.train.run_dir import RunDir
            d = RunDir({str(out)!r})
            print("locked", flush=True)
            time.sleep(120)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        _no_model_load(monkeypatch)
        assert main(["train", "--output_dir", str(out), "--max_steps", "1", *FAST]) == 2
        assert f"is in use by another run (pid {holder.pid} on " in _err_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file stays behind; the kernel dropped its lock, so it does not block.
    assert (out / LOCK_FILE).exists()
    RunDir(out).close()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unwritable_output_dir_is_one_line_before_the_model(embedded, tmp_path, capsys, monkeypatch, kind):
    if kind == "file":
        out = tmp_path / "run"
        out.write_text("not a folder")
        want = "is a file, not a folder"
    else:
        out = Path("/sys/fastgrpo-test-output")  # sysfs refuses new entries, even to root
        want = "is not writable"
    _no_model_load(monkeypatch)
    assert main(["train", "--output_dir", str(out), "--max_steps", "1", *FAST]) == 2
    assert f"output_dir {str(out)!r} {want}" in _err_line(capsys)


def test_disk_full_during_a_save_stops_and_keeps_the_earlier_checkpoints(embedded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = torch.save
    calls = []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: some bytes land, then the disk is full
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    assert main(["train", "--output_dir", str(out), "--max_steps", "3", "--save_steps", "1", *FAST]) == 1
    line = _err_line(capsys)
    assert "saving checkpoint-2" in line and "No space left on device" in line
    assert f"the last checkpoint is {out / 'checkpoint-1'}" in line
    assert _names(out) == ["checkpoint-1"] and ckpt.checkpoint_problem(out / "checkpoint-1") is None
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial copy, no lock left
