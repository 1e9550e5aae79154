"""Unit tests of the training loop's parts: advantages, dynamic sampling, config, data,
completion masks and atomic checkpoints."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train import checkpoint as ckpt
from fastgrpo.train.advantages import compute_advantages, process_advantages, zero_std_groups
from fastgrpo.train.config import build_config, load_yaml
from fastgrpo.train.data import PromptSampler, load_prompt_dataset
from fastgrpo.train.rollouts import Rollouts
from fastgrpo.train.sampling import completion_mask_and_truncation


def test_group_advantages_match_formula():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0])
    adv = compute_advantages(r, 4, "group")
    for g in range(3):
        x = r[4 * g : 4 * g + 4].double()
        want = (x - x.mean()) / (x.std() + 1e-4)
        torch.testing.assert_close(adv[4 * g : 4 * g + 4].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.all(adv[4:8] == 0)  # equal rewards: no signal
    want_batch = (r - r.view(3, 4).mean(1).repeat_interleave(4)) / (r.std() + 1e-4)
    torch.testing.assert_close(compute_advantages(r, 4, "batch"), want_batch)
    torch.testing.assert_close(compute_advantages(r, 4, "none"), r - r.view(3, 4).mean(1).repeat_interleave(4))


def test_none_rewards_are_left_out_and_get_zero_advantage():
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan"), float("nan"), float("nan"), float("nan")])
    adv = compute_advantages(r, 4)
    x = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    want = (x - x.mean()) / (x.std() + 1e-4)
    torch.testing.assert_close(adv[[0, 2, 3]].double(), want, rtol=1e-6, atol=1e-6)
    assert adv[1] == 0 and torch.all(adv[4:] == 0)


def test_process_advantages_sum_normalized_rewards_of_later_steps():
    # Group of 2: completion 0 has steps ending at tokens 1 and 3; completion 1 one step at token 2.
    steps = [[(1, 1.0), (3, 0.0)], [(2, 0.5)]]
    adv = process_advantages(steps, 2, length=5)
    vals = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    n = (vals - vals.mean()) / (vals.std() + 1e-4)
    want = torch.tensor([[n[0] + n[1], n[0] + n[1], n[1], n[1], 0.0], [n[2], n[2], n[2], 0.0, 0.0]])
    torch.testing.assert_close(adv.double(), want, rtol=1e-6, atol=1e-6)


def test_zero_std_groups_flags_constant_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.2, 0.2, float("nan"), float("nan")])
    assert zero_std_groups(r, 2).tolist() == [True, False, True, True]
    assert zero_std_groups(torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.0, float("nan"), 1.0, 1.0]), 4).tolist() == [
        True,
        False,
    ]
    with pytest.raises(ValueError, match="num_generations"):
        zero_std_groups(r[:3], 2)


def test_config_layers_sections_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3.0e-4\n  max_steps: 7\nbeta: 0.04\nreward_funcs: [accuracy]\n")
    cfg = build_config((load_yaml(path), "file"), ({"learning_rate": "1e-3", "epsilon_high": "none"}, "cli"))
    assert (cfg.learning_rate, cfg.max_steps, cfg.beta, cfg.reward_funcs, cfg.epsilon_high) == (
        1e-3,
        7,
        0.04,
        ["accuracy"],
        None,
    )
    assert cfg.train.learning_rate == 1e-3  # flat access reads the section


def test_every_config_field_has_help_text():
    from fastgrpo.train.config import FIELD_SECTIONS, field_help

    comments = field_help()
    assert sorted(comments) == sorted(FIELD_SECTIONS) and all(len(c) > 10 for c in comments.values())


@pytest.mark.parametrize(
    "values, match",
    [
        ({"learning_rat": 1}, "unknown config key 'learning_rat'.*valid keys: adam_beta1"),
        ({"train": {"beta": 1}}, "unknown config key train.beta"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"epsilon": -0.1}, "epsilon must be >= 0"),
        ({"beta": -1}, "beta must be >= 0"),
        ({"loss_type": "dr_grpo", "max_completion_length": None}, "'dr_grpo' needs max_completion_length"),
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"max_steps": "many"}, "max_steps must be an integer"),
        ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing must be true or false"),
        ({"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}, "multiple of num_generations"),
        ({"reward_funcs": ["accuracy"], "reward_weights": [1, 2]}, "reward_weights has 2 values for 1"),
        ({"reward_funcs": ["soft_overlong"]}, "overlong_buffer"),
        ({"top_entropy_quantile": 0.0}, r"top_entropy_quantile must be in \(0, 1\], got 0.0"),
        ({"top_entropy_quantile": 1.5}, r"top_entropy_quantile must be in \(0, 1\]"),
        ({"off_policy_mask_threshold": float("nan")}, "off_policy_mask_threshold must be a finite number"),
        ({"entropy_coef": float("inf")}, "entropy_coef must be a finite number"),
        # VESPO folds the correction's per-token ratios into its weight: a sequence-level mode is refused (TRL too).
        (
            {"loss_type": "vespo", "vllm_importance_sampling_correction": True},
            "needs vllm_importance_sampling_mode token_truncate or token_mask, got 'sequence_mask'",
        ),
    ],
)
def test_bad_config_values(values, match):
    with pytest.raises(ValueError, match=match):
        build_config((values, "test"))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["train", "--num_generations", "1", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_generations must be >= 2" in err
    assert main(["train", "--model", str(tmp_path / "nope"), "--dataset", "x.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_local_dataset_and_missing_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "solution": str(i)}) + "\n" for i in range(5)))
    ds = load_prompt_dataset(str(path), "train", "question", "solution")
    assert len(ds) == 5 and ds[0]["question"] == "q0"
    with pytest.raises(ValueError, match=r"no prompt_column 'prompt'; its columns are \['question', 'solution'\]"):
        load_prompt_dataset(str(path), "train", "prompt", "solution")
    with pytest.raises(ValueError, match="no answer_column 'answer'"):
        load_prompt_dataset(str(path), "train", "question", "answer")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"), "train", "question", None)


def test_prompt_sampler_resumes_in_order():
    a = PromptSampler(7, seed=3)
    first = a.take(5)
    state = a.state_dict()
    rest = a.take(12)
    b = PromptSampler(7, seed=3)
    b.load_state_dict(state)
    assert b.take(12) == rest
    assert sorted(first + rest[:2]) == list(range(7))  # each epoch is a permutation
    assert a.take(0) == []


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 9, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, truncated = completion_mask_and_truncation(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_rollouts_cat_and_trim_pad_consistently():
    def ro(p, c):
        return Rollouts(
            torch.ones(2, p, dtype=torch.long),
            torch.ones(2, p, dtype=torch.bool),
            torch.full((2, c), 3),
            torch.ones(2, c, dtype=torch.bool),
            torch.zeros(2, dtype=torch.bool),
        )

    both = Rollouts.cat([ro(2, 5), ro(4, 1)], pad_token_id=0)
    assert both.prompt_ids.shape == (4, 4) and both.completion_ids.shape == (4, 5)
    assert both.prompt_mask[:2].tolist() == [[False, False, True, True]] * 2
    assert both.completion_mask[2:].sum() == 2
    trimmed = both.select([2, 3]).trim()
    assert trimmed.prompt_ids.shape == (2, 4) and trimmed.completion_ids.shape == (2, 1)
    assert both.select([0]).trim().prompt_ids.shape == (1, 2)


class _Saveable:
    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, path):
        from safetensors.torch import save_file

        if self.fail:
            raise OSError("disk full")
        save_file({"w": torch.zeros(2)}, path / "model.safetensors")


def test_checkpoint_save_is_atomic_and_rotates(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _Saveable(), _Saveable(), {"step": 1}, "a: 1\n")
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, _Saveable(fail=True), _Saveable(), {"step": 2}, "")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no temp leftovers
    ckpt.save_checkpoint(tmp_path, 1, _Saveable(), _Saveable(), {"step": 11}, "")  # re-save replaces
    assert ckpt.load_trainer_state(tmp_path / "checkpoint-1")["step"] == 11
    for step in (2, 3):
        ckpt.save_checkpoint(tmp_path, step, _Saveable(), _Saveable(), {"step": step}, "")
    ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert ckpt.resolve_checkpoint("latest", tmp_path) == (tmp_path / "checkpoint-3", [])
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        ckpt.resolve_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    with pytest.raises(ValueError, match="has no checkpoint"):
        ckpt.resolve_checkpoint("latest", tmp_path / "empty")


def test_prompts_use_the_chat_template_and_system_prompt():
    from fastgrpo.train.data import format_prompt
    from fastgrpo.train.embedded_task import build_tokenizer

    tok = build_tokenizer()
    text = format_prompt(tok, "3+4", "Answer briefly.")
    assert text == "<|system|>Answer briefly.<|end|><|user|>3+4<|end|><|assistant|>"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert format_prompt(tok, messages, "ignored") == "<|system|>S<|end|><|user|>Q<|end|><|assistant|>"
    tok.chat_template = None
    assert format_prompt(tok, "Q", "S") == "S\n\nQ"
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(tok, messages, None)


def test_example_config_is_valid():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "grpo_gsm8k.yaml"
    cfg = build_config((load_yaml(path), str(path)))
    assert cfg.dataset_config == "main" and cfg.generation_batch_size_total() % cfg.num_generations == 0


def test_heads_that_rescale_logits_are_refused():
    import transformers

    from fastgrpo.train.modeling import check_fusable

    cfg = transformers.Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=32)  # fmt: skip
    model = transformers.Qwen2ForCausalLM(cfg)
    check_fusable(model)
    model.config.logits_scaling = 8.0
    with pytest.raises(ValueError, match="logits_scaling=8.0"):
        check_fusable(model)


def test_checkpoint_directory_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, _Saveable(), _Saveable(), {"step": 1}, "")
    finally:
        os.umask(old)
    # As a plain mkdir would make it, not mkdtemp's owner-only 0700.
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("zero_std", "streak"),
    [
        ([0.0, 0.6, 0.0, 0.6, 0.0, 0.6], None),  # most groups silent now and then: no warning
        ([0.0, 0.6, 0.7, 0.8, 0.9, 1.0, 0.0], (2, 6)),  # five in a row
        ([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], None),  # half is not most
        ([1.0, 1.0, 1.0], (1, 3)),  # a run shorter than five steps, silent throughout
        ([1.0, 1.0, 0.0], None),
    ],
)
def test_steps_without_signal_are_named_when_most_groups_stay_silent(zero_std, streak):
    from fastgrpo.train.tracking import no_signal_streak, summary_line

    rows = [{"step": i + 1, "reward": 0.5, "step_time": 1.0, "frac_reward_zero_std": z} for i, z in enumerate(zero_std)]
    assert no_signal_streak(rows) == streak
    assert ("most groups had the same reward" in summary_line(rows)) == (streak is not None)


def test_vespo_with_the_auto_correction_on_vllm_needs_a_token_mode():
    """The correction's auto resolves with the backend: on vllm it is on, and VESPO then refuses a sequence mode."""
    from fastgrpo.train.update import UpdateSettings

    cfg = build_config(({"loss_type": "vespo"}, "test"))  # correction auto, default mode sequence_mask
    assert UpdateSettings.from_config(cfg, packed=False, kahan=False, backend="hf").correction.enabled is False
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode token_truncate or token_mask"):
        UpdateSettings.from_config(cfg, packed=False, kahan=False, backend="vllm")
    token = build_config(({"loss_type": "vespo", "vllm_importance_sampling_mode": "token_truncate",
                           "vllm_importance_sampling_clip_max": 3.0}, "test"))  # fmt: skip
    assert UpdateSettings.from_config(token, packed=False, kahan=False, backend="vllm").correction.enabled
