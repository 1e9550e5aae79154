"""Checkpoints written atomically: a temporary directory renamed into place, so a crash
mid-save never leaves a half-written checkpoint where ``latest`` would find it."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
# What a save killed midway leaves: its unpublished copy (mkdtemp's ".checkpoint-N.xxxx") or, when it
# was re-saving a step, the old copy moved aside (".checkpoint-N.old").
_PARTIAL = re.compile(rf"^\.{PREFIX}\d+\.")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(
    output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], config_yaml: str
) -> Path:
    """Write ``<output_dir>/checkpoint-<step>``: model and tokenizer (``save_pretrained``),
    ``trainer_state.pt`` (optimizer, scheduler, RNG, step, data order, counters) and
    ``config.yaml``. Returns the final path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", dir=output_dir))
    try:
        # mkdtemp makes the directory 0700; once renamed into place it is the checkpoint, which
        # other users (an evaluation or serving job) should read as they read output_dir.
        os.chmod(tmp, 0o777 & ~_umask())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # re-saving a step: move the old copy aside first, delete it last
            old = output_dir / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete what killed saves left in ``output_dir`` (never a complete checkpoint); returns what went.
    For a resume: only one run writes into an output_dir at a time."""
    output_dir = Path(output_dir)
    gone = [p for p in output_dir.iterdir() if p.is_dir() and _PARTIAL.match(p.name)] if output_dir.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    if keep is None:
        return
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """``"latest"`` (the newest complete checkpoint in ``output_dir``) or a checkpoint path."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from_checkpoint='latest' but {str(output_dir)!r} has no checkpoint")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume_from_checkpoint {spec!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_trainer_state(path: Path) -> dict[str, Any]:
    # Our own file holding RNG states (numpy arrays, tuples), so the full unpickler is needed.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
