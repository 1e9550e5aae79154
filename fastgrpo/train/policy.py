"""The policy's forward in training: the backbone only, then final hidden states through the
fused ops to per-token log-probs and the GRPO loss. The lm_head is never applied here.

``padding_free`` passes pack a micro-batch's real tokens into one row (``rollouts.pack_rollouts``);
transformers then takes flash-attention varlen when installed, else our ``sdpa_varlen`` (one SDPA
call per sequence; plain ``sdpa`` would build a dense block-diagonal mask). Only the hidden states
that predict completion tokens come back, in the (B, C, H) layout the fused loss takes, so loss
semantics are the same either way.
"""

from __future__ import annotations

import torch

from ..ops import FusedGRPOLoss, GRPOLossOutput, chunked_logprobs, masked_entropy
from ..ops.loss import GRPOLossParams, high_entropy_mask
from .rollouts import Rollouts, pack_rollouts


def unwrap(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The decoder stack without the lm_head (``Qwen2Model`` of a ``Qwen2ForCausalLM``)."""
    return unwrap(model).base_model


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def _last_hidden_state(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sequence_inputs(batch: Rollouts) -> dict[str, torch.Tensor]:
    """Prompt + completion as one left-padded row each, with position ids that skip the padding."""
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "position_ids": position_ids}


def packed_completion_hidden(model, batch: Rollouts) -> torch.Tensor:
    """(B, C, H) hidden states predicting the completion tokens, from one packed backbone pass;
    zeros where ``batch.completion_mask`` is False."""
    if bool((batch.prompt_mask.sum(1) == 0).any()):
        raise ValueError("padding-free packing needs at least one prompt token per sequence")
    packed = pack_rollouts(batch)
    # No attention_mask: transformers then derives sequence boundaries from the restarting position ids.
    out = backbone(model)(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    states = _last_hidden_state(out)[0, packed.predict_index]  # (M, H)
    B, C = batch.completion_ids.shape
    full = states.new_zeros(B, C, states.shape[-1])
    return full.index_put((*batch.completion_mask.nonzero(as_tuple=True),), states)


def completion_hidden(model, batch: Rollouts, padding_free: bool = False) -> torch.Tensor:
    """(B, C, H) final hidden states at the positions that predict the completion tokens; the
    lm_head is never applied here. ``padding_free`` runs the backbone on the packed real tokens."""
    if padding_free:
        return packed_completion_hidden(model, batch)
    hidden = _last_hidden_state(backbone(model)(**sequence_inputs(batch), use_cache=False))
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    return hidden[:, P - 1 : P + C - 1]


@torch.no_grad()
def completion_logprobs(
    model, batch: Rollouts, temperature: float, impl: str = "auto", padding_free: bool = False, **head
) -> torch.Tensor:
    """(B, C) fp32 log p(completion token) under ``model``, without full logits; ``head``: the model's
    ``logit_scale`` and ``final_logit_softcapping`` (``head_transform``), as ``chunked_logprobs`` takes them."""
    hidden = completion_hidden(model, batch, padding_free)
    weight, bias = lm_head(model)
    return chunked_logprobs(hidden, weight, batch.completion_ids, bias=bias, temperature=temperature, impl=impl, **head)


def head_kwargs(params: GRPOLossParams) -> dict:
    """``chunked_logprobs``' head-transform keywords, from the loss's settings."""
    return dict(logit_scale=params.logit_scale, final_logit_softcapping=params.final_logit_softcapping)


def policy_loss(
    model,
    batch: Rollouts,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    loss_fn: FusedGRPOLoss,
    *,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    num_items_in_batch: float | None,
    padding_free: bool = False,
    importance_sampling_ratio: torch.Tensor | None = None,
    sampling_logprobs: torch.Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    params: GRPOLossParams | None = None,
) -> GRPOLossOutput:
    """The GRPO loss of one micro-batch, from backbone hidden states through the fused op.

    ``loss_fn`` holds the loss hyper-parameters and the implementation (built once per run).
    ``importance_sampling_ratio``: (B, C) or (B, 1) sampler/trainer correction multiplying the
    policy term (``correction.py``), or None. ``sampling_logprobs``: (B, C) the sampler's log-probs, read
    by the off-policy mask only, or None. ``top_entropy_quantile`` < 1: only the loss tokens at or above that
    quantile of this forward's entropies keep their policy term and entropy bonus (TRL's mask, from one lm_head
    pass without gradient). ``params``: this call's loss hyper-parameters, if not ``loss_fn``'s."""
    hidden = completion_hidden(model, batch, padding_free)
    weight, bias = lm_head(model)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(
            hidden, weight, bias, batch.completion_ids, loss_mask, loss_fn, top_entropy_quantile
        )
    return loss_fn(
        hidden,
        weight,
        batch.completion_ids,
        loss_mask,
        advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        bias=bias,
        num_items_in_batch=num_items_in_batch,
        importance_sampling_ratio=importance_sampling_ratio,
        sampling_logprobs=sampling_logprobs,
        entropy_mask=entropy_mask,
        params=params,
    )


@torch.no_grad()
def _high_entropy_mask(hidden, weight, bias, targets, loss_mask, loss_fn: FusedGRPOLoss, quantile) -> torch.Tensor:
    """(B, C) bool: the loss tokens at or above the entropy quantile (``high_entropy_mask``)."""
    entropy = masked_entropy(
        hidden, weight, targets, loss_mask, bias=bias, temperature=loss_fn.params.temperature, impl=loss_fn.impl,
        workspace_bytes=loss_fn.knobs.workspace_bytes, **head_kwargs(loss_fn.params),
    )  # fmt: skip
    return high_entropy_mask(entropy, loss_mask, quantile)
