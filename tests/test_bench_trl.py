"""The TRL drop-in benchmark runs end to end on CPU: one row with both trainers' numbers, the shared
outputs, and out-of-memory as a trainer's status. No timing is asserted."""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("trl")
import trl  # noqa: E402
from fastgrpo.benchmarks import bench_trl  # noqa: E402

from fastgrpo import cli  # noqa: E402


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_writes_one_row_comparing_both_trainers(tmp_path, capsys):
    assert bench_trl.main(["--quick", "--out", str(tmp_path)]) == 0
    (row,) = jsonl(tmp_path / "bench_trl.jsonl")
    assert row["device"] and row["torch"] == torch.__version__ and row["git_commit"] and row["trl"] == trl.__version__
    assert row["command"] and "--quick" in row["args"] and row["quick"] is True and row["dtype"] == "float32"
    assert (row["model"], row["G"], row["prompt_len"], row["completion_length"]) == ("tiny", 4, 8, 32)
    assert row["loss_tokens"] == 4 * 32  # EOS suppressed: every completion is full length
    assert row["ours_route"] == "torch" and row["parameters"] > 0
    assert "loss_bwd_s" in row["timed"] and "TorchDispatchMode" in row["peak_memory"]
    for t in bench_trl.TRAINERS:
        assert row[f"{t}_status"] == "ok"
        assert row[f"{t}_loss_bwd_s"] > 0 and row[f"{t}_generate_s"] > 0 and row[f"{t}_peak_extra_mib"] > 0
        assert row[f"{t}_prepare_s"] + row[f"{t}_loss_bwd_s"] == pytest.approx(row[f"{t}_step_s"])
        assert 0 < row[f"{t}_generate_share"] < 1 and row[f"{t}_peak_gib"] is None  # no allocator stats on CPU
    for k in ("loss_bwd_s", "peak_extra_mib", "step_s"):
        assert row[f"{k}_ratio"] == pytest.approx(row[f"ours_{k}"] / row[f"stock_{k}"])
    # Same weights, seed and completions in fp32: the drop-in computes the same step.
    assert row["ours_grad_norm"] == pytest.approx(row["stock_grad_norm"], rel=1e-4)
    assert row["ours_loss"] == pytest.approx(row["stock_loss"], abs=1e-6)
    with open(tmp_path / "bench_trl.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert line["git_commit"] == row["git_commit"] and line["stock_status"] == line["ours_status"] == "ok"
    md = (tmp_path / "cpu-quick" / "bench_trl_tiny.md").read_text()
    out = capsys.readouterr().out
    for text in (md, out):
        assert "| stock | ok |" in text and "| ours | ok |" in text and "| ours / stock |" in text


def test_out_of_memory_is_the_trainers_status(tmp_path, monkeypatch):
    def oom(self, model, inputs):  # ours overrides _compute_loss: only stock runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(trl.GRPOTrainer, "_compute_loss", oom)
    bench_trl.main(["--quick", "--steps", "1", "--out", str(tmp_path)])
    (row,) = jsonl(tmp_path / "bench_trl.jsonl")
    assert row["stock_status"] == "OOM" and row["ours_status"] == "ok" and row["steps"] == 1
    assert row["loss_bwd_s_ratio"] is None and row["ours_loss_bwd_s"] > 0


def test_live_tensor_bytes_counts_allocations_until_freed_and_skips_views():
    x = torch.zeros(256, 1024)  # 1 MiB, allocated before the tracker: never counted
    with bench_trl.LiveTensorBytes() as mem:
        y = x + 1  # 1 MiB
        z = y.t()[:10]  # a view: nothing allocated
        y.add_(1)  # in place: nothing allocated
        del y, z
        w = torch.empty(512, 1024)  # 2 MiB, after y died
        assert mem.live == 2**21
    assert mem.peak == 2**21
    del w
    assert mem.live == 0


def test_cli_lists_and_dispatches_trl_dropin(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "trl-dropin" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "trl-dropin", "--help"])
    assert exc.value.code == 0 and "fastgrpo bench trl-dropin" in capsys.readouterr().out
