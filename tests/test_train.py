"""End-to-end tests of ``fastgrpo train`` on the embedded task (tiny Qwen2, CPU)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train import checkpoint as ckpt
from fastgrpo.train.policy import completion_logprobs
from fastgrpo.train.tracking import read_metrics
from fastgrpo.train.trainer import GRPOTrainer, NonFiniteLossError

from helpers import train_config

# Small steps: 2 prompts x 8 completions, two micro-batches.
FAST = [
    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
    "--disable_tqdm", "true", "--max_resample_rounds", "1",
]  # fmt: skip
REQUIRED_METRICS = {
    "step", "reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "loss", "entropy",
    "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
    "num_tokens", "tokens_per_second", "step_time", "peak_memory_gb", "grad_norm", "learning_rate",
    "time/sample", "time/score", "time/logprobs", "time/update", "time/sync",
}  # fmt: skip
PHASES = ("time/sample", "time/score", "time/logprobs", "time/update", "time/sync")


def _config(embedded, out, **values):
    return train_config(embedded, out, **values)


def test_embedded_default_writes_every_output(embedded, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2", "--logging_steps", "2"]
    assert main([*argv, *FAST]) == 0
    printed = capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row.keys() >= REQUIRED_METRICS, REQUIRED_METRICS - row.keys()
        assert 0.0 <= row["reward"] <= 2.0 and row["tokens_per_second"] > 0 and row["peak_memory_gb"] > 0
    assert rows[-1]["num_tokens"] > rows[0]["num_tokens"]
    for row in rows:  # the phases are disjoint and cover the step: what is left is bookkeeping
        phases = sum(row[k] for k in PHASES)
        assert min(row[k] for k in PHASES) >= 0 and 0.8 * row["step_time"] < phases <= row["step_time"], row
    assert (out / "reward.png").stat().st_size > 1000
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    saved = out / "checkpoint-3"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", ckpt.STATE_FILE):
        assert (saved / name).is_file(), name
    assert "reward" in (out / "config.yaml").read_text()
    # Where the outputs go, at start and at the end; a metrics line every logging_steps steps and at the last.
    assert f"output folder: {out.resolve()}\n" in printed
    assert f"outputs in {out.resolve()}: metrics.jsonl, reward.png, checkpoint-3 (the last of 2 kept;" in printed
    logged = [line for line in printed.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in logged] == ["2/3", "3/3"]
    want = f"  reward {rows[1]['reward']:.3f}  loss {rows[1]['loss']:.4f}  entropy {rows[1]['entropy']:.3f}  length "
    assert want in logged[0] and "tokens/s" in logged[0]
    assert "3 steps in " in printed and "(first step)" in printed and "warning" not in printed


def test_a_reward_that_never_varies_is_warned_about_once(embedded, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", embedded[0], "--dataset", embedded[1], "--output_dir", str(out), *FAST]
    argv += ["--reward_funcs", "reward_fixtures:constant", "--max_steps", "6", "--logging_steps", "100"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(r["frac_reward_zero_std"] == 1.0 and r["grad_norm"] == 0.0 for r in read_metrics(out))
    warning = "warning: steps 1-5: most groups had the same reward for every completion"
    assert printed.count(warning) == 1 and printed.count("most groups had the same reward") == 2
    summary = next(line for line in printed.splitlines() if line.startswith("6 steps in "))
    assert "; steps 1-6: most groups had the same reward" in summary  # the summary says it again


def test_resume_matches_uninterrupted_run(embedded, tmp_path):
    full = _config(embedded, tmp_path / "full", max_steps=4, save_steps=2, save_total_limit=None)
    rows = GRPOTrainer(full).train()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    again = _config(embedded, resumed_dir, max_steps=4, resume_from_checkpoint="latest")
    trainer = GRPOTrainer(again)
    assert trainer.step == 2
    rest = trainer.train()
    assert [r["step"] for r in rest] == [3, 4]
    for a, b in zip(rows[2:], rest, strict=True):
        for key in ("reward", "loss", "entropy", "completions/mean_length", "grad_norm", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_policy_logprobs_match_full_logits(embedded, tmp_path):
    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=1, temperature=0.7))
    batch = trainer.sample_batch().rollouts
    logp = completion_logprobs(trainer.model, batch, 0.7, "torch")
    for i in range(len(batch)):  # reference: each row alone, unpadded, through the full model
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
        completion = batch.completion_ids[i][batch.completion_mask[i]]
        with torch.no_grad():
            logits = trainer.model(torch.cat([prompt, completion])[None]).logits[0].double()
        want = torch.log_softmax(logits[len(prompt) - 1 : -1] / 0.7, -1).gather(-1, completion[:, None])[:, 0]
        torch.testing.assert_close(logp[i][batch.completion_mask[i]].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_micro_batches_sum_to_the_whole_batch_gradient(embedded, tmp_path, loss_type):
    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=1, loss_type=loss_type))
    batch = trainer.sample_batch()
    grads = []
    for size in (16, 4, 6):  # one micro-batch of 16; four of 4; then 6 + 6 + 4 (uneven)
        trainer.updater.settings = dataclasses.replace(trainer.updater.settings, micro_batch_rows=size)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.updater.accumulate_gradients(batch)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_update_never_builds_full_logits(embedded, tmp_path):
    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=1, beta=0.04, num_iterations=2))
    widths = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: widths.append(inp[0].shape[1]))
    try:
        rows = trainer.train()
    finally:
        hook.remove()
    assert max(widths) == 1  # only generation's last-position logits ever go through the lm_head
    assert rows[0]["kl"] is not None and rows[0]["kl"] >= 0


def test_custom_rewards_with_none_and_process_steps(embedded, tmp_path):
    cfg = _config(
        embedded,
        tmp_path,
        max_steps=2,
        reward_funcs=["reward_fixtures:none_for_odd_rows", "reward_fixtures:answer_digit_steps", "accuracy"],
        reward_weights=[1.0, 0.5, 1.0],
        scale_rewards="batch",
    )
    trainer = GRPOTrainer(cfg)
    batch = trainer.sample_batch()
    assert batch.advantages.shape == batch.loss_mask.shape  # process rewards make them per token
    rows = trainer.train()
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_non_finite_loss_stops_with_a_checkpoint(embedded, tmp_path, monkeypatch):
    import fastgrpo.train.update as T

    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=3))
    real = T.policy_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if trainer.step == 1 else out

    monkeypatch.setattr(T, "policy_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt_column", "question"], "no prompt_column 'question'; its columns are"),
        (["--reward_funcs", "no_such_module:f"], "no_such_module:f"),
        (["--reward_funcs", "reward_fixtures:missing"], "reward_fixtures:missing"),
        (["--reward_funcs", "reward_fixtures:wrong_count"], "wrong_count"),
        (["--reward_funcs", "reward_fixtures:raises"], "raises"),
        (["--beta", "-0.1"], "beta must be >= 0"),
        (["--unknown_flag", "1"], None),
    ],
)
def test_bad_input_gives_one_clear_error(embedded, tmp_path, capsys, args, message):
    model, data = embedded
    base = ["train", "--model", model, "--dataset", data, "--output_dir", str(tmp_path), "--max_steps", "1", *FAST]
    if message is None:  # argparse itself rejects unknown flags
        with pytest.raises(SystemExit):
            main(base + args)
        assert "unrecognized arguments: --unknown_flag" in capsys.readouterr().err
        return
    try:
        code = main(base + args)
    except RuntimeError as e:  # a reward function failing mid-run names itself
        assert message in str(e)
        return
    assert code == 2
    assert message in capsys.readouterr().err


def test_yaml_config_and_saved_resolved_config(embedded, tmp_path):
    model, data = embedded
    (tmp_path / "c.yaml").write_text(
        json.dumps({"model": {"model": model}, "data": {"dataset": data}, "train": {"max_steps": 1}})
    )
    out = tmp_path / "o"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output_dir", str(out), *FAST]) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 1 and saved["model"]["model"] == model
    assert saved["generation"]["num_generations"] == 8  # the library default; no embedded preset with a model


def test_embedded_default_learns(embedded, tmp_path):
    """The full default run (100 steps): mean reward of the last 10% of steps >= 0.3 above the first 10%."""
    assert main(["train", "--output_dir", str(tmp_path), "--disable_tqdm", "true", "--plot", "false"]) == 0
    rows = read_metrics(tmp_path)
    assert len(rows) == 100
    first = sum(r["reward"] for r in rows[:10]) / 10
    last = sum(r["reward"] for r in rows[-10:]) / 10
    assert last - first >= 0.3, (first, last)


def test_all_truncated_batch_trains_with_zero_loss(embedded, tmp_path):
    rows = GRPOTrainer(_config(embedded, tmp_path, max_steps=1, max_completion_length=2)).train()
    assert rows[0]["completions/clipped_ratio"] == 1.0 and rows[0]["loss"] == 0.0


def test_process_only_rewards_keep_groups_whose_steps_differ(embedded, tmp_path):
    cfg = _config(
        embedded, tmp_path, max_steps=1, reward_funcs=["reward_fixtures:answer_digit_steps"], reward_weights=None
    )
    row = GRPOTrainer(cfg).train()[0]
    assert row["frac_reward_zero_std"] < 1.0 and row["dynamic_sampling/kept_groups"] > 0


def test_output_dir_with_checkpoints_needs_resume_or_overwrite(embedded, tmp_path):
    GRPOTrainer(_config(embedded, tmp_path, max_steps=1, overwrite_output_dir=False)).train()
    with pytest.raises(ValueError, match=r"holds an earlier run \(1 checkpoint, metrics.jsonl \(1 rows\)\)"):
        GRPOTrainer(_config(embedded, tmp_path, max_steps=1, overwrite_output_dir=False))
    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=1, overwrite_output_dir=True))
    assert trainer.step == 0 and ckpt.list_checkpoints(tmp_path) == []


def test_non_finite_gradient_stops_before_the_optimizer_step(embedded, tmp_path, monkeypatch):
    trainer = GRPOTrainer(_config(embedded, tmp_path, max_steps=2))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 1"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0"]


def test_conversational_prompts_get_message_completions(embedded, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"{a}+{a}"}], "answer": str(2 * a)} for a in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    cfg = _config(embedded, tmp_path / "o", max_steps=1, dataset=str(path), prompt_column="messages")
    trainer = GRPOTrainer(cfg)
    name, fn = trainer.scorer.funcs[0]
    trainer.scorer.funcs[0] = (
        name,
        lambda prompts, completions, **kw: seen.append(completions[0]) or fn(prompts, completions, **kw),
    )
    assert trainer.train()[0]["rewards/format/mean"] >= 0
    assert isinstance(seen[-1], list) and seen[-1][0]["role"] == "assistant"


def test_overwrite_keeps_earlier_checkpoints_when_the_model_fails_to_load(embedded, tmp_path):
    earlier = tmp_path / "checkpoint-5"
    earlier.mkdir()
    (earlier / ckpt.STATE_FILE).write_bytes(b"")
    cfg = train_config(embedded, tmp_path, overwrite_output_dir=True, model=str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="does not exist"):
        GRPOTrainer(cfg)
    assert ckpt.list_checkpoints(tmp_path) == [earlier]
