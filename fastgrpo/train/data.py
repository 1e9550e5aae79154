"""Prompt datasets: loading, column checks, chat formatting and a resumable prompt order."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from .hub import hub_offline, hub_source, is_local_dataset

# (hub.LOCAL_DATA_SUFFIXES lists the same suffixes: a name ending so is read from disk)
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_dataset(
    name: str, split: str, prompt_column: str, answer_column: str | None, config_name: str | None = None
):
    """A ``datasets.Dataset`` from a local json/jsonl/parquet/csv file, a local folder of such files (one
    format), or a hub name.

    Raises ValueError (before anything heavy) when the file does not exist or is empty, a folder holds no
    data file, the format is unknown, a named column is missing (the message lists the columns the data
    has), or the prompt column holds something other than strings or chat-message lists.
    """
    import datasets

    path = Path(os.path.expanduser(name))
    if is_local_dataset(name):
        files, fmt = _local_files(name, path)
        try:
            ds = datasets.load_dataset(fmt, data_files={split: [str(f) for f in files]}, split=split)
        except Exception as e:  # a malformed file: one line naming it, not the loader's traceback
            raise ValueError(f"could not read dataset {name!r}: {type(e).__name__}: {e}") from e
    else:
        # The hub unreachable (or an offline variable set): the cached copy, or one line now, not retries.
        local_only = hub_source("--dataset", name, "dataset")
        try:
            with hub_offline(local_only):
                ds = datasets.load_dataset(name, config_name, split=split)
        except Exception as e:  # offline, unknown name, unknown split: one clear line
            raise ValueError(f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}") from e
    for what, column in (("prompt_column", prompt_column), ("answer_column", answer_column)):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"dataset {name!r} has no {what} {column!r}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} (split {split!r}) is empty")
    for i, prompt in enumerate(ds[prompt_column]):
        if not _is_prompt(prompt):
            raise ValueError(
                f"dataset {name!r}: prompt_column {prompt_column!r} must hold strings or lists of "
                f"{{'role', 'content'}} messages; row {i} holds {type(prompt).__name__} {str(prompt)[:60]!r}"
            )
    return ds


def _local_files(name: str, path: Path) -> tuple[list[Path], str]:
    """The data files of a local ``--dataset`` (a file, or a folder's files of one format) and their format."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _LOCAL_FORMATS)
        if not files:
            raise ValueError(f"dataset folder {name!r} holds no data file ({', '.join(sorted(_LOCAL_FORMATS))})")
        formats = {_LOCAL_FORMATS[p.suffix.lower()] for p in files}
        if len(formats) > 1:
            raise ValueError(f"dataset folder {name!r} mixes formats {sorted(formats)}; keep one")
    elif not path.is_file():
        raise ValueError(f"dataset file {name!r} does not exist")
    else:
        if path.suffix.lower() not in _LOCAL_FORMATS:
            raise ValueError(f"dataset {name!r}: unknown file type; use one of {sorted(_LOCAL_FORMATS)}")
        files = [path]
    if all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"dataset {name!r} is empty (no rows)")
    return files, _LOCAL_FORMATS[files[0].suffix.lower()]


def _is_prompt(prompt: Any) -> bool:
    """A string, or a non-empty list of chat messages with string roles and contents."""
    if isinstance(prompt, str):
        return True
    return (
        isinstance(prompt, list)
        and bool(prompt)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt)
    )  # fmt: skip


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
    """Indices into the dataset in a seeded order, reshuffled every epoch; its state is the epoch, the
    position in it and the dataset size, so a resumed run sees exactly the prompts an uninterrupted run
    would have seen (or is refused, when the dataset is not the one it was saved with)."""

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
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """ValueError when ``state`` was saved over a dataset of another size: the order is a shuffle of
        that many prompts, so a position in it means nothing here (and past the end, an IndexError later).
        States saved before the size was recorded are checked by their position only."""
        epoch, position = int(state["epoch"]), int(state["position"])
        saved = state.get("size")
        if saved is not None and int(saved) != self.size:
            raise ValueError(
                f"the checkpoint's dataset has {int(saved)} prompts, this dataset has {self.size}: resume with the "
                "dataset the checkpoint was trained on"
            )
        if epoch < 0 or not 0 <= position <= self.size:
            raise ValueError(
                f"the checkpoint's data position (epoch {epoch}, prompt {position}) is past this dataset's "
                f"{self.size} prompts: resume with the dataset the checkpoint was trained on"
            )
        self.epoch, self.position = epoch, position
        self._order = self._make_order()
