"""Liger-Kernel's model-body kernels (RMSNorm, SwiGLU/GeGLU MLP, RoPE) on a loaded causal LM.

Only the body: fastgrpo's fused lm_head + loss replaces the head, so Liger's cross-entropy and
fused-linear-cross-entropy patches are always switched off, and every other Liger switch that is
not a body kernel (layer_norm, relu_squared, ...) is switched off too, so what runs is exactly
what :func:`apply_liger_body` returns.

Liger patches two ways, and the second is process-wide. The instance patch rebinds ``forward``
of the model's existing RMSNorm and MLP modules in place (same modules, same weight tensors, same
state_dict). The module patch rewrites the architecture's ``modeling_<arch>`` module: its
``apply_rotary_pos_emb`` becomes Liger's, so every instance of that architecture in the process
(a reference model too, patched or not) runs Liger RoPE from then on; and its RMSNorm/MLP classes
become Liger's, so a model of that architecture built afterwards gets Liger modules from the
start. Both compute the same functions as the torch code (to rounding), so a reference model
sharing them is fine; but within one process, "Liger off" cannot be restored for that architecture.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch

# Liger's switches that touch the body only. The order is that of the returned list.
BODY_KERNELS = ("rms_norm", "swiglu", "geglu", "rope")


def liger_available() -> bool:
    """Whether liger-kernel is installed (without importing it: that pulls in triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def _apply_fns() -> dict:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ValueError(f"use_liger_body needs liger-kernel ({e}): pip install liger-kernel") from None
    return MODEL_TYPE_TO_APPLY_LIGER_FN


def _body_switches(fn) -> dict[str, bool]:
    """Every boolean switch ``fn`` names explicitly: on for a body kernel, off for the rest. The
    defaults are not trusted: most apply functions default fused_linear_cross_entropy (and some
    layer_norm) to True. Switches that only reach ``fn`` through ``**kwargs`` (multimodal wrappers
    that forward them to a text model) are not used: what they do is not visible here."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.name in BODY_KERNELS for p in params if isinstance(p.default, bool)}


def liger_supported(model_type: str) -> bool:
    """Whether Liger has body kernels for this ``config.model_type`` (False when not installed)."""
    if not liger_available():
        return False
    fn = _apply_fns().get(model_type)
    return fn is not None and any(_body_switches(fn).values())


def apply_liger_body(model) -> list[str]:
    """Apply Liger's body kernels to ``model`` in place (a transformers causal LM or a peft
    ``PeftModel`` around one) and return their names, e.g. ``["rms_norm", "swiglu", "rope"]``.

    The lm_head, the model's ``forward`` and the loss are left alone. Also patches the
    architecture's modeling module process-wide (see the module docstring). Raises ValueError
    when liger-kernel is missing or has no body kernels for the model's architecture.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    fn = _apply_fns().get(model_type)
    switches = _body_switches(fn) if fn is not None else {}
    applied = [k for k in BODY_KERNELS if switches.get(k)]
    if not applied:
        raise ValueError(
            f"use_liger_body: liger-kernel has no body kernels for model_type {model_type!r}; "
            "set use_liger_body to false"
        )
    # Named explicitly even where the default is already False: a loss patch would replace
    # model.forward (fused linear CE) or torch's cross_entropy globally.
    switches.update(cross_entropy=False, fused_linear_cross_entropy=False)
    fn(model=base, **{k: v for k, v in switches.items() if k in inspect.signature(fn).parameters})
    return applied


def resolve_use_liger_body(spec: str | bool | None, device: torch.device | str, model_type: str | None = None) -> bool:
    """``auto`` (or None): on when the device is CUDA and liger-kernel is installed, and, when
    ``model_type`` is given, Liger supports it (pass it, or an unsupported architecture raises
    in :func:`apply_liger_body`); Liger's kernels are Triton GPU kernels. ``true``: on (problems
    surface in :func:`apply_liger_body`). ``false``: off."""
    value = spec.strip().lower() if isinstance(spec, str) else spec
    if value is None or value == "auto":
        if torch.device(device).type != "cuda" or not liger_available():
            return False
        return model_type is None or liger_supported(model_type)
    if isinstance(value, bool) or value in ("true", "false"):
        return value in (True, "true")
    raise ValueError(f"use_liger_body must be auto, true or false, got {spec!r}")
