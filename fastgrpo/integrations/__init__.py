"""Adapters that put fastgrpo's fused loss inside other trainers.

- ``fastgrpo.integrations.trl``: ``GRPOTrainer``, a drop-in subclass of TRL's, whose log-probs,
  entropies and loss come from the lm_head through ``fastgrpo.ops``.
- ``fastgrpo.integrations.verl``: verl's ``linear_cross_entropy`` hook backed by
  ``fastgrpo.ops.chunked_logprobs``; ``fastgrpo.integrations.verl_plugin`` installs it in verl's
  workers.

Like ``fastgrpo.train``, they use ``fastgrpo.ops`` and nothing imports them back. Neither TRL nor
verl is imported until its adapter is.
"""

from __future__ import annotations

import importlib.util

TRL_INSTALL = "pip install 'fastgrpo[trl]'"  # TRL is an extra: the Quickstart's install has none


def trl_missing() -> str | None:
    """``"trl not installed (pip install 'fastgrpo[trl]')"`` where ``trl`` cannot be found, else None.

    Imports nothing, so a command can say it before building anything."""
    return None if importlib.util.find_spec("trl") is not None else f"trl not installed ({TRL_INSTALL})"
