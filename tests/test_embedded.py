"""Tests for the embedded default task: tokenizer, dataset, warm-up data, base model on disk.

One real base model is built per session (about 10-15 s on 2 CPU cores) and shared by the tests that
need it; everything else is fast.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import embedded_probe as probe
import pytest
import torch

from fastgrpo.train import embedded as emb
from fastgrpo.train import embedded_task as task
from fastgrpo.train.rewards import extract_answer

WELL_FORMED = re.compile(r"^(<think>\d\+\d</think>)?<answer>\d+</answer>$")


@pytest.fixture(scope="module")
def tokenizer():
    return task.build_tokenizer()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The real embedded default, built once: (workdir, model_dir, dataset_path)."""
    workdir = tmp_path_factory.mktemp("embedded")
    model_dir, dataset_path = emb.prepare_embedded(workdir, seed=0)
    return workdir, model_dir, dataset_path


# --------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "<think>3+4</think><answer>7</answer>",
        "  two  spaces, then\na newline\tand a tab ",
        "<answer> 12 </answer> trailing",
        "<think>x</think> <think> nested? </answer>",
        "",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # The tags are plain added tokens: skipping special tokens must keep them.
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_is_character_level(tokenizer):
    ids = tokenizer("<think>3+4</think><answer>17</answer>", add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<think>", "3", "+", "4", "</think>", "<answer>", "1", "7", "</answer>"]
    assert tokenizer("a b", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids(c) for c in "a b"
    ]
    # A character outside the alphabet becomes the unknown token rather than vanishing.
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # No BOS or EOS is added implicitly: prompts come from the chat template, EOS from the model.
    assert tokenizer("1+2")["input_ids"] == tokenizer("1+2", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_tokens)
    assert {"<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"} <= special
    assert not special & set(task.TAG_TOKENS)
    for token in (*task.SPECIAL_TOKENS, *task.TAG_TOKENS):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    text = "<|user|>1+2<|end|><|assistant|><answer>3</answer><|end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "1+2<answer>3</answer>"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Add."},
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "<answer>3</answer>"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|system|>Add.<|end|><|user|>1+2<|end|><|assistant|><answer>3</answer><|end|>"
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>1+2<|end|><|assistant|>"
    assert prompt.endswith("<|assistant|>")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|user|>", "1", "+", "2", "<|end|>", "<|assistant|>"]
    with pytest.raises(Exception, match="unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_padding(tokenizer):
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["1+2", "<think>"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][1][:2] == [tokenizer.pad_token_id] * 2
    right = task.build_tokenizer(padding_side="right")
    assert right(["1+2", "<think>"], padding=True)["input_ids"][1][1:] == [right.pad_token_id] * 2


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>9+9<|end|><|assistant|><think>9+9</think><answer>18</answer><|end|> x"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.chat_template == tokenizer.chat_template
    assert len(loaded) == len(tokenizer)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        None,
    )
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == tokenizer.model_max_length


# -------------------------------------------------------------------------------------------- task


def test_dataset_rows():
    rows = task.make_dataset_rows(200, seed=3)
    assert rows == task.make_dataset_rows(200, seed=3)
    assert rows != task.make_dataset_rows(200, seed=4)
    for row in rows:
        a, b = map(int, row["prompt"].split("+"))
        assert row == {"prompt": f"{a}+{b}", "answer": str(a + b)}
        assert task.is_correct(task.gold_completion(a, b), row["answer"])
        assert task.is_well_formatted(task.gold_completion(a, b))
    # 200 draws over 100 problems reach most of them.
    assert len({row["prompt"] for row in rows}) > 60


def test_write_dataset_loads_with_datasets(tmp_path):
    import datasets

    path = task.write_dataset(tmp_path / "data" / "train.jsonl", 50, seed=1)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == task.make_dataset_rows(50, seed=1)
    loaded = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.column_names == ["prompt", "answer"]
    assert loaded.num_rows == 50


def test_reward_helpers():
    assert extract_answer("<think>1+2</think><answer> 3 </answer>") == "3"
    assert extract_answer("no answer") is None
    assert task.is_correct("<answer>3</answer>", "3")
    assert not task.is_correct("<answer>4</answer>", "3")
    assert task.is_well_formatted("<think>1+2</think><answer>3</answer>")
    assert not task.is_well_formatted("<answer>3</answer>")
    assert not task.is_well_formatted("<think>1+2</think><answer>3</answer> extra")


@pytest.mark.parametrize("a,b", [(0, 0), (0, 1), (3, 4), (9, 9)])
def test_answer_distribution(a, b):
    dist = task.answer_distribution(a, b)
    assert math.isclose(sum(dist.values()), 1.0)
    assert min(dist) >= 0
    assert dist[a + b] == pytest.approx(task.P_CORRECT)
    # The right answer is the clear mode, whatever the sum (no pile-up at 0 for small sums).
    assert max(p for v, p in dist.items() if v != a + b) < 0.6 * dist[a + b]
    rng = random.Random(0)
    samples = [task.noisy_completion(a, b, rng) for _ in range(4000)]
    counts = Counter(extract_answer(s) for s in samples)
    assert counts.most_common(1)[0][0] == str(a + b)
    assert abs(counts[str(a + b)] / 4000 - task.P_CORRECT) < 0.04
    assert abs(sum(map(task.is_well_formatted, samples)) / 4000 - task.P_THINK) < 0.04


def test_expected_nll_rows_match_entropy(tokenizer):
    """With every node kept, the soft-target loss of the true conditionals is the data's entropy."""
    a, b = 7, 8
    completions = {}
    for value, prob in task.answer_distribution(a, b).items():
        for think, p_t in ((True, task.P_THINK), (False, 1 - task.P_THINK)):
            ids = tokenizer(task.addition_completion(a, b, value, think), add_special_tokens=False)["input_ids"]
            completions[(*ids, tokenizer.eos_token_id)] = prob * p_t
    entropy = -sum(p * math.log(p) for p in completions.values())

    def loss(rows):
        # The loss of the true conditionals: reach-weighted entropy of each covered node.
        total = 0.0
        for _, targets, weights in rows:
            for target, weight in zip(targets, weights, strict=True):
                total -= weight * sum(q * math.log(q) for q in target.values())
        return total

    assert loss(emb._expected_nll_rows(completions, min_reach=0.0)) == pytest.approx(entropy)
    rows = emb._expected_nll_rows(completions)
    assert len(rows) <= 6
    # Only deterministic tails are dropped, and those carry no entropy.
    assert loss(rows) == pytest.approx(entropy)


# --------------------------------------------------------------------------------------- base model


def test_warm_up_is_deterministic_and_leaves_global_rng(tokenizer):
    state = torch.get_rng_state()
    first = emb.build_base_model(tokenizer, seed=5, steps=4, prompts_per_step=10)
    assert torch.equal(torch.get_rng_state(), state)
    second = emb.build_base_model(tokenizer, seed=5, steps=4, prompts_per_step=10)
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    config = first.config
    assert type(first).__name__ == "Qwen2ForCausalLM"
    assert config.vocab_size == len(tokenizer)
    assert config.tie_word_embeddings
    assert next(first.parameters()).dtype == torch.float32
    assert not first.training


def test_prepare_embedded_writes_loadable_model(embedded, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, model_dir, dataset_path = embedded
    assert model_dir == workdir / "base_model"
    assert dataset_path == workdir / "data" / "train.jsonl"
    assert len(dataset_path.read_text().splitlines()) == emb.DEFAULT_TRAIN_ROWS
    # No temporary build directory is left behind.
    assert sorted(p.name for p in workdir.iterdir()) == ["base_model", "data"]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded_tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert loaded_tok("<answer>7</answer>")["input_ids"] == tokenizer("<answer>7</answer>")["input_ids"]
    assert model.generation_config.eos_token_id == loaded_tok.eos_token_id
    assert model.generation_config.pad_token_id == loaded_tok.pad_token_id


def test_base_model_behaviour(embedded):
    """The saved base model: well-formed greedy output, noisy samples, right answer as the mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, _ = embedded
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["0+0", "3+4", "5+5", "9+9", "2+7", "8+1"]
    for completion in probe.sample_completions(model, tok, prompts, do_sample=False):
        assert WELL_FORMED.match(completion[0]), completion

    pairs = [(a, b) for a in range(10) for b in range(10)]
    groups = probe.sample_completions(model, tok, [task.addition_prompt(a, b) for a, b in pairs], num_samples=8)
    samples = [(c, str(a + b)) for (a, b), group in zip(pairs, groups, strict=True) for c in group]
    accuracy = sum(task.is_correct(c, gold) for c, gold in samples) / len(samples)
    fmt = sum(task.is_well_formatted(c) for c, _ in samples) / len(samples)
    # Measured about 0.26 and 0.51 at seed 0; the bands leave room for other platforms and seeds.
    assert 0.15 <= accuracy <= 0.5
    assert 0.3 <= fmt <= 0.7
    # Exact answer probabilities: the right answer is the mode for nearly every prompt (measured 99
    # of 100 at seed 0), so GRPO has something to sharpen, yet holds well under half the mass.
    modes, gold_mass = 0, 0.0
    for a, b in pairs:
        probs = probe.answer_probabilities(model, tok, a, b)
        modes += max(probs, key=probs.__getitem__) == a + b
        gold_mass += probs[a + b] / len(pairs)
    assert modes >= 90
    assert 0.15 < gold_mass < 0.5


def test_prepare_embedded_reuses_complete_model(embedded, monkeypatch):
    workdir, model_dir, _ = embedded
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete base model must be reused, not rebuilt")

    monkeypatch.setattr(emb, "build_base_model", fail)
    assert emb.prepare_embedded(workdir, seed=0) == (model_dir, workdir / "data" / "train.jsonl")
    assert weights.stat().st_mtime_ns == before


def test_prepare_embedded_rebuilds_incomplete_model(tmp_path, monkeypatch):
    real = emb.build_base_model
    calls = []

    def cheap(tokenizer, seed=0, **kwargs):
        calls.append(seed)
        return real(tokenizer, seed=seed, steps=2, prompts_per_step=5)

    monkeypatch.setattr(emb, "build_base_model", cheap)
    # A leftover from a crash: files but no marker.
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "config.json").write_text("{}")
    model_dir, _ = emb.prepare_embedded(tmp_path, seed=1)
    assert calls == [1]
    assert json.loads((model_dir / emb.MARKER_FILE).read_text()) == {"toy_version": emb.TOY_VERSION, "seed": 1}
    emb.prepare_embedded(tmp_path, seed=1)
    assert calls == [1]
    # Another seed is another model.
    emb.prepare_embedded(tmp_path, seed=2)
    assert calls == [1, 2]


def test_the_first_build_says_what_it_does_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    real = emb.build_base_model
    seen = []

    def cheap(tokenizer, seed=0, progress=False, **kwargs):
        seen.append(progress)
        return real(tokenizer, seed=seed, steps=3, prompts_per_step=5, progress=progress)

    monkeypatch.setattr(emb, "build_base_model", cheap)
    model_dir, _ = emb.prepare_embedded(tmp_path, seed=0, progress=True)
    captured = capsys.readouterr()
    assert f"building its base model once (a short supervised warm-up), cached in {model_dir}" in captured.out
    assert seen == [True] and "embedded base model: 100%" in captured.err and "3/3" in captured.err
    emb.prepare_embedded(tmp_path, seed=0, progress=True)  # reused: nothing to say
    assert seen == [True] and capsys.readouterr().out == ""


def test_embedded_preset_fits_the_task(tokenizer):
    preset = emb.EMBEDDED_PRESET
    assert preset["num_generations"] >= 2
    longest = len(tokenizer(task.gold_completion(9, 9), add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert preset["max_completion_length"] >= longest
    assert preset["learning_rate"] > 0 and preset["max_steps"] > 0
