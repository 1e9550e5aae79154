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


# ----------------------------------------------------------------------------- the plan and the TRL contrast


def test_quick_trl_contrast_writes_both_trainers_rows_with_the_plan_per_length(tmp_path, capsys):
    assert bench_train.main(["--quick", "--trl-contrast", "--no-plot", "--out", str(tmp_path)]) == 0
    rows = jsonl(tmp_path / "bench_train.jsonl")
    assert [(r["trainer"], r["packing"], r["completion_length"]) for r in rows] == [
        ("fastgrpo", "on", 64), ("fastgrpo", "on", 160), ("fastgrpo", "off", 64), ("fastgrpo", "off", 160),
        ("trl", "off", 64), ("trl", "off", 160),
    ]  # fmt: skip
    for r in rows:
        assert r["kind"] == "length" and r["status"] == "ok" and r["steps"] == 2 and r["tokens_per_s"] > 0
        assert r["peak_gib"] > 0 and r["micro_batches"] == 2 and r["plan_vs_measured"] is None  # CPU: RSS
    fast, trl = rows[:4], rows[4:]
    assert all(r["plan_peak_gb"] > 0 and r["plan_update_gb"] > 0 for r in fast)
    assert fast[1]["plan_update_gb"] > fast[0]["plan_update_gb"]  # the plan of each row's own length
    assert all(r.get("plan_peak_gb") is None for r in trl)  # the plan models fastgrpo's update, not TRL's
    assert trl[0]["tokens"] == fast[0]["tokens"] and trl[0]["trainable_parameters"] == fast[0]["trainable_parameters"]
    with open(tmp_path / "bench_train.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["trainer"] for r in table] == ["fastgrpo"] * 4 + ["trl"] * 2 and table[0]["plan_peak_gb"]
    out = capsys.readouterr().out
    assert "| trl | off | length | 160 |" in out and "plan GiB" in out and "plan/measured" in out


def trl_step_oom_above(monkeypatch, limit: int) -> Counter:
    """TRL's update step runs out of memory past ``limit`` completion tokens; counts the steps per length."""
    real, calls = bench_train.TRLRun.step, Counter()

    def step(self, batch):
        length = batch.rollouts.completion_ids.shape[1]
        calls[length] += 1
        if length > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(bench_train.TRLRun, "step", step)
    return calls


def test_out_of_memory_in_the_trl_step_is_its_rows_status(monkeypatch, tmp_path):
    trl_step_oom_above(monkeypatch, 100)
    argv = ["--quick", "--packing", "on", "--trl-contrast", "--no-plot", "--out", str(tmp_path)]
    assert bench_train.main(argv) == 0
    rows = jsonl(tmp_path / "bench_train.jsonl")
    assert [(r["trainer"], r["completion_length"], r["status"]) for r in rows] == [
        ("fastgrpo", 64, "ok"), ("fastgrpo", 160, "ok"), ("trl", 64, "ok"), ("trl", 160, "OOM"),
    ]  # fmt: skip
    assert rows[-1].get("peak_gib") is None and rows[-1]["steps"] == 2


def test_trl_find_max_is_the_shared_search(monkeypatch, tmp_path):
    calls = trl_step_oom_above(monkeypatch, 200)
    searched, real_find_max = [], bench_train.find_max

    def find_max(run, length_rows, emit):
        searched.append(run.trainer)
        return real_find_max(run, length_rows, emit)

    monkeypatch.setattr(bench_train, "find_max", find_max)
    monkeypatch.setattr(bench_train.Updater, "update", lambda self, batch: {"micro_batches": 2.0})  # fastgrpo: cheap
    argv = ["--quick", "--packing", "on", "--find-max", "--granularity", "16", "--trl-contrast", "--no-plot"]
    bench_train.main([*argv, "--out", str(tmp_path)])
    assert searched == ["fastgrpo", "trl"]
    rows = [r for r in jsonl(tmp_path / "bench_train.jsonl") if r["trainer"] == "trl"]
    result = rows[-1]
    assert result["kind"] == "find-max" and result["status"] == "ok" and result["packing"] == "off"
    assert result["completion_length"] == 192 and result["first_oom"] == 208
    probes = [(r["completion_length"], r["status"], r["steps"]) for r in rows if r["kind"] == "probe"]
    assert probes == [(208, "OOM", 1), (176, "ok", 1), (192, "ok", 1)]  # as fastgrpo's search probes
    assert calls == {64: 2, 160: 2, 208: 1, 176: 1, 192: 1}  # TRL's trainer stays warm across lengths


def test_without_trl_its_rows_say_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_train, "trl_available", lambda: False)
    monkeypatch.setattr(bench_train, "TRLRun", lambda *a: pytest.fail("no TRL trainer should be built"))
    argv = ["--quick", "--packing", "on", "--lengths", "32", "--find-max", "--trl-contrast", "--no-plot"]
    monkeypatch.setattr(bench_train, "find_max", lambda run, rows, emit: dict(trainer=run.trainer, kind="find-max",
                        packing=run.mode, completion_length=None, status="ok"))  # fmt: skip
    assert bench_train.main([*argv, "--out", str(tmp_path)]) == 0
    trl = [(r["kind"], r["status"]) for r in jsonl(tmp_path / "bench_train.jsonl") if r["trainer"] == "trl"]
    missing = "missing: trl not installed (pip install 'fastgrpo[trl]')"
    assert trl == [("length", missing), ("find-max", missing)]
    err = capsys.readouterr().err
    assert f"trl contrast: {missing}" in err and "Traceback" not in err


def test_zero_time_budget_builds_no_trl_trainer(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_train, "build_model", lambda *a: pytest.fail("no model should be built"))
    bench_train.main(["--quick", "--trl-contrast", "--time-budget", "0", "--no-plot", "--out", str(tmp_path)])
    trl = [r for r in jsonl(tmp_path / "bench_train.jsonl") if r["trainer"] == "trl"]
    assert [(r["completion_length"], r["status"]) for r in trl] == [
        (64, "skipped: time budget"),
        (160, "skipped: time budget"),
    ]


def test_trl_contrast_needs_whole_groups_per_generation_batch(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_train.main(["--quick", "--trl-contrast", "--G", "4", "--rows", "3", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "multiple of --rows" in capsys.readouterr().err


def test_an_older_csv_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    new = ["trainer", "plan_peak_gb", "plan_update_gb", "plan_vs_measured"]
    before = [k for k in bench_train.CSV_FIELDS if k not in new]  # the columns before the plan and the contrast
    old_row = ["x"] * len(before)
    (tmp_path / "bench_train.csv").write_text(",".join(before) + "\n" + ",".join(old_row) + "\n")
    bench_train.main(["--quick", "--time-budget", "0", "--no-plot", "--out", str(tmp_path)])
    with open(tmp_path / "bench_train.csv", newline="") as f:
        table = list(csv.reader(f))
    header = table[0]
    assert header[: len(before)] == before and set(new) <= set(header)  # widened at its end
    assert table[1] == old_row + [""] * (len(header) - len(before))  # the old row kept, its new cells empty
    added = [dict(zip(header, r, strict=True)) for r in table[2:]]
    assert added and all(r["trainer"] == "fastgrpo" for r in added)  # this run's rows fill the new columns


@pytest.mark.parametrize("extra", [[], ["--use-peft", "--beta", "0.5"]], ids=["full", "lora-kl"])
def test_trl_step_computes_fastgrpos_gradient_on_the_same_rollouts(extra):
    """The TRL inputs are right: stock TRL's accumulated gradient equals fastgrpo's Updater's (fp32, same weights)."""
    from trl.trainer.utils import split_tensor_dict

    args = bench_train.parse_args(["--quick", "--trl-contrast", "--lengths", "48", *extra])
    cpu, budget = torch.device("cpu"), bench_train.Budget(None)
    ours, trl = bench_train.ModeRun(args, cpu, torch.float32, False, budget), None
    try:
        trl = bench_train.TRLRun(args, cpu, torch.float32, budget)
        assert trl.trl.model.is_gradient_checkpointing  # TRL's default, turned on as Trainer.train() would
        for model in (ours.model, trl.trl.model):
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0  # LoRA dropout draws differ between the two models
        torch.manual_seed(1)  # the same weights; non-zero LoRA B, so the policy is not the reference
        state = {k: torch.randn_like(v) * 0.05 if "lora_B" in k else v for k, v in ours.model.state_dict().items()}
        ours.model.load_state_dict(state)
        trl.trl.model.load_state_dict(state)
        batch = bench_train.synthetic_batch(args.G, args.prompt_len, 48, ours.vocab, cpu, args.seed)

        micro = ours.updater.micro_batches(batch)
        ref = [ours.updater.ref_logprobs(m.rollouts) for m in micro] if args.beta else None
        ours.updater.accumulate_gradients(batch, micro, None, ref)
        t = trl.trl
        inputs = bench_train.trl_inputs(batch)
        if args.beta:
            inputs["ref_per_token_logps"] = trl.ref_logps(inputs)
        chunks = split_tensor_dict(inputs, t.args.gradient_accumulation_steps)
        t.current_gradient_accumulation_steps = len(chunks)
        for mb in chunks:
            t.training_step(t.model, mb, None)

        theirs = dict(t.model.named_parameters())
        trained = [(n, p) for n, p in ours.model.named_parameters() if p.requires_grad]
        assert trained and all(theirs[n].grad is not None for n, _ in trained)
        for name, p in trained:
            torch.testing.assert_close(theirs[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        ours.close()
        if trl is not None:
            trl.close()
