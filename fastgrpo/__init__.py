"""fastgrpo: fused GRPO-family losses computed from hidden states, never from full logits.

Three wings, one per use: ``fastgrpo.ops`` (the fused ops other trainers import; its public names
are re-exported here), ``fastgrpo.train`` (``fastgrpo train``) and ``fastgrpo.integrations``
(TRL, verl).
"""

from . import ops
from .ops import *  # noqa: F403

__version__ = "0.1.0"
__all__ = list(ops.__all__)
