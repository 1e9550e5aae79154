"""Flags honoured or refused (issue 15): a LoRA adapter on the output layer, a resume whose checkpoint
kind disagrees with ``use_peft``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from fastgrpo.cli import main
from fastgrpo.train.config import Config, build_config

FIXTURES = Path(__file__).parent / "fixtures" / "old_checkpoints"


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["model.lm_head"]])
def test_lora_on_the_lm_head_is_refused_by_the_config(targets):
    with pytest.raises(ValueError, match="lora_target_modules must not include lm_head"):
        build_config(({"use_peft": True, "lora_target_modules": targets}, "test"))
    build_config(({"use_peft": True, "lora_target_modules": ["q_proj", "v_proj"]}, "test"))  # the body is fine


def test_lora_on_the_output_layer_is_refused_after_wrapping():
    """Whatever the output layer is called, an adapter on it is caught once peft has wrapped the model."""
    import transformers

    from fastgrpo.train.modeling import prepare_model

    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    cfg = Config()
    cfg.model.use_peft, cfg.model.lora_target_modules = True, ["lm_head"]  # past the config's own check
    with pytest.raises(ValueError, match=r"adapt the output layer \(.*\).*never train"):
        prepare_model(transformers.Qwen2ForCausalLM(config), cfg, "cpu")


@pytest.mark.parametrize("kind, use_peft", [("full", "true"), ("lora", "false")])
def test_resume_with_the_other_checkpoint_kind_is_refused(tmp_path, capsys, kind, use_peft):
    out = tmp_path / kind
    shutil.copytree(FIXTURES / kind / "checkpoint-2", out / "checkpoint-2")
    argv = ["train", "--model", str(FIXTURES / "base_model"), "--dataset", str(FIXTURES / "prompts.jsonl")]
    argv += ["--prompt_column", "prompt", "--answer_column", "answer", "--reward_funcs", "accuracy"]
    argv += ["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--use_peft", use_peft]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after datasets' progress bars on a cold cache)
    want = "LoRA adapters" if kind == "lora" else "full model weights"
    assert err.startswith("fastgrpo train: error: ") and want in err and f"use_peft is {use_peft}" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing written, nothing removed


def test_old_and_reference_passes_run_without_dropout(embedded, tmp_path):
    """LoRA dropout 0.1 at num_iterations 2: the scoring passes (pi_old) run in eval mode, as the sampler
    did, so they repeat exactly; the first iteration's ratio is exactly 1 (no token clipped); the
    second iteration, whose forward has dropout against that pi_old, does clip here (the check can fail)."""
    import torch

    from fastgrpo.train.trainer import GRPOTrainer

    from helpers import train_config

    cfg = train_config(embedded, tmp_path, max_steps=1, use_peft=True, lora_r=4, lora_dropout=0.1, num_iterations=2)
    trainer = GRPOTrainer(cfg)
    with torch.no_grad():  # adapters that matter, so dropout on their input moves the log-probs
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    batch = trainer.sample_batch()
    upd = trainer.updater
    micro = upd.micro_batches(batch)
    signs = torch.Generator().manual_seed(1)
    for m in micro:  # the random adapters score every completion alike: advantages of both signs, by hand
        m.advantages = torch.randint(0, 2, m.advantages.shape, generator=signs).float() * 2 - 1
    old = [upd.logprobs(upd.model, m.rollouts) for m in micro]
    assert all(torch.equal(a, upd.logprobs(upd.model, m.rollouts)) for a, m in zip(old, micro, strict=True))
    assert upd.model.training  # the scoring pass leaves the mode as it found it
    first = upd.accumulate_gradients(batch, micro, old, None, iteration=0)
    second = upd.accumulate_gradients(batch, micro, old, None, iteration=1)
    assert first["clip_ratio/region_mean"] == 0.0
    assert second["clip_ratio/region_mean"] > 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_metrics_over_uneven_micro_batches_are_the_batch_means(embedded, tmp_path, level):
    """Entropy, KL and clip ratios of a batch split into uneven micro-batches (rows 3, 3, ..., 1 and their
    tokens) equal those of the batch as one micro-batch: each part weighted by its tokens (rows for
    sequence-level ratios), not a plain mean of the parts."""
    import torch

    from fastgrpo.train.trainer import GRPOTrainer

    from helpers import train_config

    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, beta=0.04, importance_sampling_level=level))
    batch, upd = trainer.sample_batch(), trainer.updater

    def metrics(rows_per_micro: int) -> dict[str, float]:
        upd.settings = dataclasses.replace(upd.settings, micro_batch_rows=rows_per_micro)
        micro = upd.micro_batches(batch)
        olds, refs = [], []
        for m in micro:  # the same per-row inputs however the batch is split: keyed by global row ids
            m.advantages = ((m.rows % 3) - 1).float()
            lp = upd.logprobs(upd.model, m.rollouts)
            # per token, and per row (so that sequence-level ratios, a mean over the row, clip too)
            wobble = 0.3 * torch.sin(m.rollouts.completion_ids * 7.1 + m.rows[:, None]) + 0.5 * (
                m.rows[:, None] % 2 - 0.5
            )
            olds.append(lp + wobble)
            refs.append(lp - wobble)
        out = upd.accumulate_gradients(batch, micro, olds, refs, iteration=1)
        upd.optimizer.zero_grad(set_to_none=True)
        return {k: v for k, v in out.items() if k.startswith(("entropy", "kl", "clip_ratio"))}, len(micro)

    whole, one = metrics(len(batch.rollouts))
    parts, many = metrics(3)
    assert one == 1 and many > 2 and whole["clip_ratio/region_mean"] > 0 and whole.keys() == parts.keys()
    for name, value in whole.items():
        assert parts[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


# A value other than the embedded preset's for every preset key (reward_funcs and reward_weights go together).
PRESET_OVERRIDES = {
    "num_generations": 4,
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 4,
    "max_completion_length": 12,
    "max_prompt_length": 48,
    "temperature": 0.9,
    "top_p": 0.95,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "linear",
    "max_steps": 7,
    "beta": 0.04,
    "seed": 3,
    "reward_funcs": ["accuracy"],
    "reward_weights": [1.0],
    "output_dir": "my-run",
}


def test_the_overrides_cover_every_preset_key():
    from fastgrpo.train.embedded import EMBEDDED_PRESET

    assert set(PRESET_OVERRIDES) == set(EMBEDDED_PRESET)
    assert all(PRESET_OVERRIDES[k] != v for k, v in EMBEDDED_PRESET.items())


def _resolved(monkeypatch, argv):
    """The Config ``fastgrpo train ARGV`` would train with (the run itself replaced by a recorder)."""
    import fastgrpo.train.run as run

    seen = []
    monkeypatch.setattr(run, "train", lambda cfg: seen.append(cfg) or [])
    assert main(["train", *argv]) == 0
    (cfg,) = seen
    return cfg


@pytest.mark.parametrize("key", [k for k in PRESET_OVERRIDES if k != "reward_weights"])
@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_value_the_user_gave_wins_over_the_embedded_preset(monkeypatch, tmp_path, key, where):
    import yaml

    values = {key: PRESET_OVERRIDES[key]}
    if key == "reward_funcs":
        values["reward_weights"] = PRESET_OVERRIDES["reward_weights"]
    if where == "yaml":
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        argv = ["--config", str(path)]
    else:
        argv = []
        for k, v in values.items():
            argv += [f"--{k}", *(str(x) for x in (v if isinstance(v, list) else [v]))]
    cfg = _resolved(monkeypatch, argv)
    assert cfg.model.model is None  # still the embedded default, with the user's value
    for k, v in values.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k))


@pytest.mark.parametrize(
    "argv, flags",
    [
        (["--dataset", "my_data.jsonl"], "--dataset"),
        (["--prompt_column", "question", "--dataset_split", "test"], "--dataset_split, --prompt_column"),
    ],
)
def test_data_without_a_model_is_refused_naming_the_flags(tmp_path, capsys, argv, flags):
    out = tmp_path / "run"
    assert main(["train", *argv, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flags} given without --model" in err[0], err
    assert not out.exists()


def test_data_without_a_model_is_refused_from_yaml_too(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  dataset: my_data.jsonl\n")
    assert main(["train", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    assert "--dataset given without --model" in capsys.readouterr().err


# ---- bad input, end to end: one line naming the field, before any model loads


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: [1\n", r"is not valid YAML: .* at line 3"),
        ("train:\n  max_stepz: 3\n", r"unknown config key train.max_stepz"),
        ("max_steps: many\n", r"max_steps must be an integer, got 'many'"),
        ("grpo:\n  beta: [0.1]\n", r"beta must be a number"),
        ("- a list\n", r"must hold a mapping"),
    ],
    ids=["malformed", "unknown-key", "type-int", "type-float", "not-a-mapping"],
)
def test_bad_yaml_is_one_line(tmp_path, capsys, text, message):
    import re

    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "run").exists()


def _data(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _data(d, "empty.jsonl", ""), "is empty (no rows)"),
        (lambda d: str((d / "no-data").mkdir() or d / "no-data"), "holds no data file"),
        (lambda d: _data(d, "ints.jsonl", '{"prompt": 5, "answer": "1"}\n'), "row 0 holds int '5'"),
        (lambda d: _data(d, "bad.jsonl", '{"prompt": [{"role": "user"}], "answer": "1"}\n'), "row 0 holds list"),
        (lambda d: _data(d, "broken.jsonl", '{"prompt": "1+1", "answer": \n'), "could not read dataset"),
    ],
    ids=["empty", "folder-without-data", "non-string", "message-without-content", "malformed"],
)
def test_bad_datasets_are_one_line_before_the_model_loads(tmp_path, capsys, make, message):
    dataset = make(tmp_path)
    argv = ["train", "--model", str(tmp_path / "no-model-here"), "--dataset", dataset, "--output_dir", str(tmp_path)]
    assert main(argv) == 2  # the model path does not exist: an error about it would mean it was tried first
    err = capsys.readouterr().err.strip().splitlines()  # (datasets may print progress bars first)
    assert err[-1].startswith("fastgrpo train: error: ") and message in err[-1], err[-1]


def test_a_dataset_folder_and_chat_prompts_load(tmp_path):
    from fastgrpo.train.data import load_prompt_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (folder / "b.jsonl").write_text('{"prompt": "2+2", "answer": "4"}\n{"prompt": "3+3", "answer": "6"}\n')
    (folder / "notes.txt").write_text("not data")
    ds = load_prompt_dataset(str(folder), "train", "prompt", "answer")
    assert len(ds) == 3 and sorted(ds["answer"]) == ["2", "4", "6"]
    chat = '{"prompt": [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2"}], "answer": "4"}\n'
    ds = load_prompt_dataset(_data(tmp_path, "chat.jsonl", chat), "train", "prompt", "answer")
    assert ds[0]["prompt"][1] == {"role": "user", "content": "2+2"}


def test_a_reward_function_failing_mid_run_names_itself_and_keeps_the_last_checkpoint(embedded, tmp_path, capsys):
    from fastgrpo.train import checkpoint as ckpt

    import reward_fixtures

    reward_fixtures.CALLS.update(n=0, fail_from=4)
    model, data = embedded
    out = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", data, "--output_dir", str(out), "--max_steps", "6"]
    argv += ["--reward_funcs", "reward_fixtures:fails_from_call", "accuracy", "--save_steps", "1"]
    argv += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--disable_tqdm", "true"]
    assert main([*argv, "--max_resample_rounds", "1"]) == 1
    (err,) = capsys.readouterr().err.strip().splitlines()[-1:]
    step = int(err.split("step ")[1].split(":")[0])
    assert step >= 2 and "reward function 'fails_from_call' raised ConnectionError: the grader went away" in err, err
    saved = ckpt.list_checkpoints(out)
    assert [p.name for p in saved] == [f"checkpoint-{s}" for s in range(1, step)]
    assert ckpt.resolve_checkpoint("latest", out) == (saved[-1], []) and f"the last checkpoint is {saved[-1]}" in err


# ---- no silently lost updates: 16-bit weights and Kahan summation


def test_kahan_adamw_is_torchs_adamw_in_fp32():
    """torch-optimi's AdamW (what kahan_summation selects) takes the same steps as torch's on fp32 weights."""
    import torch

    from fastgrpo.train.update import UpdateSettings, build_optimizer

    cfg = build_config(({"learning_rate": 1e-2, "weight_decay": 0.1, "adam_beta2": 0.99}, "test"))
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(50, 30, generator=g), torch.randn(7, generator=g)]
    runs = []
    for kahan in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = build_optimizer(params, UpdateSettings.from_config(cfg, packed=False, kahan=kahan))
        grads = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_updates_are_not_lost_with_kahan_summation(embedded, tmp_path):
    """lr 1e-6, 10 steps on one batch of the tiny model: the fraction of weights that moved, fp32 against
    bf16 with plain AdamW and with Kahan summation (the weight being its bf16 value plus its compensation).
    Plain bf16 keeps almost none of the updates; Kahan summation keeps them as fp32 does."""
    import dataclasses

    import torch

    from fastgrpo.train.trainer import GRPOTrainer
    from fastgrpo.train.update import Updater, UpdateSettings

    from helpers import train_config

    cfg = train_config(embedded, tmp_path, max_steps=1, learning_rate=1e-6, kahan_summation=False)
    trainer = GRPOTrainer(cfg)
    batch = trainer.sample_batch()
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch.advantages))  # a signal in every group
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    def moved(dtype, kahan: bool) -> float:
        model = trainer.model.to(dtype)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
        settings = UpdateSettings.from_config(cfg, packed=False, kahan=kahan)
        upd = Updater(model, None, trainer.params, dataclasses.replace(settings, lr_scheduler_type="constant"))
        for _ in range(10):
            upd.update(batch)
        changed = total = 0
        for n, p in model.named_parameters():
            value = p.detach().double()
            if kahan:
                value = value + upd.optimizer.state[p]["kahan_comp"].double()
            changed += int((value != start[n].to(dtype).double()).sum())
            total += p.numel()
        return changed / total

    fp32, plain, kahan = moved(torch.float32, False), moved(torch.bfloat16, False), moved(torch.bfloat16, True)
    print(f"\nweights moved after 10 steps at lr 1e-6: fp32 {fp32:.3f}, bf16 {plain:.3f}, bf16 + Kahan {kahan:.3f}")
    assert fp32 > 0.5 and plain < 0.2 and abs(kahan - fp32) < 0.05, (fp32, plain, kahan)


def test_the_optimizer_choice_is_resolved_printed_and_planned(embedded, tmp_path, capsys):
    import torch

    from fastgrpo.train.trainer import GRPOTrainer

    from helpers import train_config

    on = GRPOTrainer(train_config(embedded, tmp_path / "bf16", max_steps=1, dtype="bfloat16"))
    assert on.updater.settings.kahan and on.model_info.kahan_summation and on.memory_plan["kahan_summation"] == 1.0
    assert "optimizer: AdamW with Kahan summation (bfloat16 trainable weights" in capsys.readouterr().out
    trainable = sum(p.numel() * 2 for p in on.model.parameters() if p.requires_grad) / 2**30
    assert on.memory_plan["optimizer_gb"] == pytest.approx(3 * trainable)
    off = GRPOTrainer(train_config(embedded, tmp_path / "fp32", max_steps=1))
    assert not off.updater.settings.kahan and isinstance(off.optimizer, torch.optim.AdamW)
    assert "optimizer: AdamW (float32 trainable weights)" in capsys.readouterr().out
    forced = GRPOTrainer(train_config(embedded, tmp_path / "off", max_steps=1, dtype="bfloat16", kahan_summation=False))
    assert "Kahan summation off (bfloat16 trainable weights lose updates" in capsys.readouterr().out
    assert not forced.updater.settings.kahan


def test_a_resume_with_the_other_optimizer_state_is_refused(embedded, tmp_path):
    from fastgrpo.train.trainer import GRPOTrainer

    from helpers import train_config

    GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, dtype="bfloat16")).train()  # Kahan (auto)
    again = train_config(
        embedded, tmp_path, max_steps=2, dtype="bfloat16", kahan_summation=False, resume_from_checkpoint="latest"
    )
    with pytest.raises(ValueError, match="with Kahan summation, but this run resolves kahan_summation to false"):
        GRPOTrainer(again)
    GRPOTrainer(train_config(embedded, tmp_path, max_steps=2, dtype="bfloat16", resume_from_checkpoint="latest"))
