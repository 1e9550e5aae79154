"""The whole-step benchmark runs end to end on CPU: a row per trainer, the same imposed completion lengths
trained on by every trainer, a time split that covers the step, unavailable trainers and the time budget as
statuses. No timing is asserted beyond the split adding up to the wall time."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import time

import pytest
import torch
from fastgrpo.benchmarks import bench_step as bs

from fastgrpo.train.rollouts import Rollouts

pytest.importorskip("trl")


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_run_times_every_trainer_on_the_same_lengths(tmp_path, capsys):
    assert bs.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = jsonl(tmp_path / "bench_step.jsonl")
    assert [(r["trainer"], r["cap"]) for r in rows] == [(t, 48) for t in bs.TRAINERS]
    want = bs.imposed_lengths(2 * 4, 48, 0)
    ours, stock, dropin, vllm = rows
    for r in (ours, stock, dropin):
        assert r["status"] == "ok" and r["device"] and r["git_commit"] and "--quick" in r["args"]
        assert (r["prompts"], r["G"], r["sequences"], r["micro_batch"]) == (2, 4, 8, 4)
        # Every trainer generated, and trained on, exactly the imposed lengths of the measured step.
        assert r["imposed_tokens"] == r["real_tokens"] == sum(want) and r["lengths_digest"] == bs.digest(want)
        phases = [r[f"{p}_s"] for p in bs.PHASES]
        assert min(phases) >= 0 and r["sample_s"] > 0 and r["update_s"] > 0
        assert abs(r["other_s"]) <= 0.05 * r["wall_s"], r  # the split sums to the wall time within 5 %
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens"] / r["wall_s"])
        assert r["run_s"] > r["wall_s"] and r["peak_rss_extra_mib"] >= 0 and r.get("peak_gib") is None
    assert ours["backend"] == "hf" and stock["backend"] == dropin["backend"] == "transformers generate"
    assert dropin["loss"] == pytest.approx(stock["loss"], rel=1e-4, abs=1e-6)  # the drop-in's step is TRL's
    assert stock["tokens_per_s_vs_trl"] == 1.0 and stock["update_vs_trl"] == 1.0
    assert dropin["tokens_per_s_vs_trl"] == pytest.approx(dropin["tokens_per_s"] / stock["tokens_per_s"])
    assert ours["tokens_per_s_vs_trl"] is None  # written before trl's row landed; the table has it
    expected = "missing: vllm not installed" if importlib.util.find_spec("vllm") is None else "skipped: per-row"
    assert vllm["status"].startswith(expected) and vllm.get("wall_s") is None
    with open(tmp_path / "bench_step.csv", newline="") as f:
        assert [t["trainer"] for t in csv.DictReader(f)] == list(bs.TRAINERS)
    md = (tmp_path / "cpu-quick" / "bench_step_tiny.md").read_text()
    ours_line = next(line for line in md.splitlines() if line.startswith("| 48 | fastgrpo | ok |"))
    assert f"| {ours['tokens_per_s'] / stock['tokens_per_s']:.2f} |" in ours_line
    assert (tmp_path / "cpu-quick" / "bench_step_tiny.png").stat().st_size > 1000
    out = capsys.readouterr().out
    for text in (md, out):
        assert "| 48 | fastgrpo | ok | hf |" in text and "| 48 | trl | ok |" in text and "| 48 | vllm | " in text


class FakeModel:
    """``generate`` appends ``max_new_tokens`` copies of token 7, as if EOS were suppressed until then."""

    def __init__(self):
        self.calls = []

    def generate(self, input_ids, attention_mask, max_new_tokens, min_new_tokens, **kwargs):
        self.calls.append((max_new_tokens, min_new_tokens))
        return torch.cat([input_ids, torch.full((input_ids.shape[0], max_new_tokens), 7)], 1)


def test_generate_runs_to_the_longest_row_and_cuts_each_row_at_its_own_length():
    model = FakeModel()
    lengths = bs.Lengths({(5, 6): [2, 4], (9,): [6, 1]})
    bs.impose_on_generate(model, lengths, cap=6)
    ids = torch.tensor([[5, 6], [5, 6], [0, 9], [0, 9]])
    out = model.generate(input_ids=ids, attention_mask=ids != 0, max_new_tokens=6)
    assert model.calls == [(6, 6)]  # the longest imposed length, EOS suppressed until then
    assert out[:, 2:].tolist() == [
        [7, bs.EOS, 0, 0, 0, 0],  # 2 tokens, the last EOS
        [7, 7, 7, bs.EOS, 0, 0],
        [7, 7, 7, 7, 7, 7],  # at the cap: cut, no EOS (truncated)
        [bs.EOS, 0, 0, 0, 0, 0],
    ]
    assert lengths.got == {(5, 6): [2, 4], (9,): [6, 1]}
    with pytest.raises(RuntimeError, match="more than G times"):
        model.generate(input_ids=ids[:1], attention_mask=ids[:1] != 0, max_new_tokens=6)


def test_rows_stopped_below_the_cap_end_with_eos():
    ids = torch.tensor([[4, 5, 0], [4, 5, 6], [4, 0, 0]])
    mask = ids != 0
    ro = Rollouts(ids, mask, ids, mask, torch.tensor([True, True, True]))
    fixed = bs.end_with_eos(ro, cap=3)
    assert fixed.completion_ids.tolist() == [[4, bs.EOS, 0], [4, 5, 6], [bs.EOS, 0, 0]]
    assert fixed.truncated.tolist() == [False, True, False] and ro.truncated.all()  # the input is left as it was


def test_unavailable_trainers_and_zero_budget_build_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "make_setup", lambda *a: pytest.fail("nothing should be built"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    bs.main(["--quick", "--trainers", "trl", "trl+fastgrpo", "--out", str(tmp_path)])
    bs.main(["--quick", "--trainers", "fastgrpo", "--time-budget", "0", "--out", str(tmp_path)])
    rows = jsonl(tmp_path / "bench_step.jsonl")
    missing = "missing: trl not installed (pip install 'fastgrpo[trl]')"
    assert [r["status"] for r in rows] == [missing, missing, bs.SKIPPED]


def test_sigterm_lands_the_run_in_progress_as_a_cut_row_and_ends_the_run(tmp_path, monkeypatch):
    # gpu_run.sh's `timeout` sends SIGTERM at a stage's hard limit: what ran still lands, with the tables.
    monkeypatch.setattr(bs, "make_setup", lambda *a: object())
    ran = []

    def run_one(trainer, setup):
        ran.append(trainer)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises in here
        pytest.fail("SIGTERM did not interrupt the run")

    monkeypatch.setattr(bs, "run_one", run_one)
    before = signal.getsignal(signal.SIGTERM)
    rc = bs.main(["--quick", "--caps", "32", "48", "--trainers", "trl", "fastgrpo", "--out", str(tmp_path)])
    assert rc == 128 + signal.SIGTERM and ran == ["trl"]  # nothing ran after the cut, no other cap either
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the bench's only while it runs
    (row,) = jsonl(tmp_path / "bench_step.jsonl")
    assert (row["cap"], row["trainer"]) == (32, "trl") and row["status"].startswith("cut: stopped after ")
    assert "| 32 | trl | cut: stopped after " in (tmp_path / "cpu-quick" / "bench_step_tiny.md").read_text()


def test_budget_scales_the_nearest_smaller_cap():
    budget = bs.Budget(None)
    assert budget.predict("trl", 1024) is None
    budget.record("trl", 1024, 10.0)
    assert budget.predict("trl", 4096) == pytest.approx(10.0 * 4**1.25) and budget.predict("fastgrpo", 4096) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--trainers", "trl", "trl"], "each trainer once"), (["--micro-batch", "3"], "must divide")],
)
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        bs.parse_args(["--quick", *argv])
    assert message in capsys.readouterr().err
