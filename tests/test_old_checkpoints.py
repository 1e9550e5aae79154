"""Checkpoints written by earlier code still resume, and continue exactly as the run that wrote them.

The fixtures (``tests/fixtures/old_checkpoints``, see its README) were written by the flat-layout
code before ``fastgrpo/`` got its ``ops``/``train``/``integrations`` wings. Resuming goes through
the command line, whose flags are part of the compatibility promise too.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fastgrpo.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "old_checkpoints"
# What differs between an uninterrupted run and a resumed one by design: wall-clock figures, and
# the memory plan, which only the first row a process logs carries.
VOLATILE = ("tokens_per_second", "step_time", "time/", "peak_memory_gb", "memory/")
# Metrics whose definition changed after the fixtures were written: the op's per-micro-batch means are
# now weighted by each micro-batch's loss tokens (or rows), not averaged plainly.
REDEFINED = ("entropy", "kl", "clip_ratio/", "cispo_clip_ratio")
# The fixtures' README has the commands that wrote them, with these flags.
COMMON = [
    *("--prompt_column", "prompt", "--answer_column", "answer", "--reward_funcs", "accuracy", "format"),
    *("--reward_weights", "0.75", "0.25", "--num_generations", "4", "--per_device_train_batch_size", "8"),
    *("--gradient_accumulation_steps", "2", "--max_completion_length", "16", "--max_prompt_length", "64"),
    *("--learning_rate", "3e-4", "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "4"),
    *("--num_iterations", "2", "--seed", "3", "--disable_tqdm", "true", "--plot", "false"),
]
KINDS = {
    "full": ["--beta", "0.0"],
    "lora": ["--beta", "0.04", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0"],
}


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


# Each figure is a mean of per-token terms of size ~1 in float32 (ratio x advantage, k3), so its
# round-off is ~1e-7 in absolute terms however far the mean cancels: step 3's loss of the full run is
# -0.0057. The old code rounded the group statistics in float32 and today's in float64 (one rounding:
# the advantages differ in their last bit), which moves that loss by 1.3e-8 (2.3e-6 relative) and the
# LoRA run's kl of 2.8e-5 by 1.1e-9 (3.8e-5 relative). A torch RNG state not restored changes the
# samples: step 3's reward 0.453 becomes 0.234.
ABS_TOL = 1e-7


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=ABS_TOL) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.parametrize("kind", list(KINDS))
def test_old_checkpoint_resumes_and_repeats_the_uninterrupted_run(tmp_path, kind):
    # The base model the fixtures were trained from: a LoRA resume loads it under the adapters.
    model = str(FIXTURES / "base_model")
    out = tmp_path / kind
    out.mkdir()
    shutil.copytree(FIXTURES / kind / "checkpoint-2", out / "checkpoint-2")
    before = torch.load(out / "checkpoint-2" / "trainer_state.pt", map_location="cpu", weights_only=False)
    args = ["train", "--model", model, "--dataset", str(FIXTURES / "prompts.jsonl"), *COMMON, *KINDS[kind]]
    assert main([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) == 0

    expected, resumed = _rows(FIXTURES / kind / "metrics.jsonl")[2:], _rows(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for want, got in zip(expected, resumed, strict=True):
        assert want.keys() == got.keys()
        diff = {k: (want[k], got[k]) for k in want if not k.startswith(REDEFINED) and not _same(want[k], got[k])}
        assert not diff, f"step {want['step']} differs from the run that wrote the checkpoint: {diff}"
    # The redefined metrics against today's code run without interruption.
    fresh = tmp_path / f"{kind}-fresh"
    assert main([*args, "--output_dir", str(fresh)]) == 0
    for want, got in zip(_rows(fresh / "metrics.jsonl")[2:], resumed, strict=True):
        diff = {k: (want[k], got[k]) for k in want if not _same(want[k], got[k])}
        assert not diff, f"step {want['step']} differs from an uninterrupted run: {diff}"
    # The resumed run continued from the saved counters, not from zero.
    assert before["step"] == 2 and before["num_tokens"] > 0
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4 and state["num_tokens"] > before["num_tokens"]
    saved = {p.name for p in (out / "checkpoint-4").iterdir()}
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    assert {weights, "trainer_state.pt", "config.yaml", "tokenizer.json"} <= saved


@pytest.mark.parametrize("kind", list(KINDS))
def test_old_config_yaml_loads_with_the_same_keys(kind):
    """The config.yaml an old checkpoint holds is a valid --config today, section for section: every
    key it has keeps its section and value, and a key added since (a section too) takes its default."""
    from fastgrpo.train.config import Config, build_config, load_yaml

    path = FIXTURES / kind / "checkpoint-2" / "config.yaml"
    old = load_yaml(path)
    new, default = build_config((old, str(path))).to_dict(), Config().to_dict()
    assert set(old) <= set(new)
    for section, values in old.items():
        assert {k: new[section].get(k, "<missing>") for k in values} == values, section
    added = {(s, k) for s, values in new.items() for k in values if k not in old.get(s, {})}
    assert {(s, k): new[s][k] for s, k in added} == {(s, k): default[s][k] for s, k in added}
    assert new["grpo"]["num_iterations"] == 2


def test_public_names_resolve_as_before():
    import fastgrpo
    import fastgrpo.ops as ops
    from fastgrpo.ops import fused_grpo_loss

    assert fastgrpo.fused_grpo_loss is fused_grpo_loss is ops.fused_grpo_loss
    for name in ("chunked_logprobs", "FusedGRPOLoss", "GRPOLossOutput", "GRPOLossParams", "grpo_loss_from_logprobs"):
        assert getattr(fastgrpo, name) is getattr(ops, name)
    entry = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "fastgrpo"]
    assert [e.value for e in entry] == ["fastgrpo.cli:main"] and entry[0].load() is main
