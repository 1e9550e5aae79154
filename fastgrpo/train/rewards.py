"""Reward functions for GRPO: answer checking, built-in rewards, reward models and a scorer.

A reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``:
``prompts`` and ``completions`` are lists of N strings, ``columns`` holds every dataset column (one
value per completion) plus ``answer``, ``completion_ids`` (list[list[int]], unpadded) and ``truncated``
(list[bool]). Completions ``[i*G:(i+1)*G]`` share a prompt. ``None`` means "no opinion on this row".
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .text_tail import text_tail

BUILTIN_REWARDS = ("accuracy", "format", "soft_overlong", "length")

RewardFunc = Callable[..., list]

_BOXED_RE = re.compile(r"\\boxed\s*\{")
_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# Commas are only thousands separators in this exact layout; "1,2" is a list, not twelve.
_COMMA_NUM_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_PERCENT_RE = re.compile(r"\s*\\?%$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``: the content of the last ``<answer>...</answer>``, else of
    the last ``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{2}}`` works), else None. Stripped."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        return text[start + len("<answer>") : end].strip()
    # Walk back from the last \boxed so a truncated final box falls back to an earlier complete one.
    for m in reversed(list(_BOXED_RE.finditer(text))):
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[m.end() : j].strip()
    return None


def _to_number(s: str) -> float | None:
    s = s.replace("\\$", "").replace("$", "").replace("\\!", "").replace("\\,", "").strip()
    s = _PERCENT_RE.sub("", s)
    if _COMMA_NUM_RE.fullmatch(s):
        s = s.replace(",", "")
    if _NUM_RE.fullmatch(s):
        return float(s)
    m = _FRAC_RE.fullmatch(s)
    parts = (m[2], m[3]) if m else s.split("/") if s.count("/") == 1 else None
    if parts is None:
        return None
    num, den = (p.strip() for p in parts)
    if not (_NUM_RE.fullmatch(num) and _NUM_RE.fullmatch(den)) or float(den) == 0:
        return None
    value = float(num) / float(den)
    return -value if m and m[1] == "-" else value


def _normalize(s: str) -> str:
    s = _TEXT_RE.sub(r"\1", s).replace("\\$", "").replace("$", "")
    s = " ".join(s.split()).lower()
    return s[:-1].rstrip() if s.endswith(".") else s


def answers_match(pred: str | None, gold: str | int | float) -> bool:
    """Whether predicted answer ``pred`` equals ``gold`` (str, int or float).

    Numerically (relative tolerance 1e-6, absolute 1e-9) when both parse as numbers: integers,
    decimals, signs, thousands commas, a ``$``, a trailing ``%``, ``a/b`` and ``\\frac``/``\\dfrac``.
    Otherwise as normalized strings: lowercase, whitespace collapsed, ``$`` dropped, ``\\text{x}`` -> x,
    one trailing period dropped."""
    if pred is None or gold is None:
        return False
    numeric_gold = isinstance(gold, numbers.Real) and not isinstance(gold, bool)
    g = float(gold) if numeric_gold else _to_number(str(gold))
    p = _to_number(pred)
    if g is not None and p is not None:
        return math.isfinite(g) and math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9)
    return not numeric_gold and _normalize(pred) == _normalize(str(gold))


def gold_answer(gold):
    """The final answer inside a gold solution: GSM8K writes its rationale, then ``#### 42``;
    other golds may box it. Plain answers pass through unchanged."""
    if not isinstance(gold, str):
        return gold
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip()
    return extract_answer(gold) if "\\boxed" in gold or "<answer>" in gold else gold


def accuracy_reward(prompts: list[str], completions: list[str], answer: list | None = None, **kwargs) -> list:
    """1.0 where ``extract_answer(completion)`` matches ``gold_answer(answer[i])``, 0.0 where it does not
    or no answer is found, None where ``answer[i]`` is None. ``answer``: list (N,) of str/int/float/None."""
    if answer is None:
        raise ValueError("accuracy reward needs the 'answer' column")
    return [
        None if a is None else float(answers_match(extract_answer(as_text(c)), gold_answer(a)))
        for c, a in zip(completions, answer, strict=True)
    ]


_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """1.0 where the completion is exactly ``<think>...</think>`` then ``<answer>...</answer>`` (whitespace
    allowed around and between, one of each tag), else 0.0. Returns a list (N,)."""
    texts = [as_text(c) for c in completions]
    return [float(bool(_FORMAT_RE.fullmatch(c)) and all(c.count(t) == 1 for t in _FORMAT_TAGS)) for c in texts]


def as_text(completion) -> str:
    """The text of a completion: a string, or (conversational datasets, as TRL passes them) a list
    of messages whose last one holds the assistant's reply."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


def _need_ids(completion_ids: list | None, n: int, who: str) -> list:
    if completion_ids is None or len(completion_ids) != n:
        raise ValueError(f"{who} reward needs 'completion_ids' with one entry per completion")
    return completion_ids


def make_soft_overlong_reward(
    max_completion_length: int, overlong_buffer: int, overlong_penalty_factor: float = 1.0
) -> RewardFunc:
    """DAPO soft overlong punishment on the token length L of each completion: 0 up to
    ``max_completion_length - overlong_buffer``, then falling linearly to ``-overlong_penalty_factor`` at
    ``max_completion_length``, and ``-overlong_penalty_factor`` beyond. Reads ``completion_ids``."""
    if max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")
    if overlong_buffer is None or not 0 < overlong_buffer <= max_completion_length:
        raise ValueError(
            f"overlong_buffer must be in (0, max_completion_length={max_completion_length}], got {overlong_buffer}"
        )
    if not (math.isfinite(overlong_penalty_factor) and overlong_penalty_factor >= 0):
        raise ValueError(f"overlong_penalty_factor must be finite and >= 0, got {overlong_penalty_factor}")
    start = max_completion_length - overlong_buffer

    def soft_overlong(prompts, completions, completion_ids=None, **kwargs):
        ids = _need_ids(completion_ids, len(completions), "soft_overlong")
        # start - L clipped to [-buffer, 0]: zero before the buffer, linear inside it, -factor past the limit.
        return [overlong_penalty_factor * min(max(start - len(x), -overlong_buffer), 0) / overlong_buffer for x in ids]

    return soft_overlong


def make_length_reward(num_generations: int) -> RewardFunc:
    """Kimi k1.5 length reward within each group of ``num_generations`` contiguous completions:
    lam = 0.5 - (L - min_L) / (max_L - min_L) (0 when all lengths are equal); lam if the completion is
    correct (``accuracy_reward`` == 1.0), else min(0, lam). Reads ``completion_ids`` and ``answer``."""
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")

    def length(prompts, completions, completion_ids=None, answer=None, **kwargs):
        n, G = len(completions), num_generations
        if n % G:
            raise ValueError(f"length reward got {n} completions, not a multiple of num_generations={G}")
        lengths = [len(ids) for ids in _need_ids(completion_ids, n, "length")]
        correct = [v == 1.0 for v in accuracy_reward(prompts, completions, answer=answer)]
        out = []
        for g in range(0, n, G):
            lo, hi = min(lengths[g : g + G]), max(lengths[g : g + G])
            for i in range(g, g + G):
                lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
                out.append(lam if correct[i] else min(0.0, lam))
        return out

    return length


def _import_from_working_directory(module_name: str):
    """``importlib.import_module`` with the working directory first on the search path, as
    ``python -m`` has it (a ``fastgrpo`` console script starts with its own folder there instead).
    Only for this import: the entry is taken out again, the rest of ``sys.path`` left as it is."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        with contextlib.suppress(ValueError):  # ValueError: the module took it out itself
            sys.path.remove(cwd)  # the first occurrence: ours, unless the module put the same entry before it


def load_reward_function(spec: str) -> RewardFunc:
    """Import ``"package.module:function"`` (looked up in the working directory first, then on
    ``sys.path``) and return the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} is not of the form 'package.module:function'")
    try:
        module = _import_from_working_directory(module_name)
    except Exception as e:
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
            # The module itself (or a package above it) is missing, not something it imports.
            where = missing.replace(".", "/")
            raise ValueError(
                f"reward function {spec!r}: no module {missing!r}; looked in the working directory "
                f"{os.getcwd()} first ({where}.py or {where}/), then on the Python path"
            ) from e
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return fn


class RewardModel:
    """Reward function backed by a local ``AutoModelForSequenceClassification`` directory ``path`` (one
    scalar logit, ``num_labels=1``) and its tokenizer, run on ``device`` in ``dtype`` (a torch dtype, its
    name, or None for the checkpoint's default), ``batch_size`` texts per forward.
    ``rm(prompts, completions, **ignored)`` (lists of N str) returns N floats."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype=None, batch_size: int = 16):
        if not os.path.isdir(path):
            raise ValueError(f"reward model path {path!r} does not exist or is not a directory")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        import transformers  # slow to import, and only reward models need it

        from .modeling import check_safetensors_weights

        check_safetensors_weights(path, Path(path))

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        # `dtype=` replaced `torch_dtype=` in transformers 4.56; older releases only know the latter.
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = {} if dtype is None else {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, **dtype_kw
        )
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path!r} has num_labels={self.model.config.num_labels}, expected 1")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The classification head pools at the last non-pad token, which only works with right padding.
        self.tokenizer.padding_side = "right"
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_length = _longest_input(self.tokenizer, self.model.config)
        self.__name__ = os.path.basename(os.path.normpath(path))

    def format(self, prompt, completion) -> str:
        """The text scored for one (prompt, completion) pair; either may be a string or a message list."""
        completion = as_text(completion)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages.append({"role": "assistant", "content": completion})
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not isinstance(prompt, str):
            prompt = "\n".join(m["content"] for m in prompt)
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts for {len(completions)} completions")
        texts = [self.format(p, c) for p, c in zip(prompts, completions, strict=True)]
        if self.max_length is not None:
            # The completion is at the end: a text too long for the model keeps its end, cut before
            # it is tokenized so a prompt of megabytes costs what its kept tokens cost.
            texts = [text_tail(self.tokenizer, t, self.max_length) for t in texts]
        # A chat template already writes the special tokens; adding them again would double the BOS.
        special = not getattr(self.tokenizer, "chat_template", None)
        cut = {"truncation": True, "max_length": self.max_length} if self.max_length is not None else {}
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
        scores: list[float] = []
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=special,
                    **cut,
                ).to(self.device)
                scores += self.model(**enc).logits[:, 0].float().tolist()
        finally:
            self.tokenizer.truncation_side = side
        return scores


def _longest_input(tokenizer, config) -> int | None:
    """The most tokens the reward model reads: its position table, or the tokenizer's own limit
    (transformers writes a huge sentinel when it has none); None when neither says."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return min(limits) if limits else None


def build_reward_functions(
    specs: Sequence[str],
    *,
    num_generations: int,
    max_completion_length: int,
    overlong_buffer: int,
    overlong_penalty_factor: float,
    device: str | torch.device = "cpu",
) -> list[tuple[str, RewardFunc]]:
    """Resolve each spec (a name from ``BUILTIN_REWARDS``, ``"module:function"``, or a local reward
    model directory) to a ``(name, function)`` pair. Names must be unique."""
    out: list[tuple[str, RewardFunc]] = []
    for spec in specs:
        if spec == "accuracy":
            fn = accuracy_reward
        elif spec == "format":
            fn = format_reward
        elif spec == "soft_overlong":
            fn = make_soft_overlong_reward(max_completion_length, overlong_buffer, overlong_penalty_factor)
        elif spec == "length":
            fn = make_length_reward(num_generations)
        elif os.path.isdir(spec):
            fn = RewardModel(spec, device=device)
        elif ":" in spec:
            fn = load_reward_function(spec)
        else:
            raise ValueError(
                f"unknown reward {spec!r}: expected one of {', '.join(BUILTIN_REWARDS)}, "
                "'package.module:function', or a local reward model directory"
            )
        name = spec if spec in BUILTIN_REWARDS else getattr(fn, "__name__", None) or spec.rpartition(":")[2]
        if name in (n for n, _ in out):
            raise ValueError(f"duplicate reward function name {name!r} (from {spec!r})")
        out.append((name, fn))
    return out


class RewardOutput(NamedTuple):
    """``per_func``: float32 (N, F) raw values, NaN for None, a process function's step sum.
    ``rewards``: float32 (N,) weighted nansum of outcome values; NaN where every function gave None.
    ``steps``: None, or per completion a list of (token_index, weighted reward) from process functions,
    summed per index and sorted. ``metrics``: ``rewards/<name>/mean`` and ``/std`` over rows with a value."""

    per_func: torch.Tensor
    rewards: torch.Tensor
    steps: list[list[tuple[int, float]]] | None
    metrics: dict[str, float]


# Rewards leave the scorer as float32, and their differences (the advantages with scale_rewards="none")
# must fit float32 too: so each value, and each completion's weighted sum, stays within half its range.
REWARD_LIMIT = float(torch.finfo(torch.float32).max) / 2


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, numbers.Real) and abs(v) <= REWARD_LIMIT:  # False for NaN
        return float(v)
    return None


def _own_copy(value: Any) -> Any:
    """A copy of nested lists and dicts (their str/int/float leaves are immutable), so a reward function
    that edits its inputs in place cannot change what the next one scores."""
    if isinstance(value, list):
        return [_own_copy(v) for v in value] if any(isinstance(v, (list, dict)) for v in value) else list(value)
    if isinstance(value, dict):
        return {k: _own_copy(v) for k, v in value.items()}
    return value


class RewardFunctionError(RuntimeError):
    """A reward function raised: the message names it and what it raised."""


class RewardScorer:
    """Run reward functions over a batch and combine them.

    Args:
        funcs: ``(name, function)`` pairs, as from ``build_reward_functions``.
        weights: one finite float per function (default 1.0 each).
    """

    def __init__(self, funcs: Sequence[tuple[str, RewardFunc]], weights: Sequence[float] | None = None):
        self.funcs = list(funcs)
        self.names = [n for n, _ in self.funcs]
        if not self.funcs or len(set(self.names)) != len(self.names):
            raise ValueError(f"need at least one reward function, with unique names; got {self.names}")
        self.weights = [1.0] * len(self.funcs) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"got {len(self.weights)} reward weights for {len(self.funcs)} reward functions")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"reward weights must be finite, got {self.weights}")

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardOutput:
        """Score N completions. ``columns``: keyword columns passed to every function (list (N,) each)."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions")
        kwargs = {k: v for k, v in columns.items() if k not in ("prompts", "completions")}
        per_func = torch.full((n, len(self.funcs)), float("nan"), dtype=torch.float64)
        is_process = [False] * len(self.funcs)
        steps: list[dict[int, float]] = [{} for _ in range(n)]
        for j, ((name, fn), w) in enumerate(zip(self.funcs, self.weights, strict=True)):
            values = self._call(name, fn, prompts, completions, kwargs)
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"reward function {name!r} returned a {type(values).__name__}, expected a list")
            if len(values) != n:
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} completions")
            kinds = {isinstance(v, (list, tuple)) for v in values if v is not None}
            if len(kinds) > 1:
                raise ValueError(f"reward function {name!r} mixed outcome rewards and step lists in one call")
            is_process[j] = kinds == {True}
            for i, v in enumerate(values):
                if v is None:
                    continue
                if is_process[j]:
                    per_func[i, j] = self._add_steps(name, v, kwargs.get("completion_ids"), i, w, steps[i])
                elif (x := _number(v)) is None:
                    raise ValueError(
                        f"reward function {name!r} returned {v!r} for completion {i}: not a finite number "
                        f"within +-{REWARD_LIMIT:.3g}"
                    )
                else:
                    per_func[i, j] = x
        outcome = torch.tensor([not p for p in is_process], dtype=torch.bool)
        weighted = per_func[:, outcome] * torch.tensor(self.weights, dtype=torch.float64)[outcome]
        rewards = weighted.nansum(1)
        self._check_sums(rewards, per_func, outcome)
        rewards[per_func.isnan().all(1)] = float("nan")
        metrics: dict[str, float] = {}
        for j, name in enumerate(self.names):
            col = per_func[:, j][~per_func[:, j].isnan()]
            metrics[f"rewards/{name}/mean"] = col.mean().item()  # NaN when no row has a value
            # A single value has no spread, rather than an undefined sample std.
            metrics[f"rewards/{name}/std"] = col.std().item() if len(col) > 1 else 0.0 if len(col) else math.nan
        merged = [sorted(s.items()) for s in steps] if any(is_process) else None
        return RewardOutput(per_func.float(), rewards.float(), merged, metrics)

    @staticmethod
    def _call(name: str, fn: RewardFunc, prompts: list, completions: list, columns: dict[str, Any]) -> Any:
        """``fn`` on its own copy of every input. Whatever it raises, short of Ctrl-C, stops the run naming
        it: a ``sys.exit()`` inside a grader must not end training silently with exit status 0."""
        try:
            return fn(
                prompts=_own_copy(prompts),
                completions=_own_copy(completions),
                **{k: _own_copy(v) for k, v in columns.items()},
            )
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e

    def _check_sums(self, rewards: torch.Tensor, per_func: torch.Tensor, outcome: torch.Tensor) -> None:
        """Each completion's weighted sum within the limit its values are held to, naming the functions."""
        over = (rewards.abs() > REWARD_LIMIT).nonzero().flatten().tolist()
        if over:
            i = over[0]
            names = [n for j, n in enumerate(self.names) if outcome[j] and not per_func[i, j].isnan()]
            raise ValueError(
                f"the weighted sum of reward functions {', '.join(map(repr, names))} is {rewards[i].item():.3g} "
                f"for completion {i}: beyond +-{REWARD_LIMIT:.3g} (float32 advantages could not hold it)"
            )

    @staticmethod
    def _add_steps(name: str, pairs, completion_ids, i: int, weight: float, into: dict[int, float]) -> float:
        if completion_ids is None:
            raise ValueError(f"reward function {name!r} returned step rewards but 'completion_ids' is missing")
        total, length = 0.0, len(completion_ids[i])
        for pair in pairs:
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2
            idx, r = pair if ok else (None, None)
            if not (isinstance(idx, numbers.Integral) and not isinstance(idx, bool) and 0 <= idx < length):
                raise ValueError(
                    f"reward function {name!r} gave step {pair!r} for completion {i}: "
                    f"expected (token_index in [0, {length}), reward)"
                )
            if (x := _number(r)) is None:
                raise ValueError(
                    f"reward function {name!r} gave step reward {r!r} for completion {i}: not a finite number "
                    f"within +-{REWARD_LIMIT:.3g}"
                )
            into[int(idx)] = into.get(int(idx), 0.0) + weight * x
            total += x
        if abs(total) > REWARD_LIMIT:
            raise ValueError(
                f"reward function {name!r} gave steps summing to {total:.3g} for completion {i}: "
                f"beyond +-{REWARD_LIMIT:.3g}"
            )
        return total
