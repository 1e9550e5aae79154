"""What every benchmark records next to its figures: device, package versions, commit, command."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "trl")


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD, or the COMMIT file a copied tree carries (the GPU machine's copy has no .git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    commit_file = REPO / "COMMIT"
    return commit_file.read_text().strip() if commit_file.is_file() else "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def environment(device: torch.device) -> dict:
    return dict(
        device=device_name(device),
        **{pkg: version(pkg) for pkg in PACKAGES},
        python=sys.version.split()[0],
        git_commit=git_commit(),
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([sys.executable, *sys.argv]),
    )
