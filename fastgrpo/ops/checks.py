"""Argument checks of the public fused ops: type, shape, dtype and device first, then values.

Every check raises ``TypeError`` or ``ValueError`` naming the argument, before any kernel runs.
Value checks read data back to the host, so they are skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name, x, *, dims=None, dtypes=None, integer=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    if integer and (x.dtype == torch.bool or x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")


def check_same(name, x, ref_name, ref, *, shape=None, dtype=True):
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def values_checked() -> bool:
    # Value checks read data back to the host; skip them while torch.compile traces.
    return not torch.compiler.is_compiling()


def check_head(hidden, weight, targets, bias):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dims=(2,), dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, integer=True)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., H), got shape {tuple(hidden.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's leading dims), got {tuple(targets.shape)}"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}) to match hidden, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    check_same("weight", weight, "hidden", hidden)
    check_same("targets", targets, "hidden", hidden, dtype=False)
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), dtypes=FLOAT_DTYPES)
        check_same("bias", bias, "weight", weight, shape=(weight.shape[0],))


def check_targets_range(targets, vocab, where=None):
    if not values_checked() or targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        raise ValueError(_targets_message(targets, bad, vocab))


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_workspace_bytes(workspace_bytes):
    if workspace_bytes is None:
        return None
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"workspace_bytes must be an int or None, got {type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be > 0, got {workspace_bytes}")
    return workspace_bytes


GRAD_ACCUMULATIONS = ("fp32", "input")


def check_grad_accumulation(value) -> str:
    if value not in GRAD_ACCUMULATIONS:
        raise ValueError(f"grad_accumulation must be one of {GRAD_ACCUMULATIONS}, got {value!r}")
    return value


def check_grad_filter_eps(eps) -> float:
    """``grad_filter_eps`` as a float; None means off, the same as the default 0."""
    if eps is None:
        return 0.0
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"grad_filter_eps must be a number or None, got {type(eps).__name__}")
    if not 0 <= eps < 1:  # also refuses NaN and inf
        raise ValueError(f"grad_filter_eps must be in [0, 1) (0 = exact, 2**-12 suits bf16), got {eps}")
    return float(eps)


def check_loss_inputs(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    old_logprobs,
    ref_logprobs,
    bias,
    beta,
    num_items,
    sampling_logprobs=None,
    entropy_mask=None,
):
    """Types, shapes and devices of ``fused_grpo_loss``'s tensors. Returns ``num_items`` as the
    loss takes it: a tensor moved to fp32 on hidden's device, a number or None as it came."""
    check_tensor("hidden", hidden, dims=(3,))
    check_head(hidden, weight, targets, bias)
    B, T = targets.shape
    check_tensor("mask", mask)
    check_same("mask", mask, "targets", targets, shape=(B, T), dtype=False)
    if entropy_mask is not None:
        check_tensor("entropy_mask", entropy_mask)
        check_same("entropy_mask", entropy_mask, "targets", targets, shape=(B, T), dtype=False)
    check_tensor("advantages", advantages, dims=(1, 2))
    if not advantages.is_floating_point():
        raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    check_same("advantages", advantages, "hidden", hidden, dtype=False)
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("ref_logprobs", ref_logprobs),
        ("sampling_logprobs", sampling_logprobs),
    ):
        if x is not None:
            check_tensor(name, x)
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
            check_same(name, x, "targets", targets, shape=(B, T), dtype=False)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (B, T)")
    if num_items is None:
        return None
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float, torch.Tensor)):
        raise TypeError(f"num_items_in_batch must be a number or tensor, got {type(num_items).__name__}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:  # a per-row tensor would broadcast into a per-row "loss"
            raise ValueError(f"num_items_in_batch must be a scalar, got a tensor of shape {tuple(num_items.shape)}")
        return num_items.reshape(()).to(device=hidden.device, dtype=torch.float32)
    if not num_items > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items}")
    return num_items


def check_loss_values(mask, active, advantages, num_items, targets, vocab, ratio, entropy_mask=None) -> int | None:
    """The values ``check_loss_inputs`` cannot see without reading the data back, read back in one
    transfer together with the number of active tokens, which that returns (so the chunked path
    gathers them without a second sync). None while torch.compile traces: no check, no count.

    ``ratio`` is ``importance_sampling_ratio`` after ``check_sampling_ratio``'s shape checks, or None.
    """
    if not values_checked():
        return None
    tests = []  # (flag tensor, message or a function making it): the first set flag raises, in this order
    if mask.dtype != torch.bool:
        tests.append((((mask != 0) & (mask != 1)).any(), "mask must hold only 0 and 1"))
    if entropy_mask is not None and entropy_mask.dtype != torch.bool:
        tests.append((((entropy_mask != 0) & (entropy_mask != 1)).any(), "entropy_mask must hold only 0 and 1"))
    adv = advantages if advantages.dim() == 1 else torch.where(active, advantages, 0.0)
    tests.append((~torch.isfinite(adv).all(), "advantages must be finite (where mask is set)"))
    if isinstance(num_items, torch.Tensor):
        # Formatted only on failure: printing a device tensor reads it back.
        tests.append((~(num_items > 0).all(), lambda: f"num_items_in_batch must be > 0, got {num_items}"))
    bad_targets = ((targets < 0) | (targets >= vocab)) & active
    tests.append((bad_targets.any(), lambda: _targets_message(targets, bad_targets, vocab)))
    if ratio is not None:
        live = ratio.expand(targets.shape)
        ok = (torch.isfinite(live) & (live >= 0)) | ~active
        tests.append((~ok.all(), "importance_sampling_ratio must be finite and >= 0 where mask is set"))
    count, *flags = read_back(torch.stack([active.sum()] + [flag.to(torch.int64) for flag, _ in tests]))
    for flag, (_, message) in zip(flags, tests, strict=True):
        if flag:
            raise ValueError(message() if callable(message) else message)
    return count


def read_back(values: torch.Tensor) -> list[int]:
    """The one device-to-host transfer of a loss call's checks (tests count the calls)."""
    return values.tolist()


def _targets_message(targets, bad, vocab) -> str:
    t = targets[bad]
    return f"targets must lie in [0, {vocab}), got values in [{int(t.min())}, {int(t.max())}]"


def check_sampling_ratio(ratio, targets) -> None:
    """``importance_sampling_ratio``'s type and shape: (B, T) or (B, 1) float (its values: ``check_loss_values``)."""
    if ratio is None:
        return
    B, T = targets.shape
    check_tensor("importance_sampling_ratio", ratio, dims=(2,))
    if not ratio.is_floating_point():
        raise TypeError(f"importance_sampling_ratio must be a floating tensor, got {ratio.dtype}")
    if tuple(ratio.shape) not in ((B, T), (B, 1)):
        raise ValueError(f"importance_sampling_ratio must have shape ({B}, {T}) or ({B}, 1), got {tuple(ratio.shape)}")
    check_same("importance_sampling_ratio", ratio, "targets", targets, dtype=False)


# Model config fields that change the logits after the lm_head. TRL's own fused head reads the same
# families (Gemma, Cohere, Granite, MiniCPM, Falcon-H1, HyperCLOVA X). ``head_transform`` maps the ones
# whose meaning is known to the loss's head fields; the rest are refused by name.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logits_soft_cap",  # RecurrentGemma's softcap, always applied
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
    "output_multiplier_scale",
)
# ``logits_scaling`` divides in the Granite families and multiplies in HyperCLOVA X; ``logit_scale`` multiplies in
# the Cohere families (elsewhere, e.g. MPT's config, transformers' head does not apply it).
_LOGITS_SCALING_DIVIDES = ("granite",)
_LOGITS_SCALING_MULTIPLIES = ("hyperclovax",)
_LOGIT_SCALE_MULTIPLIES = ("cohere",)
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


def _text_configs(model) -> list:
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):  # multimodal configs keep text settings nested
        configs.append(model.config.get_text_config())
    return configs


def _positive(attr: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"model config sets {attr}={value!r}; the fused loss needs a finite number > 0 there")
    return float(value)


def _scale_of(attr: str, value, model_type: str) -> float | None:
    """The logit multiplier a config field means, or None where its meaning is not known here."""
    if attr == "logit_scale" and model_type.startswith(_LOGIT_SCALE_MULTIPLIES):
        return _positive(attr, value)
    if attr == "logits_scaling" and model_type.startswith(_LOGITS_SCALING_DIVIDES):
        return 1.0 / _positive(attr, value)
    if attr == "logits_scaling" and model_type.startswith(_LOGITS_SCALING_MULTIPLIES):
        return _positive(attr, value)
    return None


def head_transform(model) -> dict:
    """The logit transform of a transformers causal LM's head, as ``GRPOLossParams``' head fields
    (``logit_scale``, ``final_logit_softcapping``): the fused ops compute softmax(t(h @ W.T + b) / temperature)
    with t(z) = logit_scale * z, softcapped by final_logit_softcapping * tanh(. / final_logit_softcapping). A
    model whose head changes the logits otherwise would be trained on the wrong distribution: refused by name."""
    out = {"logit_scale": 1.0, "final_logit_softcapping": None}
    for cfg in _text_configs(model):
        model_type = str(getattr(cfg, "model_type", "") or "")
        for attr in LOGIT_TRANSFORMS:
            value = getattr(cfg, attr, None)
            if attr in _SOFTCAPS:
                if value is not None:
                    out["final_logit_softcapping"] = _positive(attr, value)
                continue
            if value in (None, 1, 1.0):
                continue
            scale = _scale_of(attr, value, model_type)
            if scale is None:
                raise ValueError(f"model config sets {attr}={value}; the fused loss does not support it yet")
            out["logit_scale"] = scale
    return out


def check_fusable_model(model) -> None:
    """Refuse a model whose head the fused ops cannot compute (``head_transform``), or that has no lm_head."""
    head_transform(model)
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head)")
