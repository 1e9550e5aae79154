"""The sampling-backend benchmark runs end to end on CPU: one row per backend, real completion tokens
counted from lengths imposed identically on every backend, unavailable backends and out-of-memory as
statuses, and the time budget. No timing is asserted."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from fastgrpo.benchmarks import bench_generate as bg

from fastgrpo import cli
from fastgrpo.train.sampling.hf import HFGenerator


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_writes_one_row_per_backend_counting_real_tokens(tmp_path, capsys):
    assert bg.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = jsonl(tmp_path / "bench_generate.jsonl")
    assert [(r["backend"], r["cap"]) for r in rows] == [("hf", 64), ("continuous", 64), ("graph", 64), ("vllm", 64)]
    want = bg.imposed_lengths(2 * 8, 64, 0)
    groups = [want[:8], want[8:]]
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["git_commit"] and "--quick" in r["args"]
        assert (r["model"], r["prompts"], r["G"], r["in_flight"], r["sequences"]) == ("tiny", 2, 8, 8, 16)
        assert r["lengths"] == want and r["lengths_digest"] == bg.digest(want)  # the same draw for every backend
        assert r["real_tokens"] == sum(want) and r["max_length"] == max(want)
    hf, cont, graph, vllm = rows
    # hf: one call per 8 rows (one group), each computed to the group's longest; only real tokens count.
    assert hf["status"] == "ok" and hf["calls"] == 2
    assert hf["computed_tokens"] == 8 * (max(groups[0]) + max(groups[1])) > hf["real_tokens"]
    assert hf["padding_waste"] == pytest.approx(hf["computed_tokens"] / sum(want))
    assert hf["tokens_per_s"] == pytest.approx(sum(want) / hf["wall_s"]) and hf["tokens_per_s_vs_hf"] == 1.0
    # continuous: every request stopped at its own imposed length (checked per prompt inside the run).
    assert cont["status"] == "ok" and cont["computed_tokens"] == sum(want) and cont["padding_waste"] == 1.0
    assert cont["tokens_per_s_vs_hf"] == pytest.approx(cont["tokens_per_s"] / hf["tokens_per_s"])
    # graph: every row in one call, stopped at its imposed length; it computes finished rows until the batch
    # halves (it looks every 16 steps), so at least the real tokens.
    assert graph["status"] == "ok" and graph["calls"] == 1 and graph["computed_tokens"] >= sum(want)
    assert graph["computed_tokens"] <= 16 * max(want)
    for r in (hf, cont, graph):
        assert r["peak_gib"] is None and r["peak_extra_mib"] >= 0 and "RSS" in r["peak_memory"]
        assert 0 < r["first_token_s"] < r["wall_s"]  # the first logits come before the call ends
    assert vllm["status"] in ("missing: vllm not installed", "skipped: needs CUDA") and vllm.get("wall_s") is None
    with open(tmp_path / "bench_generate.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["backend"] for t in table] == ["hf", "continuous", "graph", "vllm"] and "lengths" not in table[0]
    md = (tmp_path / "cpu-quick" / "bench_generate_tiny.md").read_text()
    out = capsys.readouterr().out
    for text in (md, out):
        assert "| 64 | hf | ok |" in text and "| 64 | continuous | ok |" in text and "| 64 | vllm | " in text
        assert "| 64 | graph | ok |" in text


def test_first_logits_is_the_heads_first_output_and_unhooks(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(bg, "_clock", lambda: now[0])
    head = torch.nn.Linear(3, 5)
    with bg.FirstLogits(head) as first:
        assert first.at is None
        now[0] = 12.5
        head(torch.zeros(2, 3))
        now[0] = 20.0
        head(torch.zeros(2, 3))  # later calls do not move it
    assert first.at == 12.5 and not head._forward_hooks
    with bg.FirstLogits(None) as nothing:  # vllm: its own copy of the model, not measured
        pass
    assert nothing.at is None
    _, wall, _, _, ttft = bg.measured(lambda: head(torch.zeros(1, 3)), torch.device("cpu"), head)
    assert ttft == 0.0 and wall == 0.0 and not head._forward_hooks


def test_imposed_lengths_are_seeded_long_tailed_and_clipped():
    a = bg.imposed_lengths(4000, 1024, 0)
    assert a == bg.imposed_lengths(4000, 1024, 0) and a != bg.imposed_lengths(4000, 1024, 1)
    assert bg.imposed_lengths(16, 1024, 0) == a[:16]  # n does not change the first draws
    assert min(a) == 1024 // 32 and max(a) == 1024
    t = torch.tensor(a, dtype=torch.float64)
    assert float(t.median()) == pytest.approx(1024 / 6, rel=0.1)  # median 1/6 cap, mean well above it
    assert 0.22 < float(t.mean()) / 1024 < 0.30 and 0.02 < float((t == 1024).double().mean()) < 0.06
    assert 1.5 < bg.expected_waste(8, 8, 1024, 1 / 6, 1.0) < 4.0


def test_out_of_memory_is_the_backends_status(tmp_path, monkeypatch):
    def oom(self, prompts, params):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(HFGenerator, "generate", oom)
    bg.main(["--quick", "--backends", "hf", "continuous", "--out", str(tmp_path)])
    hf, cont = jsonl(tmp_path / "bench_generate.jsonl")
    assert hf["status"] == "OOM" and hf.get("wall_s") is None
    assert cont["status"] == "ok" and cont["tokens_per_s_vs_hf"] is None  # no hf figure to compare with


def test_missing_backend_and_zero_time_budget_build_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(bg, "build_model", lambda *a: pytest.fail("no model should be built"))
    monkeypatch.setitem(sys.modules, "fastgrpo.train.sampling.continuous", None)  # import fails
    bg.main(["--quick", "--caps", "32", "64", "--time-budget", "0", "--out", str(tmp_path)])
    rows = jsonl(tmp_path / "bench_generate.jsonl")
    assert [(r["cap"], r["backend"]) for r in rows] == [(c, b) for c in (32, 64) for b in bg.BACKENDS]
    for r in rows:
        if r["backend"] == "hf":
            assert r["status"] == "skipped: time budget"
        elif r["backend"] == "continuous":
            assert r["status"].startswith("missing: fastgrpo.train.sampling.continuous")
        else:
            assert r["status"].startswith(("missing:", "skipped:"))
    assert (tmp_path / "cpu-quick" / "bench_generate_tiny.md").is_file()


def test_time_budget_skips_a_cap_predicted_to_overrun(tmp_path, monkeypatch):
    now = [0.0]
    real = HFGenerator.generate

    def generate(self, prompts, params):  # every hf call "takes" 10 s of the benchmark's clock
        now[0] += 10.0
        return real(self, prompts, params)

    monkeypatch.setattr(bg, "_clock", lambda: now[0])
    monkeypatch.setattr(HFGenerator, "generate", generate)
    bg.main(["--quick", "--backends", "hf", "--caps", "16", "64", "--time-budget", "45", "--out", str(tmp_path)])
    first, second = jsonl(tmp_path / "bench_generate.jsonl")
    assert first["status"] == "ok" and first["wall_s"] == 20.0  # two calls; the warm-up call came before
    assert second["status"] == "skipped: time budget" and second["predicted_s"] > 20.0


def test_budget_prediction_scales_the_nearest_smaller_cap():
    budget = bg.Budget(None)
    assert budget.predict("hf", 1024, 1000) is None
    budget.record("hf", 1024, 1000, 2.0)
    assert budget.predict("hf", 4096, 4000) == pytest.approx(2.0 * 4 * 4**0.25)
    assert budget.predict("continuous", 4096, 4000) is None and budget.allows(1e9)


def test_cli_lists_and_dispatches_generate(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "generate" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "generate", "--help"])
    assert exc.value.code == 0 and "fastgrpo bench generate" in capsys.readouterr().out
