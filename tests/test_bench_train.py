"""The update-step benchmark runs end to end on CPU, and treats out-of-memory as a result."""

from __future__ import annotations

import json
import pytest
import torch

from fastgrpo.benchmarks import bench_train


def test_quick_run_writes_rows_for_both_packing_modes(tmp_path, capsys):
    bench_train.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_train_tiny.json").read_text())
    assert data["metadata"]["git_commit"] and data["metadata"]["torch"] == torch.__version__
    assert [r["packed"] for r in data["results"]] == [True, False]
    for res in data["results"]:
        assert [r["completion_length"] for r in res["rows"]] == [64, 160]
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in res["rows"])
        assert res["info"]["trainable_parameters"] > 0
    assert "| on | 160 |" in capsys.readouterr().out


def test_find_max_bisects_to_the_longest_length_that_fits(monkeypatch, tmp_path):
    real = bench_train.Updater.update

    def update(self, batch):  # "out of memory" past 200 completion tokens
        if batch.rollouts.completion_ids.shape[1] > 200:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(bench_train.Updater, "update", update)
    bench_train.main(["--quick", "--packing", "on", "--find-max", "--granularity", "16", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_train_tiny.json").read_text())["results"][0]
    assert res["max_completion_length"] == 192  # the largest multiple of 16 <= 200


def test_other_errors_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(bench_train.Updater, "update", lambda self, batch: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bench_train.main(["--quick", "--packing", "on"])
