"""Prompt datasets: loading, column checks, chat formatting and a resumable prompt order."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_dataset(
    name: str, split: str, prompt_column: str, answer_column: str | None, config_name: str | None = None
):
    """A ``datasets.Dataset`` from a local json/jsonl/parquet/csv file or a hub name.

    Raises ValueError (before anything heavy) when the file does not exist, the format is
    unknown, or a named column is missing (the message lists the columns the data has).
    """
    import datasets

    path = Path(os.path.expanduser(name))
    looks_local = path.suffix.lower() in _LOCAL_FORMATS or name.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.is_file():
            raise ValueError(f"dataset file {name!r} does not exist")
        fmt = _LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"dataset {name!r}: unknown file type; use one of {sorted(_LOCAL_FORMATS)}")
        ds = datasets.load_dataset(fmt, data_files={split: str(path)}, split=split)
    else:
        try:
            ds = datasets.load_dataset(name, config_name, split=split)
        except Exception as e:  # offline, unknown name, unknown split: one clear line
            raise ValueError(f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}") from e
    for what, column in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no {what} {column!r}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} (split {split!r}) is empty")
    return ds


def format_prompt(tokenizer, prompt: Any, system_prompt: str | None) -> str:
    """Prompt text for generation: the chat template when the tokenizer has one.

    ``prompt`` is a string (one user message) or a list of ``{"role", "content"}`` messages.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system_prompt and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("chat-message prompts need a tokenizer with a chat_template")
    return f"{system_prompt}\n\n{prompt}" if system_prompt else prompt


class PromptSampler:
    """Indices into the dataset in a seeded order, reshuffled every epoch; its state is two ints,
    so a resumed run sees exactly the prompts an uninterrupted run would have seen."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.position])
            self.position += 1
        return out

    @property
    def prompts_seen(self) -> int:
        return self.epoch * self.size + self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()
