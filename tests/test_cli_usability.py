"""``fastgrpo train`` as a user types it: reward modules in the working directory, bare and
negated switches, help that lists the accepted names; and ``grad_filter_eps=None`` meaning off."""

from __future__ import annotations

import sys

import pytest
import torch

import fastgrpo
from fastgrpo.cli import main
from fastgrpo.train import run, trainer
from fastgrpo.train.config import LR_SCHEDULERS, Config
from fastgrpo.train.rewards import build_reward_functions, load_reward_function

from helpers import TRITON_OK, grpo_inputs, leaf, loss_args

MY_REWARDS = """
def has_digit(prompts, completions, **kwargs):
    return [float(any(ch.isdigit() for ch in str(c))) for c in completions]
"""


@pytest.fixture
def in_folder_with_rewards(tmp_path, monkeypatch):
    """A working directory holding myrewards.py (not on sys.path otherwise); forgotten afterwards."""
    (tmp_path / "myrewards.py").write_text(MY_REWARDS)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("myrewards", None)
    yield tmp_path
    sys.modules.pop("myrewards", None)


def test_reward_module_in_the_working_directory_is_found(in_folder_with_rewards):
    path_before = list(sys.path)
    fn = load_reward_function("myrewards:has_digit")
    assert fn(["p", "p"], ["a1", "b"]) == [1.0, 0.0]
    assert sys.path == path_before  # the working directory was on the path for that import only
    [(name, same)] = build_reward_functions(
        ["myrewards:has_digit"], num_generations=2, max_completion_length=8, overlong_buffer=0,
        overlong_penalty_factor=1.0,
    )  # fmt: skip
    assert (name, same) == ("has_digit", fn)


def test_missing_reward_module_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    with pytest.raises(ValueError) as e:
        load_reward_function("no_such_rewards_mod:f")
    msg = str(e.value)
    assert "no_such_rewards_mod:f" in msg and f"working directory {tmp_path}" in msg, msg
    assert "no_such_rewards_mod.py" in msg and "\n" not in msg
    assert sys.path == path_before


def test_reward_module_that_fails_inside_keeps_its_own_error(tmp_path, monkeypatch):
    (tmp_path / "brokenrewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="cannot import 'brokenrewards'.*no_such_dependency_xyz"):
            load_reward_function("brokenrewards:f")
    finally:
        sys.modules.pop("brokenrewards", None)


class _StopAfterRewards(Exception):
    pass


def test_cli_finds_reward_module_in_the_working_directory(in_folder_with_rewards, monkeypatch, capsys):
    """``fastgrpo train --reward_funcs myrewards:has_digit`` run where myrewards.py is, up to the point
    where the rewards are loaded (the trainer checks them before any model loads)."""
    (in_folder_with_rewards / "prompts.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n' * 4)
    (in_folder_with_rewards / "model").mkdir()  # a local folder: the hub is never asked (CI has none)
    loaded = []

    def build_then_stop(specs, **kwargs):
        loaded.extend(build_reward_functions(specs, **kwargs))
        raise _StopAfterRewards

    monkeypatch.setattr(trainer, "build_reward_functions", build_then_stop)
    argv = ["train", "--model", "model", "--dataset", "prompts.jsonl", "--device", "cpu", "--no-plot"]
    with pytest.raises(_StopAfterRewards):
        main([*argv, "--reward_funcs", "myrewards:has_digit"])
    assert [name for name, _ in loaded] == ["has_digit"]
    # The same line with a module that is nowhere: one line naming the folder it looked in.
    monkeypatch.setattr(trainer, "build_reward_functions", build_reward_functions)
    assert main([*argv, "--reward_funcs", "myrewardz:has_digit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the datasets library's progress output
    assert err.startswith("fastgrpo train: error: reward function 'myrewardz:has_digit': no module 'myrewardz'")
    assert f"working directory {in_folder_with_rewards} first (myrewardz.py or myrewardz/)" in err


@pytest.fixture
def resolved(monkeypatch):
    """Runs ``main`` up to the trainer and returns the Config it would have trained with."""
    seen: list[Config] = []
    monkeypatch.setattr(run, "train", lambda cfg: seen.append(cfg) or [])

    def config_of(*flags: str) -> Config:
        seen.clear()
        assert main(["train", *flags]) == 0
        return seen[0]

    return config_of


def test_switches_take_bare_explicit_and_negated_forms(resolved):
    assert resolved().use_peft is False
    cfg = resolved("--use_peft", "--lora_r", "8")  # bare, followed by another flag
    assert cfg.use_peft is True and cfg.lora_r == 8
    assert resolved("--lora_r", "8", "--use_peft").use_peft is True  # bare, last on the line
    assert resolved("--use_peft", "true").use_peft is True
    assert resolved("--use_peft", "false").use_peft is False
    assert resolved("--no-use_peft").use_peft is False
    assert resolved("--use_peft", "--no-use_peft").use_peft is False  # the last one given wins
    cfg = resolved("--no-gradient_checkpointing", "--no-plot", "--disable_tqdm")
    assert (cfg.gradient_checkpointing, cfg.plot, cfg.disable_tqdm) == (False, False, True)
    # Optional switches (None = auto): bare is true, --no- is false, auto stays auto.
    assert resolved("--padding_free").padding_free is True
    assert resolved("--no-padding_free").padding_free is False
    assert resolved("--padding_free", "auto").padding_free is None


def test_a_bad_switch_value_is_one_clear_line(resolved, capsys):
    assert main(["train", "--use_peft", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastgrpo train: error: use_peft must be true or false, got 'maybe'"
    with pytest.raises(SystemExit):  # --no-x takes no value
        main(["train", "--no-use_peft", "true"])
    assert "unrecognized arguments: true" in capsys.readouterr().err


def test_help_lists_the_loss_types_and_schedulers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert f"one of: {', '.join(fastgrpo.LOSS_TYPES)}" in text
    assert f"one of: {', '.join(LR_SCHEDULERS)}" in text
    assert "LOSS_TYPES" not in text and "LR_SCHEDULERS" not in text
    assert "--no-use_peft" in text and "--use_peft [true|false]" in text


def test_grad_filter_eps_none_means_off():
    inp = grpo_inputs(B=2, T=5, H=16, V=50)
    impls = ["torch", "chunked"] + (["fused"] if TRITON_OK else [])
    for impl in impls:
        results = []
        for eps in ({}, {"grad_filter_eps": None}, {"grad_filter_eps": 0.0}):
            h, w = leaf(inp["hidden"]), leaf(inp["weight"])
            args, logprobs = loss_args({**inp, "hidden": h, "weight": w})
            out = fastgrpo.fused_grpo_loss(*args, **logprobs, beta=0.04, impl=impl, **eps)
            out.loss.backward()
            results.append((out.loss.detach(), h.grad, w.grad))
        for got in results[1:]:
            for a, b in zip(got, results[0], strict=True):
                assert torch.equal(a, b), impl
    assert fastgrpo.FusedGRPOLoss(grad_filter_eps=None).grad_filter_eps == 0.0
    h, w, t = inp["hidden"][0], inp["weight"], inp["targets"][0].clamp(min=0)
    assert torch.equal(fastgrpo.chunked_logprobs(h, w, t, grad_filter_eps=None), fastgrpo.chunked_logprobs(h, w, t))
    with pytest.raises(TypeError, match="grad_filter_eps must be a number or None"):
        fastgrpo.fused_grpo_loss(*loss_args(inp)[0], grad_filter_eps="0")


@pytest.mark.parametrize(
    ("argv", "weights"),
    [
        ([], [0.75, 0.25]),
        (["--reward_funcs", "accuracy"], None),
        (["--reward_funcs", "accuracy", "--reward_weights", "2"], [2.0]),
    ],
    ids=["preset", "own-funcs", "own-weights"],
)
def test_the_embedded_presets_weights_go_with_its_own_reward_functions(monkeypatch, argv, weights):
    # No --model: the embedded preset, whose two weights belong to its two reward functions.
    seen = []
    monkeypatch.setattr(run, "train", lambda cfg: seen.append(cfg) or [])
    assert main(["train", *argv]) == 0
    assert seen[0].reward_weights == weights
