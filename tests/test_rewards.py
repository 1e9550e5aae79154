"""Reward functions, answer checking, reward models and the reward scorer (CPU, hand-written inputs)."""

from __future__ import annotations

import math
import random
import string
import sys

import pytest
import torch

from fastgrpo.train.rewards import (
    BUILTIN_REWARDS,
    RewardModel,
    RewardScorer,
    accuracy_reward,
    answers_match,
    build_reward_functions,
    extract_answer,
    format_reward,
    load_reward_function,
    make_length_reward,
    make_soft_overlong_reward,
)

NAN = float("nan")


def same(a, b):
    """Element-wise equality of float lists that treats NaN as equal to NaN."""
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>hmm</think><answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("so \\boxed{3} and finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{ {a}{b} }", "{a}{b}"),
        ("<answer>7</answer> and \\boxed{8}", "7"),  # answer tags win over boxes
        ("\\boxed{5} then a cut-off \\boxed{\\frac{1}{", "5"),
        ("no answer here", None),
        ("<answer>unterminated", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", "42"),
        ("42", 42),
        ("42.0", 42),
        ("1,000", "1000"),
        ("$1,234.50", 1234.5),
        ("50%", "50"),
        ("-3", -3),
        ("3/4", "0.75"),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{1}{3}", "1/3"),
        ("-\\frac{1}{2}", "-0.5"),
        ("1.0000001", 1),
        ("Paris.", "paris"),
        ("\\text{New  York}", "new york"),
        ("$x+1$", "x+1"),
    ],
)
def test_answers_match(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [("41", "42"), ("1.001", 1), ("-3", 3), ("1,2", "12"), ("3/0", "inf"), ("Paris", "London"), (None, "1"), ("x", 5)],
)
def test_answers_mismatch(pred, gold):
    assert not answers_match(pred, gold)


def test_accuracy_reward():
    completions = ["<answer>4</answer>", "\\boxed{5}", "I don't know", "<answer>4</answer>"]
    assert accuracy_reward(["p"] * 4, completions, answer=["4", 4, "4", None], truncated=[False] * 4) == [
        1.0,
        0.0,
        0.0,
        None,
    ]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["p"], ["x"])


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reason</think><answer>4</answer>", 1.0),
        ("  <think>a\nb</think>\n\n<answer>4</answer>\n", 1.0),
        ("<think>reason</think> text <answer>4</answer>", 0.0),
        ("prefix <think>reason</think><answer>4</answer>", 0.0),
        ("<think>reason</think><answer>4</answer> suffix", 0.0),
        ("<think>a</think><think>b</think><answer>4</answer>", 0.0),
        ("<think>a</think><answer>4</answer><answer>5</answer>", 0.0),
        ("<answer>4</answer><think>a</think>", 0.0),
        ("<think>a<answer>4</answer>", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["p"], [completion], answer=["4"]) == [expected]


def test_soft_overlong_boundaries():
    f = make_soft_overlong_reward(max_completion_length=10, overlong_buffer=4, overlong_penalty_factor=2.0)
    assert f.__name__ == "soft_overlong"
    lengths = [0, 6, 7, 8, 10, 11]
    out = f(["p"] * 6, ["c"] * 6, completion_ids=[[1] * n for n in lengths], unused=1)
    assert out == pytest.approx([0.0, 0.0, -0.5, -1.0, -2.0, -2.0])


@pytest.mark.parametrize(
    "args, name",
    [
        ((0, 1), "max_completion_length"),
        ((10, 0), "overlong_buffer"),
        ((10, 11), "overlong_buffer"),
        ((10, None), "overlong_buffer"),
    ],
)
def test_soft_overlong_validation(args, name):
    with pytest.raises(ValueError, match=name):
        make_soft_overlong_reward(*args)
    with pytest.raises(ValueError, match="overlong_penalty_factor"):
        make_soft_overlong_reward(10, 4, NAN)


def test_length_reward():
    f = make_length_reward(num_generations=3)
    assert f.__name__ == "length"
    completions = ["<answer>1</answer>", "<answer>2</answer>", "<answer>1</answer>"] + ["<answer>1</answer>"] * 3
    ids = [[0] * n for n in (10, 20, 30, 5, 5, 5)]
    gold = ["1"] * 3 + [None] * 3
    out = f(["p"] * 6, completions, completion_ids=ids, answer=gold)
    # Group 1: lam = 0.5, 0, -0.5; the wrong middle one is clipped to min(0, lam). Group 2: equal lengths.
    assert out == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])
    out = f(["p"] * 3, ["<answer>9</answer>"] * 3, completion_ids=[[0] * 2, [0] * 4, [0] * 6], answer=["1"] * 3)
    assert out == pytest.approx([0.0, 0.0, -0.5])
    with pytest.raises(ValueError, match="multiple of num_generations"):
        f(["p"] * 4, ["c"] * 4, completion_ids=[[0]] * 4, answer=["1"] * 4)


# Functions importable as "test_rewards:<name>" (pytest puts tests/ on sys.path).
def constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


NOT_CALLABLE = 3


def test_load_reward_function():
    assert load_reward_function(f"{__name__}:constant_reward") is sys.modules[__name__].constant_reward
    assert load_reward_function("fastgrpo.train.rewards:format_reward") is format_reward
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward_function("fastgrpo.train.rewards:nope")
    with pytest.raises(ValueError, match="not callable"):
        load_reward_function(f"{__name__}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="package.module:function"):
        load_reward_function("fastgrpo.train.rewards:")


def fixed(values):
    return lambda prompts, completions, **kwargs: values


def test_scorer_weights_and_none():
    scorer = RewardScorer([("a", fixed([1.0, None, 0.5, None])), ("b", fixed([2.0, 3.0, None, None]))], [1.0, -0.5])
    out = scorer(["p"] * 4, ["c"] * 4, {"answer": [None] * 4})
    assert out.per_func.dtype == torch.float32 and out.per_func.shape == (4, 2)
    assert same(out.per_func.flatten().tolist(), [1.0, 2.0, NAN, 3.0, 0.5, NAN, NAN, NAN])
    assert same(out.rewards.tolist(), [0.0, -1.5, 0.5, NAN])  # all-None row stays NaN
    assert out.steps is None
    assert out.metrics["rewards/a/mean"] == pytest.approx(0.75)
    assert out.metrics["rewards/a/std"] == pytest.approx(torch.tensor([1.0, 0.5]).std().item())
    assert out.metrics["rewards/b/mean"] == pytest.approx(2.5)


def test_scorer_passes_columns():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return [0.0] * len(completions)

    columns = {"answer": ["1", "2"], "completion_ids": [[1], [2]], "truncated": [False, True], "level": [1, 2]}
    RewardScorer([("spy", spy)])(["p", "q"], ["c", "d"], columns)
    assert seen == {**columns, "prompts": ["p", "q"]}


def test_scorer_validation():
    with pytest.raises(ValueError, match="weights"):
        RewardScorer([("a", constant_reward)], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        RewardScorer([("a", constant_reward)], [math.inf])
    with pytest.raises(ValueError, match="unique"):
        RewardScorer([("a", constant_reward), ("a", format_reward)])

    def boom(prompts, completions, **kwargs):
        raise KeyError("missing")

    cases = [
        (boom, RuntimeError, "reward function 'bad' raised KeyError"),
        (fixed([1.0] * 5), ValueError, "'bad' returned 5 values for 8 completions"),
        (fixed(torch.ones(8)), ValueError, "'bad' returned a Tensor"),
        (fixed([1.0] * 7 + [NAN]), ValueError, "'bad' returned nan"),
        (fixed([1.0] * 7 + [math.inf]), ValueError, "'bad' returned inf"),
        (fixed([1.0] * 7 + ["1"]), ValueError, "'bad' returned '1'"),
        (fixed([1.0] * 7 + [[(0, 1.0)]]), ValueError, "'bad' mixed"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg) as info:
            RewardScorer([("good", constant_reward), ("bad", fn)])(["p"] * 8, ["c"] * 8, {"completion_ids": [[1]] * 8})
        assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_scorer_process_rewards():
    prm = fixed([[(0, 0.5), (2, 1.0)], None, [], [(1, -1.0), (1, 0.5)]])
    prm2 = fixed([[(2, 1.0)], None, None, None])
    scorer = RewardScorer([("acc", fixed([1.0, 0.0, None, None])), ("prm", prm), ("prm2", prm2)], [2.0, 3.0, 1.0])
    ids = [[7, 7, 7], [7], [7, 7], [7, 7]]
    out = scorer(["p"] * 4, ["c"] * 4, {"completion_ids": ids})
    assert same(out.per_func[:, 1].tolist(), [1.5, NAN, 0.0, -0.5])
    assert same(out.per_func[:, 2].tolist(), [1.0, NAN, NAN, NAN])
    # Process functions stay out of the outcome reward; rows 2 and 3 have only process values.
    assert same(out.rewards.tolist(), [2.0, 0.0, 0.0, 0.0])
    assert out.steps == [[(0, 1.5), (2, 4.0)], [], [], [(1, -1.5)]]
    assert out.metrics["rewards/prm/mean"] == pytest.approx(1 / 3)

    for bad in ([(3, 1.0)], [(-1, 1.0)], [(1.0, 1.0)], [(0,)], [(0, NAN)]):
        with pytest.raises(ValueError, match="'prm'"):
            RewardScorer([("prm", fixed([bad]))])(["p"], ["c"], {"completion_ids": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="completion_ids"):
        RewardScorer([("prm", fixed([[(0, 1.0)]]))])(["p"], ["c"], {})


# --------------------------------------------------------------------------- reward models

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
)


def _save_tiny_reward_model(path, chat_template=None):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    vocab = {tok: i for i, tok in enumerate(["[UNK]", "[EOS]", *string.printable])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,  # room for special tokens AutoTokenizer may add when it reloads the tokenizer
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=1,
    )
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[None, CHAT_TEMPLATE], ids=["plain", "chat"])
def tiny_rm(request, tmp_path_factory):
    return _save_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", request.param)


def test_reward_model_scores(tiny_rm):
    rm = RewardModel(str(tiny_rm), batch_size=2)
    assert rm.__name__ == "tiny-rm"
    prompts = ["What is 2+2? ", "Name a color. ", "x"]
    completions = ["4", "A much longer answer: blue, like the sky.", "y z"]
    scores = rm(prompts, completions, answer=["4", None, None])
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert rm(prompts, completions) == scores
    # Padded batches must score each text as it scores alone.
    for p, c, s in zip(prompts, completions, scores, strict=True):
        text = rm.format(p, c)
        assert text == (f"<user>{p}<assistant>{c}" if rm.tokenizer.chat_template else p + c)
        enc = rm.tokenizer(text, return_tensors="pt", add_special_tokens=not rm.tokenizer.chat_template)
        with torch.no_grad():
            manual = rm.model(**enc).logits[0, 0].item()
        assert s == pytest.approx(manual, abs=1e-5)


def test_reward_model_reads_the_end_of_a_text_too_long_for_it(tiny_rm, monkeypatch):
    """A 20,000-character prompt is scored on the last 256 tokens (the model's positions), where the
    completion is, and the tokenizer is never given more than 16 characters per kept token (before:
    all ~16,000 tokens went through a 256-position model; at 1 MB the forward alone needs TBs)."""
    rm = RewardModel(str(tiny_rm), batch_size=2)
    assert rm.max_length == 256
    rng = random.Random(0)
    prompt = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(4_000))
    prompt = prompt[:20_000]
    seen = []
    real = type(rm.tokenizer).__call__

    def recording(self, text, *args, **kwargs):
        seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(rm.tokenizer), "__call__", recording)
    [score, short] = rm([prompt, "2+2="], ["the answer is 4", "4"])
    assert max(seen) <= 256 * 16, max(seen)
    monkeypatch.undo()
    text = rm.format(prompt, "the answer is 4")
    enc = rm.tokenizer(text[-4096:], return_tensors="pt", add_special_tokens=not rm.tokenizer.chat_template)
    ids = enc["input_ids"][:, -256:]
    with torch.no_grad():
        assert score == pytest.approx(rm.model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert short == pytest.approx(rm(["2+2="], ["4"])[0], abs=1e-5)
    assert rm.tokenizer.truncation_side == "right"  # put back after the call


def test_reward_model_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RewardModel(str(tmp_path / "nope"))


def test_build_reward_functions(tiny_rm):
    kw = dict(num_generations=2, max_completion_length=16, overlong_buffer=4, overlong_penalty_factor=1.0)
    specs = [*BUILTIN_REWARDS, f"{__name__}:constant_reward", str(tiny_rm)]
    funcs = build_reward_functions(specs, **kw)
    assert [n for n, _ in funcs] == [*BUILTIN_REWARDS, "constant_reward", "tiny-rm"]
    assert funcs[0][1] is accuracy_reward and isinstance(funcs[-1][1], RewardModel)
    columns = {"answer": ["4", "4"], "completion_ids": [[1] * 3, [1] * 14], "truncated": [False, False]}
    out = RewardScorer(funcs)(["q", "q"], ["<think>a</think><answer>4</answer>", "\\boxed{5}"], columns)
    assert out.per_func.shape == (2, 6) and torch.isfinite(out.per_func).all()
    assert out.per_func[:, :5].tolist() == [[1.0, 1.0, 0.0, 0.5, 1.0], [0.0, 0.0, -0.5, -0.5, 1.0]]

    with pytest.raises(ValueError, match="unknown reward 'nonsense'.*accuracy, format.*module:function"):
        build_reward_functions(["nonsense"], **kw)
    with pytest.raises(ValueError, match="duplicate.*'accuracy'"):
        build_reward_functions(["accuracy", "accuracy"], **kw)
    with pytest.raises(ValueError, match="duplicate.*'format_reward'"):
        build_reward_functions(["fastgrpo.train.rewards:format_reward", "fastgrpo.train.rewards:format_reward"], **kw)
    with pytest.raises(ValueError, match="overlong_buffer"):
        build_reward_functions(["soft_overlong"], **{**kw, "overlong_buffer": 0})


def test_accuracy_reads_the_final_answer_of_gold_solutions():
    golds = ["Natalia sold 48/2 = 24 clips.\n#### 72", "so the answer is \\boxed{\\frac{1}{2}}", "<answer>7</answer>"]
    completions = ["<answer>72</answer>", "<answer>0.5</answer>", "\\boxed{7}"]
    assert accuracy_reward(["p"] * 3, completions, answer=golds) == [1.0, 1.0, 1.0]
    assert accuracy_reward(["p"], ["<answer>24</answer>"], answer=golds[:1]) == [0.0]
