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


# exits_from_call: from its EXIT_FROM-th call (the pre-flight call included) it calls sys.exit(0), which a
# run must not take for success.
EXIT_FROM = 4
EXIT_CALLS = {"n": 0}


def exits_from_call(prompts, completions, **kwargs):
    import sys

    EXIT_CALLS["n"] += 1
    if EXIT_CALLS["n"] >= EXIT_FROM:
        sys.exit(0)
    return [0.0] * len(completions)


def rewrites_inputs(prompts, completions, answer=None, completion_ids=None, **kwargs):
    # Edits every input in place, as a careless grader might: a well-formatted right answer everywhere.
    for i, c in enumerate(completions):
        text = "<think>x</think><answer>" + str(answer[i] if answer else 0) + "</answer>"
        if isinstance(c, list):
            c[-1]["content"] = text
        else:
            completions[i] = text
    for ids in completion_ids or []:
        ids.append(0)
    prompts.clear()
    return [0.0] * len(completions)


def constant(prompts, completions, **kwargs):
    # Never varies: every group has zero spread, so no step carries a gradient.
    return [1.0] * len(completions)
