"""verl adapter: fastgrpo's exact lm_head log-probs and entropy behind verl's fused-kernel hook.

verl (checked against verl 0.9.1) computes per-token log-probs and entropies straight from the
final hidden states when ``actor_rollout_ref.model.use_fused_kernels=True`` and
``fused_kernel_options.impl_backend=triton``: its model forward patches
(``verl/models/transformers/dense_common.py``, ``qwen2_vl.py``, ``qwen3_vl.py``, ``qwen3_5.py``,
``glm4v.py``, selected in ``monkey_patch.py:patch_forward_with_backends``) and its Megatron
forwards (``verl/models/mcore/model_forward_fused.py``, ``model_forward_1f1b_overlap.py``) call
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
temperature, "none"[, tp_group])``. Policy losses only see the log-probs, but with
``entropy_coeff`` the entropy's gradient reaches the model too, so both outputs here are
differentiable w.r.t. ``hidden`` and ``weight``.

:func:`linear_cross_entropy` is a drop-in for that function, backed by
``fastgrpo.ops.chunked_logprobs``: exact, on any device (verl's own kernel asserts CUDA tensors
and ``hidden_size % 128 == 0``), with no (N, V) logits in memory on the fused path.
:func:`install` puts it in place of verl's, in verl's module and in every loaded module that
imported the name by value (the Megatron forwards do).

Use it from verl. In the environment verl runs in, install fastgrpo, then add to the training
command (Hydra overrides)::

    actor_rollout_ref.model.use_fused_kernels=True \\
    actor_rollout_ref.model.fused_kernel_options.impl_backend=triton \\
    actor_rollout_ref.model.external_lib=fastgrpo.integrations.verl_plugin

``external_lib`` is imported by ``HFModelConfig.__post_init__`` (``verl/workers/config/model.py``,
through ``verl.utils.import_utils.import_external_libs``), which each engine worker runs in
``init_model`` (``verl/workers/engine_workers.py``) before it builds its model. Instead of that
line, ``VERL_USE_EXTERNAL_MODULES=fastgrpo.integrations.verl_plugin`` works in every process whose
environment holds it: ``verl/__init__.py`` imports the listed modules at ``import verl``. Workers
of the local cluster verl's ``main_ppo`` starts inherit the launching shell's environment; on a
running cluster, set it where ``ray start`` runs or in ``ray_kwargs.ray_init.runtime_env.env_vars``.
``FASTGRPO_VERL_IMPL`` (default ``auto``; see ``fastgrpo.ops.IMPLS``) picks fastgrpo's path in the
workers. (verl also loads ``verl.plugins`` entry points at ``import verl``; fastgrpo declares none,
so nothing is patched unless asked for.)

Supported: verl's ``reduction`` values ("none", "sum", "mean", any case), (B, T, H) or (N, H)
hidden states, fp32/fp16/bf16, tied embeddings, no process group or a process group of world size
1 (Megatron with tensor parallel size 1). Refused with a ``ValueError``: a larger process group
(Megatron's vocabulary-parallel lm_head at tensor parallel size > 1), labels outside [0, V)
(verl's callers pass rolled input ids, never an ignore index). Outputs are flat (N,), as verl's
kernel returns them; verl 0.9.1's FSDP engine reads flat outputs on its remove-padding path
(``use_remove_padding=True``, the default) only: its padded path indexes ``log_probs.shape[1]``,
with verl's kernel as with this one.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.distributed as dist

from fastgrpo.ops import IMPLS, chunked_logprobs
from fastgrpo.ops.checks import values_checked

REDUCTIONS = ("none", "sum", "mean")
VERL_MODULE = "verl.utils.kernel.linear_cross_entropy"
# verl 0.9.1 modules that bind the name at import time; any other loaded module holding verl's
# function is found by the scan in ``install`` as well.
BY_VALUE_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_ORIGINAL = "_fastgrpo_original_linear_cross_entropy"


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: dist.ProcessGroup | None = None,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) and softmax entropy of ``hidden @ weight.T / temperature``, as verl's hook.

    Same positional order, defaults and outputs as
    ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` in verl 0.9.1: inputs are
    flattened to N = ``hidden.numel() // H`` tokens and the outputs are flat.

    Args:
        hidden: (..., H) fp32/fp16/bf16 final hidden states, e.g. (B, T, H), (N, H) or Megatron's
            (S, 1, H); any layout, flattened in row-major order.
        weight: (V, H) lm_head weight, same dtype and device as ``hidden``.
        labels: integer tensor (int32/int64) of N token ids in [0, V), any shape with N elements
            (e.g. (B, T), (N,), (1, S)), matched to ``hidden``'s tokens in row-major order.
        temperature: python number > 0; logits are divided by it before the softmax.
        reduction: "none", "sum" or "mean" (case-insensitive): reduction of the log-probs over
            the N tokens; the entropy is always per token.
        dist_process_group: None, or a ``torch.distributed`` process group of world size 1 (verl
            passes Megatron's tensor-parallel group). Vocabulary-sharded heads are refused.
        impl: fastgrpo's path, one of ``fastgrpo.ops.IMPLS`` ("auto": fused kernels on CUDA, the
            torch twin elsewhere).

    Returns:
        (log_probs, entropy), float32: log_probs (N,) for "none", a 0-dim tensor (sum or mean
        over the N tokens) otherwise; entropy (N,). Both are differentiable w.r.t. ``hidden`` and
        ``weight``; the gradients have their dtypes.
    """
    red = _check_call(hidden, labels, reduction)
    _check_process_group(dist_process_group)
    labels = labels.reshape(-1)
    _check_labels_range(labels, weight)
    logp, entropy = chunked_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels, temperature=temperature, return_entropy=True, impl=impl
    )
    if red == "sum":
        logp = logp.sum()
    elif red == "mean":
        logp = logp.mean()
    return logp, entropy


def _check_call(hidden, labels, reduction) -> str:
    """Checks verl's flat layout needs before ``chunked_logprobs`` sees the tensors; the reduction, lower case."""
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H) with at least 2 dims, got shape {tuple(hidden.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    n = hidden.shape[:-1].numel()
    if labels.numel() != n:
        raise ValueError(
            f"labels must hold one id per token of hidden {tuple(hidden.shape)} ({n}), "
            f"got shape {tuple(labels.shape)} ({labels.numel()})"
        )
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if isinstance(reduction, bool) or not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    red = reduction.lower()
    if red not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (any case), got {reduction!r}")
    return red


def _check_process_group(group) -> None:
    """Only an unsharded head is exact here: a process group must have world size 1."""
    if group is None:
        return
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"dist_process_group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
        )
    size = dist.get_world_size(group)
    if size != 1:
        raise ValueError(
            f"dist_process_group has world size {size}: a vocabulary-parallel lm_head (Megatron tensor "
            "parallel size > 1) is not supported; use tensor parallel size 1 or verl's own kernel"
        )


def _check_labels_range(labels, weight) -> None:
    """verl passes no ignore index, so an id outside [0, V) is a caller's bug: name the ids (flat labels)."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and values_checked() and labels.numel():
        vocab = weight.shape[0]
        bad = (labels < 0) | (labels >= vocab)
        if bool(bad.any()):
            t = labels[bad]
            raise ValueError(f"labels must lie in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]")


def make_hook(impl: str = "auto"):
    """:func:`linear_cross_entropy` with ``impl`` fixed, in verl's exact signature (what
    :func:`install` puts in place).

    Args:
        impl: str, one of ``fastgrpo.ops.IMPLS``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def hook(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group, impl=impl)

    hook.__name__ = hook.__qualname__ = "linear_cross_entropy"
    hook.__doc__ = f"fastgrpo's drop-in for verl's linear_cross_entropy (impl={impl!r}); see {__name__}."
    hook._fastgrpo_impl = impl
    return hook


def _is_ours(fn) -> bool:
    return hasattr(fn, "_fastgrpo_impl")


def install(impl: str = "auto") -> list[str]:
    """Replace verl's ``linear_cross_entropy`` with fastgrpo's, in this process.

    Patches ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (which verl's
    transformers forwards import at call time, and any module imported later binds) and the
    same name in every loaded module that holds verl's function (or an earlier install) by value.
    Idempotent; a second call switches ``impl``. Imports verl (and nothing else of it).

    Args:
        impl: str, fastgrpo's path inside verl, one of ``fastgrpo.ops.IMPLS``.

    Returns:
        The names of the patched modules, verl's own first.
    """
    hook = make_hook(impl)
    source = importlib.import_module(VERL_MODULE)
    current = source.linear_cross_entropy
    original = getattr(source, _ORIGINAL, None)
    if original is None:
        original = current
        setattr(source, _ORIGINAL, original)
    patched = [VERL_MODULE]
    source.linear_cross_entropy = hook
    for name, module in list(sys.modules.items()):
        if module is None or module is source:
            continue
        try:
            held = vars(module).get("linear_cross_entropy")
        except TypeError:  # an object without __dict__ posing as a module
            continue
        if held is not None and (held is original or held is current or _is_ours(held)):
            module.linear_cross_entropy = hook
            patched.append(name)
    return patched


def uninstall() -> list[str]:
    """Undo :func:`install`: verl's function back wherever fastgrpo's is.

    Returns:
        The names of the restored modules ([] if fastgrpo was not installed).
    """
    source = sys.modules.get(VERL_MODULE)
    original = None if source is None else getattr(source, _ORIGINAL, None)
    if original is None:
        return []
    restored = []
    for name, module in list(sys.modules.items()):
        try:
            held = None if module is None else vars(module).get("linear_cross_entropy")
        except TypeError:
            continue
        if held is not None and _is_ours(held):
            module.linear_cross_entropy = original
            restored.append(name)
    delattr(source, _ORIGINAL)
    return restored


def installed_impl() -> str | None:
    """The ``impl`` verl's hook runs with now, or None when verl's own kernel is in place (or verl
    is not imported)."""
    source = sys.modules.get(VERL_MODULE)
    fn = None if source is None else getattr(source, "linear_cross_entropy", None)
    return fn._fastgrpo_impl if _is_ours(fn) else None


def install_from_env() -> list[str]:
    """:func:`install` with ``impl`` from ``FASTGRPO_VERL_IMPL`` (default "auto"); what importing
    ``fastgrpo.integrations.verl_plugin`` runs."""
    return install(os.environ.get("FASTGRPO_VERL_IMPL", "auto"))
