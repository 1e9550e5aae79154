"""The update-step benchmark runs end to end on CPU, writes the shared outputs as rows land, keeps to
its time budget, and treats out-of-memory as a result."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
import torch
from fastgrpo.benchmarks import bench_train


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_writes_rows_for_both_packing_modes(tmp_path, capsys):
    assert bench_train.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = jsonl(tmp_path / "bench_train.jsonl")
    assert [(r["packing"], r["completion_length"]) for r in rows] == [
        ("on", 64),
        ("on", 160),
        ("off", 64),
        ("off", 160),
    ]
    for r in rows:
        assert r["kind"] == "length" and r["status"] == "ok" and r["tokens_per_s"] > 0 and r["steps"] == 2
        assert r["device"] and r["torch"] == torch.__version__ and r["git_commit"]
        assert (r["model"], r["G"], r["prompt_len"], r["use_peft"], r["offload"]) == ("tiny", 4, 16, False, False)
        assert r["trainable_parameters"] > 0 and r["peak_memory"] == "process peak RSS"
    with open(tmp_path / "bench_train.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and table[0]["git_commit"] == rows[0]["git_commit"] and table[0]["kind"] == "length"
    md = (tmp_path / "cpu-quick" / "bench_train_tiny.md").read_text()
    png = tmp_path / "cpu-quick" / "bench_train_tiny.png"
    assert png.is_file() and png.stat().st_size > 0
    out = capsys.readouterr().out
    assert "| on | length | 160 |" in out and "| off | length | 64 |" in out
    assert "| on | length | 160 |" in md and "peak RSS GiB" in md


def test_appending_twice_keeps_one_header_and_doubles_the_rows(tmp_path):
    argv = ["--quick", "--packing", "on", "--lengths", "32", "--no-plot", "--out", str(tmp_path)]
    bench_train.main(argv)
    bench_train.main(argv)
    lines = (tmp_path / "bench_train.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("kind,packing,completion_length,")
    assert sum(line.startswith("kind,") for line in lines) == 1
    assert len(jsonl(tmp_path / "bench_train.jsonl")) == 2
    assert (tmp_path / "cpu-quick" / "bench_train_tiny_packed.md").is_file()  # one mode: its own run file


def test_zero_time_budget_skips_every_length_and_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "build_model", lambda *a: pytest.fail("no model should be built"))
    bench_train.main(["--quick", "--find-max", "--time-budget", "0", "--out", str(tmp_path)])
    rows = jsonl(tmp_path / "bench_train.jsonl")
    assert [(r["packing"], r["kind"], r["completion_length"]) for r in rows] == [
        ("on", "length", 64), ("on", "length", 160), ("on", "find-max", None),
        ("off", "length", 64), ("off", "length", 160), ("off", "find-max", None),
    ]  # fmt: skip
    assert all(r["status"] == "skipped: time budget" for r in rows)
    assert (tmp_path / "cpu-quick" / "bench_train_tiny.md").is_file()
    assert not (tmp_path / "cpu-quick" / "bench_train_tiny.png").exists()  # nothing measured, nothing plotted


def test_time_budget_stops_before_a_step_predicted_to_overrun(tmp_path, monkeypatch):
    now = [0.0]
    real = bench_train.Updater.update

    def update(self, batch):  # every step "takes" 10 s of the benchmark's clock
        now[0] += 10.0
        return real(self, batch)

    monkeypatch.setattr(bench_train, "_clock", lambda: now[0])
    monkeypatch.setattr(bench_train.Updater, "update", update)
    argv = ["--quick", "--packing", "on", "--lengths", "32", "64", "--no-plot", "--out", str(tmp_path)]
    bench_train.main([*argv, "--time-budget", "50"])
    first, second = jsonl(tmp_path / "bench_train.jsonl")
    assert first["status"] == "ok" and first["step_s"] == 10.0
    # 20 s spent; two steps at ~1.5x the tokens predict > 40 s: the step would end past 50 s
    ratio = second["tokens"] / first["tokens"]
    assert second["status"] == "skipped: time budget" and second["predicted_s"] == pytest.approx(20 * ratio**2)


def test_find_max_bisects_to_the_longest_length_that_fits(monkeypatch, tmp_path):
    real = bench_train.Updater.update
    calls = Counter()

    def update(self, batch):  # "out of memory" past 200 completion tokens
        length = batch.rollouts.completion_ids.shape[1]
        calls[length] += 1
        if length > 200:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(bench_train.Updater, "update", update)
    argv = ["--quick", "--packing", "on", "--find-max", "--granularity", "16", "--no-plot", "--out", str(tmp_path)]
    bench_train.main(argv)
    rows = jsonl(tmp_path / "bench_train.jsonl")
    result = rows[-1]
    assert result["kind"] == "find-max" and result["status"] == "ok"
    assert result["completion_length"] == 192 and result["first_oom"] == 208  # the largest multiple of 16 <= 200
    probes = [(r["completion_length"], r["status"], r["steps"]) for r in rows if r["kind"] == "probe"]
    assert probes == [(208, "OOM", 1), (176, "ok", 1), (192, "ok", 1)]
    assert calls == {64: 2, 160: 2, 208: 1, 176: 1, 192: 1}  # one step per probe, the updater is warm


def test_use_peft_without_peft_is_a_clear_error_before_any_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_train, "peft_available", lambda: False)
    monkeypatch.setattr(bench_train, "build_model", lambda *a: pytest.fail("no model should be built"))
    with pytest.raises(SystemExit) as exc:
        bench_train.main(["--quick", "--use-peft", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--use-peft needs peft" in err and "pip install" in err
    assert not any(tmp_path.iterdir())


def test_other_errors_are_not_swallowed(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_train.Updater, "update", lambda self, batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bench_train.main(["--quick", "--packing", "on", "--out", str(tmp_path)])


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # restored after the test
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")
    assert bench_train.use_expandable_segments() == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    assert bench_train.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.6")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")
    assert bench_train.use_expandable_segments() == "PYTORCH_ALLOC_CONF=garbage_collection_threshold:0.6"
    assert bench_train.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == ""
