"""Inputs the run must not trust (issue 21): huge rewards, reward functions that edit their inputs or exit,
non-finite and out-of-range settings, pickled weights, multi-megabyte prompts, a resume on another dataset."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train import text_tail
from fastgrpo.train.advantages import compute_advantages, zero_std_groups
from fastgrpo.train.config import build_config, field_types, load_yaml
from fastgrpo.train.data import PromptSampler, format_prompt
from fastgrpo.train.rewards import RewardFunctionError, RewardScorer, accuracy_reward, format_reward
from fastgrpo.train.sampling import tokenize_prompts

import reward_fixtures

TESTS = Path(__file__).parent


def _scorer(*funcs, weights=None):
    return RewardScorer([(f.__name__, f) for f in funcs], weights)


def _constant(name, values):
    def f(prompts, completions, **kwargs):
        return list(values)

    f.__name__ = name
    return f


# ---- A. advantages of large rewards


def test_huge_rewards_keep_their_advantages():
    """1e20 (squares past float32) scores [1.5, -0.5, -0.5, -0.5], from the scorer as from float64 input;
    rewards 1 apart at 1e10 (equal in float32) still have signal."""
    out = _scorer(_constant("big", [1e20, 0.0, 0.0, 0.0]))(["p"] * 4, ["c"] * 4, {})
    want = torch.tensor([1.5, -0.5, -0.5, -0.5])
    for scale in ("group", "batch"):
        torch.testing.assert_close(compute_advantages(out.rewards, 4, scale), want, rtol=1e-4, atol=0)
    close = torch.tensor([1e10, 1e10 + 1, 1e10, 1e10 + 1], dtype=torch.float64)
    assert zero_std_groups(close, 4).tolist() == [False]
    torch.testing.assert_close(
        compute_advantages(close, 4), torch.tensor([-0.866, 0.866, -0.866, 0.866]), rtol=1e-3, atol=0
    )


def test_rewards_beyond_float32_are_refused_naming_the_functions():
    with pytest.raises(
        ValueError, match=r"reward function 'big' returned 1e\+39 for completion 0: not a finite number"
    ):
        _scorer(_constant("big", [1e39, 0.0]))(["p"] * 2, ["c"] * 2, {})
    a, b = _constant("a", [1.5e38, 0.0]), _constant("b", [1.5e38, 0.0])
    with pytest.raises(ValueError, match=r"weighted sum of reward functions 'a', 'b' is 3e\+38 for completion 0"):
        _scorer(a, b)(["p"] * 2, ["c"] * 2, {})
    _scorer(a, b, weights=[1.0, -1.0])(["p"] * 2, ["c"] * 2, {})  # what is summed counts, not each value


def test_unscaled_advantages_beyond_float32_are_refused():
    r = torch.tensor([3e38, -3e38, -3e38, -3e38], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"advantage of 4.5e\+38 \(scale_rewards='none'\) is beyond float32"):
        compute_advantages(r, 4, "none")
    torch.testing.assert_close(compute_advantages(r, 4, "group"), torch.tensor([1.5, -0.5, -0.5, -0.5]))


# ---- B, C. reward functions that edit their inputs, or exit


@pytest.mark.parametrize("chat", [False, True], ids=["text", "messages"])
def test_a_reward_function_editing_its_inputs_changes_nothing_for_the_next(chat):
    completions = ["<answer>2</answer>", "4", "<think>a</think><answer>5</answer>", "no"]
    if chat:
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {"answer": ["2", "4", "6", "8"], "completion_ids": [[1], [2, 3], [4], [5]]}
    prompts = ["1+1", "2+2", "3+3", "4+4"]
    alone = _scorer(accuracy_reward, format_reward)(prompts, completions, columns)
    after = _scorer(reward_fixtures.rewrites_inputs, accuracy_reward, format_reward)(prompts, completions, columns)
    assert alone.per_func.mean(0).tolist() == [0.25, 0.25]
    torch.testing.assert_close(after.per_func[:, 1:], alone.per_func)
    assert prompts == ["1+1", "2+2", "3+3", "4+4"] and columns["completion_ids"] == [[1], [2, 3], [4], [5]]


@pytest.mark.parametrize("exit_with", [SystemExit(0), SystemExit("bye"), GeneratorExit()], ids=repr)
def test_a_reward_function_exiting_is_a_reward_function_error(exit_with):
    """Every BaseException names the function (it escaped the scorer before), except Ctrl-C, which still
    interrupts as it is."""

    def leaves(prompts, completions, **kwargs):
        raise exit_with

    def interrupted(prompts, completions, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(RewardFunctionError, match=rf"reward function 'leaves' raised {type(exit_with).__name__}"):
        _scorer(leaves)(["p"], ["c"], {})
    with pytest.raises(KeyboardInterrupt):
        _scorer(interrupted)(["p"], ["c"], {})


def test_sys_exit_in_a_reward_function_fails_the_run_naming_it(embedded, tmp_path):
    """``fastgrpo train`` (the embedded default) with a grader that calls sys.exit(0) from its 4th call: exit 1, and
    the last line names the step, the function and the checkpoint that stands."""
    out = tmp_path / "run"
    argv = [str(Path(sys.executable).with_name("fastgrpo")), "train", "--output_dir", str(out), "--max_steps", "5"]
    argv += ["--reward_funcs", "reward_fixtures:exits_from_call", "accuracy", "--save_steps", "1"]
    argv += ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--disable_tqdm", "true"]
    argv += ["--max_resample_rounds", "0", "--plot", "false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    step = int(last.removeprefix("fastgrpo train: error: step ").split(":")[0])
    assert step >= 2 and ": reward function 'exits_from_call' raised SystemExit: 0;" in last, last
    assert f"the last checkpoint is {out / f'checkpoint-{step - 1}'}" in last, last


# ---- D. bad settings: one line naming the field, before anything loads

FLOAT_FIELDS = [n for n, tp in field_types().items() if float in {tp, *typing.get_args(tp)} and n != "reward_weights"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", [*FLOAT_FIELDS, "reward_weights"])
def test_every_float_field_refuses_non_finite_values(name, value):
    given = {name: [value, "1"]} if name == "reward_weights" else {name: value}
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got {value}"):
        build_config((given, "test"))


BAD_FLAGS = [
    (["--num_train_epochs", "inf"], "num_train_epochs must be a finite number"),
    (["--device", "tpu:7"], "device must be auto, cpu, cuda or cuda:N, got 'tpu:7'"),
    (["--learning_rate", "inf"], "learning_rate must be a finite number"),
    (["--beta", "inf"], "beta must be a finite number"),
    (["--adam_epsilon", "nan"], "adam_epsilon must be a finite number"),
    (["--max_grad_norm", "inf"], "max_grad_norm must be a finite number, got inf (0 turns clipping off)"),
    (["--repetition_penalty", "0"], "repetition_penalty must be > 0"),
    (["--repetition_penalty", "nan"], "repetition_penalty must be a finite number"),
    (["--lora_alpha", "-16"], "lora_alpha must be > 0"),
    (["--seed", str(2**70)], "seed must be in [0, 2**32 - 1]"),
    (["--seed", "-1"], "seed must be in [0, 2**32 - 1]"),
    (["--adam_beta2", "1"], "adam_beta2 must be in [0, 1)"),
    (["--weight_decay", "-0.1"], "weight_decay must be >= 0"),
    (["--loss_type", "sapo", "--sapo_temperature_neg", "0"], "sapo_temperature_neg must be > 0"),
    (["--overlong_penalty_factor", "-1"], "overlong_penalty_factor must be >= 0"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_settings_are_one_line_before_anything_loads(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", *flags, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastgrpo train: error: {message}"), err
    assert not out.exists()


def test_a_binary_config_file_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"config file '.*weights.yaml' is not a text file \(byte 128 is not UTF-8\)"):
        load_yaml(path)
    assert main(["train", "--config", str(path), "--output_dir", str(tmp_path / "run")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "weights.yaml' is not a text file" in err


def test_a_cuda_index_past_the_visible_devices_is_refused(monkeypatch):
    from fastgrpo.train.modeling import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device 'cuda:7' requested but only 1 CUDA device\(s\) are visible"):
        resolve_device("cuda:7")


def _pickled_model(embedded, tmp_path, payload: str) -> Path:
    """The embedded model's directory with its weights as a pickled pytorch_model.bin instead."""
    import argparse
    import shutil

    from safetensors.torch import load_file

    src, folder = Path(embedded[0]), tmp_path / f"pickled-{payload}"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = load_file(src / "model.safetensors")
    torch.save({**weights, "x": argparse.Namespace()} if payload == "object" else weights, folder / "pytorch_model.bin")
    return folder


def test_a_model_without_safetensors_weights_says_so(embedded, tmp_path):
    """Without weights (a hub repo with pickled weights only is refused the same way): transformers' own line
    says to drop use_safetensors=True, which the user never set; the one line says what fastgrpo loads."""
    import shutil

    from fastgrpo.train.modeling import load_model_and_tokenizer

    folder = tmp_path / "no-weights"
    shutil.copytree(embedded[0], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(
        ValueError, match=r"could not load model '.*no-weights': it has no safetensors weights; fastgrpo"
    ):
        load_model_and_tokenizer(
            str(folder), dtype=torch.float32, device=torch.device("cpu"), attn_implementation="sdpa"
        )


@pytest.mark.parametrize("payload", ["object", "tensors"])
def test_pickled_weights_are_refused_in_one_line(embedded, tmp_path, capsys, payload):
    """A pickle holding an object (an UnpicklingError traceback before) or plain tensors (loaded before):
    neither is unpickled, by the trainer nor as a reward model."""
    from fastgrpo.train.rewards import RewardModel

    folder = _pickled_model(embedded, tmp_path, payload)
    argv = ["train", "--model", str(folder), "--dataset", embedded[1], "--output_dir", str(tmp_path / "run")]
    assert main([*argv, "--max_steps", "1", "--disable_tqdm", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (datasets may print progress bars first)
    assert (
        err.startswith("fastgrpo train: error: model directory") and "holds pickled weights (pytorch_model.bin)" in err
    )
    assert "safetensors" in err
    with pytest.raises(ValueError, match="holds pickled weights"):
        RewardModel(str(folder))


# ---- E. prompts cut before they are tokenized


def _bpe_tokenizer():
    """A byte-level BPE (the GPT-2 / Qwen family's pre-tokenizer) trained on a little text."""
    import tokenizers
    import transformers

    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>"], show_progress=False)
    tk.train_from_iterator([_text(i, 2000) for i in range(20)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>")


def _text(seed: int, chars: int) -> str:
    import random

    rng = random.Random(seed)
    words = ["the", "sum", "of", "12", "and", "7", "is", "what?", "Question:", "\n\n", "  ", "x=3;", "don't", "\t"]
    out, size = [], 0
    while size < chars:
        out.append(rng.choice(words) + rng.choice([" ", " ", "", "\n"]))
        size += len(out[-1])
    return "".join(out)[:chars]


def _today(tokenizer, prompts, max_prompt_length):
    """What tokenize_prompts returned before: the whole text tokenized, then cut from the left."""
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    truncation=max_prompt_length is not None, max_length=max_prompt_length)  # fmt: skip
    return enc["input_ids"], enc["attention_mask"].bool()


@pytest.fixture(scope="module")
def tokenizers_(embedded):
    import transformers

    return {"embedded": transformers.AutoTokenizer.from_pretrained(embedded[0]), "bpe": _bpe_tokenizer()}


@pytest.mark.parametrize("chars_per_token", [16, 1], ids=["as-shipped", "guess-too-small"])
@pytest.mark.parametrize("kind", ["embedded", "bpe"])
def test_ordinary_prompts_get_the_same_ids_as_before(tokenizers_, monkeypatch, kind, chars_per_token):
    """Prompts from empty to 5000 characters, cut (max_prompt_length 8 or 64) and not (None): the same ids
    and mask as tokenizing them whole; a first guess that holds too few tokens only widens the window."""
    monkeypatch.setattr(text_tail, "CHARS_PER_TOKEN", chars_per_token)
    tok = tokenizers_[kind]
    prompts = [format_prompt(tok, _text(i, n), None) for i, n in enumerate([0, 5, 120, 700, 1300, 5000])]
    for max_len in (8, 64, None):
        ids, mask = tokenize_prompts(tok, prompts, max_len)
        want_ids, want_mask = _today(tok, prompts, max_len)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), (kind, max_len)


class _Recording:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "longest", 0)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __setattr__(self, name, value):
        setattr(self.tokenizer, name, value)

    def __call__(self, text, **kwargs):
        texts = [text] if isinstance(text, str) else text
        object.__setattr__(self, "longest", max(self.longest, *map(len, texts)))
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("kind", ["embedded", "bpe"])
def test_a_multi_megabyte_prompt_is_cut_before_it_is_tokenized(tokenizers_, kind):
    """A 4 MB prompt (chat template included) keeps its last 64 tokens, as the whole text would, and the
    tokenizer never sees more than 16 characters per kept token (tokenized whole, 4 MB took 5-8 s and
    0.8-1.0 GB more memory on 2 CPU cores; 20 MB took 50 s and 4.4 GB)."""
    tok = _Recording(tokenizers_[kind])
    text = _text(1, 4 * 2**20)
    prompt = format_prompt(tok, text, "Add.")
    ids, _ = tokenize_prompts(tok, [prompt, "1+1"], 64)
    assert tok.longest <= 64 * text_tail.CHARS_PER_TOKEN, tok.longest
    want = tokenizers_[kind](prompt[-20_000:], add_special_tokens=False)["input_ids"][-64:]
    assert ids.shape == (2, 64) and ids[0].tolist() == want


def test_a_prompt_without_word_breaks_is_cut_too(tokenizers_):
    tok = _Recording(tokenizers_["bpe"])
    ids, mask = tokenize_prompts(tok, ["x" * 2**22], 32)
    assert ids.shape == (1, 32) and mask.all() and tok.longest <= 32 * text_tail.CHARS_PER_TOKEN


# ---- F. a resume on a dataset of another size


def test_a_sampler_state_from_another_dataset_size_is_refused():
    saved = PromptSampler(7, seed=3)
    saved.take(6)
    state = saved.state_dict()
    assert state == {"epoch": 0, "position": 6, "size": 7}
    with pytest.raises(ValueError, match=r"^the checkpoint's dataset has 7 prompts, this dataset has 5: resume"):
        PromptSampler(5, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"the checkpoint's dataset has 7 prompts, this dataset has 9"):
        PromptSampler(9, seed=3).load_state_dict(state)
    same = PromptSampler(7, seed=3)
    same.load_state_dict(state)
    assert same.take(4) == saved.take(4)


def test_an_old_sampler_state_past_the_dataset_is_refused():
    """States saved before the size was recorded: a position past this dataset's end (an IndexError on the
    first take before) is refused; one within it still loads."""
    with pytest.raises(ValueError, match=r"data position \(epoch 1, prompt 6\) is past this dataset's 5 prompts"):
        PromptSampler(5, seed=3).load_state_dict({"epoch": 1, "position": 6})
    fits = PromptSampler(5, seed=3)
    fits.load_state_dict({"epoch": 1, "position": 5})
    assert len(fits.take(3)) == 3
