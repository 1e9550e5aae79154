"""What a resume takes from its checkpoint and what from this run's settings.

A checkpoint restores the weights, the optimizer's moments, the learning-rate schedule's position, the
RNG states and the position in the prompt order. A setting given now that differs from the one saved
(the checkpoint's ``config.yaml``) is either

- **refused**, in one line naming it, when the checkpoint's state would silently override it (the seed
  and the prompt order, which the restored RNG and sampler position belong to; LoRA shapes and scaling,
  which come back with the adapters' own ``adapter_config.json``); or
- **applied** from the next step, and said in one line. The optimizer's hyper-parameters are the one
  place a state load would override them, so ``apply_optimizer_settings`` writes them back.

So config.yaml never records a value the run did not use.
"""

from __future__ import annotations

import math
from typing import Any

from .config import Config

# Where the run is written, not what it trains: never reported.
_LOCATION = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")
REFUSED = {
    "seed": "the checkpoint restores the random state and prompt order of the seed it was saved with",
    "shuffle_dataset": "the checkpoint's position in the prompt order belongs to the saved order",
}
# With use_peft the adapters resume with the configuration saved beside them.
REFUSED_WITH_PEFT = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
OPTIMIZER_FIELDS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "max_steps", "num_iterations",
                   "num_train_epochs")  # fmt: skip


def _flat(cfg: Config) -> dict[str, Any]:
    return {k: v for section in cfg.to_dict().values() for k, v in section.items()}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def changed_settings(saved: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for every field the checkpoint's config.yaml holds with another value."""
    now = _flat(cfg)
    return {k: (saved[k], v) for k, v in now.items() if k in saved and k not in _LOCATION and not _same(saved[k], v)}


def check_resume_settings(changes: dict[str, tuple[Any, Any]], cfg: Config, checkpoint: str) -> str | None:
    """Raise ``ValueError`` naming the settings a resume cannot honour; else the line that says what
    changed and is applied (None when nothing did)."""
    refused = {k: why for k, why in REFUSED.items() if k in changes}
    if cfg.use_peft:
        why = "the adapters resume with the configuration saved beside them (adapter_config.json)"
        refused.update({k: why for k in REFUSED_WITH_PEFT if k in changes})
    if refused:
        parts = [f"--{k} {_show(changes[k][1])} (saved: {_show(changes[k][0])})" for k in refused]
        raise ValueError(
            f"resume_from_checkpoint {checkpoint!r}: {', '.join(parts)} cannot apply to a resumed run: "
            f"{next(iter(refused.values()))}; resume with the saved value or start a new run"
        )
    if not changes:
        return None
    listed = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())
    return f"resume: settings changed since the checkpoint, applied from the next step: {listed}"


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return " ".join(map(str, v))
    return str(v)


def apply_optimizer_settings(optimizer, scheduler, cfg: Config, changes: dict[str, tuple[Any, Any]]) -> None:
    """Write this run's optimizer hyper-parameters over the ones the state load restored, and put the
    learning rate where this run's schedule has it at the restored position. Nothing when none changed,
    so an unchanged resume continues bit for bit."""
    if not any(k in changes for k in (*OPTIMIZER_FIELDS, *SCHEDULE_FIELDS)):
        return
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["weight_decay"], group["eps"] = cfg.weight_decay, cfg.adam_epsilon
        if "betas" in group:  # torch's AdamW
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        else:  # torch-optimi's
            group["beta1"], group["beta2"] = cfg.adam_beta1, cfg.adam_beta2
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = cfg.learning_rate * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
