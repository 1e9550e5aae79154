"""``fastgrpo train`` from a config as the command line built it: the embedded default made an input
(:func:`.embedded.resolve`), then the loop."""

from __future__ import annotations

from typing import Any

from .config import Config
from .embedded import resolve
from .trainer import GRPOTrainer


def train(cfg: Config) -> list[dict[str, Any]]:
    """Run ``fastgrpo train``; with no model named, the embedded default. Returns the metrics rows."""
    job = resolve(cfg)
    return GRPOTrainer(job.cfg, title=job.title, owner=job.owner).train()
