"""Checkpoints written atomically and read without running anything they hold.

A save writes a temporary directory and renames it into place, so a crash mid-save never leaves a
half-written checkpoint where ``latest`` would find it. ``trainer_state.pt`` is read with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers only (plus numpy's
array reconstruction, which checkpoints written before RNG states were stored as lists need), so a
checkpoint someone else wrote cannot run code here. Weights are safetensors (``save_pretrained``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
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
_OLD_COPY = re.compile(rf"^\.({PREFIX}\d+)\.old$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: refused or damaged. One line, naming the file."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        # Plain values, not an ndarray: the state file then loads with weights_only and no allow-list.
        state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
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

        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


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


def recover_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Put back a checkpoint whose re-save was killed between its two renames: ``checkpoint-N`` had been
    moved to ``.checkpoint-N.old`` and the new copy not yet renamed in. Returns the restored paths."""
    output_dir = Path(output_dir)
    restored = []
    for path in sorted(output_dir.iterdir()) if output_dir.is_dir() else []:
        match = _OLD_COPY.match(path.name)
        final = output_dir / match.group(1) if match else None
        if final is not None and not final.exists() and checkpoint_problem(path) is None:
            os.replace(path, final)
            restored.append(final)
    return restored


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete what killed saves left in ``output_dir`` (never a complete checkpoint); returns what went.
    Only for the run holding the output folder's lock (``run_dir``), after ``recover_interrupted_saves``."""
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


def step_of(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(spec: str, output_dir: str | Path) -> tuple[Path, list[str]]:
    """``"latest"`` (the newest complete checkpoint in ``output_dir``) or a checkpoint path, verified.

    Returns ``(path, skipped)``: ``skipped`` says, a line each, which newer checkpoints ``latest``
    passed over (cut short, refused). A named checkpoint that cannot be used raises ``CheckpointError``.
    """
    if spec != "latest":
        path = Path(spec)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"resume_from_checkpoint {spec!r} is not a checkpoint directory (no {STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem:
            raise CheckpointError(f"resume_from_checkpoint {spec!r} cannot be resumed from: {problem}")
        return path, []
    found = list_checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"resume_from_checkpoint='latest' but {str(output_dir)!r} has no checkpoint")
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name} cannot be resumed from ({problem})")
    raise CheckpointError(f"resume_from_checkpoint='latest': no usable checkpoint in {str(output_dir)!r}: {skipped[0]}")


def checkpoint_problem(path: Path) -> str | None:
    """What keeps ``path`` from being resumed from, in a few words, or None. Cheap: the state file's
    archive directory and every safetensors header are read, not the tensors."""
    path = Path(path)
    try:
        _load(path / STATE_FILE, mmap=True)
    except CheckpointError as e:
        return str(e)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            return f"{file.name}: {problem}"
    if not (path / "config.yaml").is_file():
        return "no config.yaml"
    return None


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"cut short ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"cut short ({size} bytes, its header alone says {n + 8})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    return None if size >= need else f"cut short ({size} of {need} bytes)"


def _numpy_globals() -> list:
    """What unpickling a numpy array needs: checkpoints written before RNG states were stored as lists
    hold numpy's legacy RNG state array."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load(file: Path, mmap: bool = False) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{file} is refused: it holds more than tensors, numbers and containers ({what or 'see torch.load'}); "
            "fastgrpo never unpickles code from a checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file} is damaged or incomplete ({first})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{file} is not a fastgrpo trainer state")
    return state


def load_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of checkpoint ``path``, loaded with ``weights_only=True`` (``CheckpointError``
    names the file when it is refused or damaged)."""
    return _load(Path(path) / STATE_FILE)


def load_saved_config(path: Path) -> dict[str, Any]:
    """The checkpoint's ``config.yaml`` as flat ``{field: value}`` (sections merged); {} when absent."""
    import yaml

    file = Path(path) / "config.yaml"
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid YAML ({type(e).__name__})") from None
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat
