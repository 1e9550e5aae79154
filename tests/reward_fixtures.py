"""Custom reward functions that the end-to-end tests load by ``module:function``."""

from __future__ import annotations


def none_for_odd_rows(prompts, completions, **kwargs):
    # Scores only even rows; odd rows get None, which TRL treats as "no reward" (NaN).
    return [float(len(c) % 3 == 0) if i % 2 == 0 else None for i, c in enumerate(completions)]


def wrong_count(prompts, completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def raises(prompts, completions, **kwargs):
    raise KeyError("no such column")


def answer_digit_steps(prompts, completions, completion_ids, **kwargs):
    # Process supervision: one step ending at the last token, rewarded by the completion's length parity.
    return [[(len(ids) - 1, float(len(ids) % 2))] for ids in completion_ids]


# fails_from_call: the call (1-based, the trainer's pre-flight call included) from which it raises.
CALLS = {"n": 0, "fail_from": 4}


def fails_from_call(prompts, completions, **kwargs):
    CALLS["n"] += 1
    if CALLS["n"] >= CALLS["fail_from"]:
        raise ConnectionError("the grader went away")
    return [0.0] * len(completions)
