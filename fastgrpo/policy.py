"""The policy side of training: loading a causal LM, running its backbone only, and turning
final hidden states into per-token log-probs and the GRPO loss through the fused ops."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from .attention import NAME as SDPA_VARLEN
from .attention import register as register_attention
from .generation import Rollouts
from .loss import GRPOLossParams
from .ops import GRPOLossOutput, chunked_logprobs, fused_grpo_loss
from .packing import packed_completion_hidden

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


def check_model_path(name: str) -> None:
    """A local path that does not exist fails here, before anything is loaded."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json")
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ValueError(f"model path {name!r} does not exist")


def resolve_attn_implementation(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return spec
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return SDPA_VARLEN


def load_model_and_tokenizer(
    name: str, *, dtype: torch.dtype, device: torch.device, attn_implementation: str, trust_remote_code: bool = False
):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a hub id or local directory; the
    tokenizer gets a pad token (EOS) when it has none."""
    import transformers

    check_model_path(name)
    register_attention()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=resolve_attn_implementation(attn_implementation, device),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load model {name!r}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_fusable(model)
    return model.to(device), tokenizer


def check_fusable(model) -> None:
    """The fused loss computes softmax(h·Wᵀ + b); heads that change the logits otherwise would
    be trained on the wrong distribution, so they are refused."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):  # multimodal configs keep text settings nested
        configs.append(model.config.get_text_config())
    attrs = (
        "final_logit_softcapping",
        "logit_scale",
        "logits_scaling",
        "lm_head_multiplier",
        "output_multiplier_scale",
    )
    for cfg in configs:
        for attr in attrs:
            value = getattr(cfg, attr, None)
            if value not in (None, 1, 1.0):
                raise ValueError(f"model config sets {attr}={value}; the fused loss does not support it yet")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head)")


def unwrap(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The decoder stack without the lm_head (``Qwen2Model`` of a ``Qwen2ForCausalLM``)."""
    return unwrap(model).base_model


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def sequence_inputs(batch: Rollouts) -> dict[str, torch.Tensor]:
    """Prompt + completion as one left-padded row each, with position ids that skip the padding."""
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "position_ids": position_ids}


def completion_hidden(model, batch: Rollouts, padding_free: bool = False) -> torch.Tensor:
    """(B, C, H) final hidden states at the positions that predict the completion tokens; the
    lm_head is never applied here. ``padding_free`` runs the backbone on the packed real tokens."""
    if padding_free:
        return packed_completion_hidden(model, batch)
    out = backbone(model)(**sequence_inputs(batch), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return hidden[:, P - 1 : P + C - 1]


@torch.no_grad()
def completion_logprobs(
    model, batch: Rollouts, temperature: float, impl: str = "auto", padding_free: bool = False
) -> torch.Tensor:
    """(B, C) fp32 log p(completion token) under ``model``, without full logits."""
    hidden = completion_hidden(model, batch, padding_free)
    weight, bias = lm_head(model)
    return chunked_logprobs(hidden, weight, batch.completion_ids, bias=bias, temperature=temperature, impl=impl)


def policy_loss(
    model,
    batch: Rollouts,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    params: GRPOLossParams,
    *,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    num_items_in_batch: float | None,
    impl: str = "auto",
    padding_free: bool = False,
) -> GRPOLossOutput:
    """The GRPO loss of one micro-batch, from backbone hidden states through the fused op."""
    hidden = completion_hidden(model, batch, padding_free)
    weight, bias = lm_head(model)
    return fused_grpo_loss(
        hidden,
        weight,
        batch.completion_ids,
        loss_mask,
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        bias=bias,
        num_items_in_batch=num_items_in_batch,
        impl=impl,
        **{k: getattr(params, k) for k in _LOSS_KWARGS},
    )


_LOSS_KWARGS = (
    "temperature",
    "beta",
    "epsilon",
    "epsilon_high",
    "delta",
    "loss_type",
    "importance_sampling_level",
    "max_completion_length",
    "use_bias_correction_kl",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
)
