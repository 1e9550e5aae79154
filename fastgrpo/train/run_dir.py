"""The output folder of one run: one writer at a time, and what a fresh run or a resume may do there.

- **One writer.** A run holds an exclusive ``fcntl.flock`` on ``.fastgrpo.lock`` for its lifetime, so a
  second run into the same folder is refused instead of interleaving its metrics and checkpoints. The
  kernel drops the lock of a killed process, so a stale lock file never blocks a resume.
- **A fresh run never replaces a run by default.** A folder that holds checkpoints or metrics rows needs
  ``resume_from_checkpoint`` or ``overwrite_output_dir``. An *owner* (the embedded default) may replace
  only a folder that carries its own mark, which it writes in folders it starts.
- **A resume from checkpoint N makes N the head of the timeline.** Later checkpoints and their metrics
  rows are moved (never deleted) into ``abandoned-after-step-N``, and the run says where.

Destructive or moving steps (``start_fresh``, ``rewind_to``) are separate from the checks, so a trainer
runs them only once its model has loaded: a mistyped ``--model`` costs nothing that was there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from . import checkpoint as ckpt
from .tracking import METRICS_FILE, read_metrics

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in the README's Safety paragraph)
    fcntl = None

LOCK_FILE = ".fastgrpo.lock"
OWNER_FILE = ".fastgrpo-owner"
ABANDONED = "abandoned-after-step-"


class OutputDirError(ValueError):
    """The output folder cannot be used as asked: one line naming it."""


class RunDir:
    """``output_dir`` made, checked writable and locked for this run. ``close()`` lets it go."""

    _lock = None

    def __init__(self, path: str | Path, owner: str | None = None):
        self.path = Path(path)
        self.owner = owner
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"output_dir {str(self.path)!r} is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = _acquire(self.path / LOCK_FILE)
        except PermissionError:
            raise OutputDirError(f"output_dir {str(self.path)!r} is not writable") from None
        except OSError as e:
            raise OutputDirError(f"output_dir {str(self.path)!r} cannot be used: {e.strerror or e}") from None
        if self._lock is False:
            raise OutputDirError(f"output_dir {str(self.path)!r} is in use by another run ({_holder(self.path)})")
        if not os.access(self.path, os.W_OK):
            self.close()
            raise OutputDirError(f"output_dir {str(self.path)!r} is not writable")

    def close(self) -> None:
        if self._lock:
            # Unlink before unlocking: a run that opened the old file re-checks its inode (``_acquire``).
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
            self._lock.close()
        self._lock = None

    def __del__(self):
        self.close()

    # ---- what is there -------------------------------------------------------------------------

    def run_records(self) -> list[str]:
        """What of an earlier run the folder holds, in words (empty: nothing)."""
        found = []
        n = len(ckpt.list_checkpoints(self.path))
        if n:
            found.append(f"{n} checkpoint{'s' * (n > 1)}")
        metrics = self.path / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size:
            found.append(f"{METRICS_FILE} ({len(read_metrics(metrics))} rows)")
        return found

    def _owned(self) -> bool:
        mark = self.path / OWNER_FILE
        return self.owner is not None and mark.is_file() and mark.read_text().strip() == self.owner

    # ---- a fresh run ---------------------------------------------------------------------------

    def check_fresh_start(self, overwrite: bool) -> None:
        """Refuse a fresh run in a folder holding another run's records, unless asked to replace them."""
        records = self.run_records()
        if records and not overwrite and not self._owned():
            raise OutputDirError(
                f"output_dir {str(self.path)!r} holds an earlier run ({', '.join(records)}); pass "
                "--resume_from_checkpoint latest to continue it or --overwrite_output_dir true to start afresh"
            )

    def start_fresh(self) -> list[str]:
        """Remove an earlier run's checkpoints, abandoned timelines and metrics (``check_fresh_start``
        allowed it) and mark the folder as the owner's. Returns what went, in words."""
        gone = [p for p in ckpt.list_checkpoints(self.path)] + sorted(self.path.glob(f"{ABANDONED}*"))
        for path in gone:
            shutil.rmtree(path)
        said = [p.name for p in gone]
        metrics = self.path / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size:
            said.append(METRICS_FILE)
        metrics.write_text("")
        if self.owner is not None:
            (self.path / OWNER_FILE).write_text(self.owner + "\n")
        return said

    # ---- a resume ------------------------------------------------------------------------------

    def recover_and_clean(self) -> None:
        """Restore a checkpoint whose re-save was killed between its renames, then delete what other
        killed saves left (never complete, often GBs). Safe only under the lock."""
        for path in ckpt.recover_interrupted_saves(self.path):
            print(f"output_dir: restored {path.name}, whose re-save was interrupted", flush=True)
        ckpt.remove_partial_checkpoints(self.path)

    def resolve_resume(self, spec: str, overwrite: bool) -> Path:
        """The checkpoint to resume from (``latest``: the newest complete one, saying which it passed
        over). One from elsewhere may start a folder that holds no run (or one ``overwrite`` replaces)."""
        path, skipped = ckpt.resolve_checkpoint(spec, self.path)
        for line in skipped:
            print(f"resume: {line}; passing over it", flush=True)
        if not self._inside(path):
            records = self.run_records()
            if records and not overwrite:
                raise OutputDirError(
                    f"resume_from_checkpoint {spec!r} is not in output_dir {str(self.path)!r}, which holds another "
                    f"run ({', '.join(records)}); resume into an empty output_dir, or pass --overwrite_output_dir true"
                )
        return path

    def _inside(self, path: Path) -> bool:
        return Path(path).resolve().parent == self.path.resolve()

    def rewind_to(self, step: int) -> Path | None:
        """Make ``step`` the head of this folder's timeline: move later checkpoints, and the metrics rows
        after ``step`` when any checkpoint moves, into ``abandoned-after-step-<step>``. Returns that folder
        (None when nothing was later)."""
        later = [p for p in ckpt.list_checkpoints(self.path) if ckpt.step_of(p) > step]
        if not later:
            return None
        dest = self.path / f"{ABANDONED}{step}"
        k = 1
        while dest.exists():
            k += 1
            dest = self.path / f"{ABANDONED}{step}-{k}"
        dest.mkdir()
        for path in later:
            os.replace(path, dest / path.name)
        metrics = self.path / METRICS_FILE
        rows = [r for r in read_metrics(metrics) if r.get("step", 0) > step] if metrics.is_file() else []
        if rows:
            (dest / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        names = ", ".join(p.name for p in later)
        print(
            f"resume from step {step}: the later timeline ({names}, {len(rows)} metrics rows) moved to {dest}; "
            "delete it when no longer needed",
            flush=True,
        )
        return dest


def _acquire(path: Path):
    """An open file holding the exclusive lock on ``path``, or False when another process holds it."""
    if fcntl is None:
        return None
    while True:
        f = open(path, "a+")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we opened it
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            return f
        f.close()


def _holder(path: Path) -> str:
    try:
        return (path / LOCK_FILE).read_text().strip() or "no details"
    except OSError:
        return "no details"
