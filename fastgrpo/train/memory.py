"""The memory plan printed at the start of a CUDA run, and releasing sampling memory.

The plan is an estimate from the config and the model's shapes, written next to the measured peak
(``peak_memory_gb`` in every metrics row) so a user sees where the bytes go before a long run
ends in an out-of-memory error at step 1.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

from ..ops.api import extra_bytes, route
from ..ops.loss import GRPOLossParams
from .modeling import ModelInfo
from .policy import unwrap

GB = 2**30


def _text_config(model):
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def tokens_per_microbatch(cfg) -> tuple[int, int]:
    """(sequence tokens, completion tokens) the largest micro-batch may hold under the config."""
    completion = cfg.max_completion_length
    prompt = cfg.max_prompt_length or 512  # uncut prompts: a guess, as their length is unknown here
    if cfg.max_tokens_per_microbatch is not None:
        tokens = max(cfg.max_tokens_per_microbatch, prompt + completion)  # one sequence is never split
        return tokens, min(tokens, completion * max(1, tokens // (prompt + completion)))
    rows = cfg.per_device_train_batch_size
    return rows * (prompt + completion), rows * completion


def _kv_width(c) -> int:
    """Elements of one token's keys and values in one layer."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * head_dim * (getattr(c, "num_key_value_heads", None) or c.num_attention_heads)


def kv_bytes_per_token(model) -> int:
    """Bytes one token's keys and values take in a KV cache, over every layer, in the model's dtype."""
    c = _text_config(model)
    return c.num_hidden_layers * _kv_width(c) * next(iter(model.parameters())).element_size()


def _activation_bytes(c, cfg, T: int, b: int) -> int:
    """Bytes the decoder layers keep for the backward of one micro-batch of T tokens, b bytes an element."""
    H, inter, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    # One layer's tensors kept for its backward: q/o/residuals/norms (~6H), k/v, and the MLP's
    # gate/up/activation/product (~4I). Checkpointing keeps only each layer's input, and then one
    # layer's worth (with its gradients) while it is recomputed.
    per_layer = T * b * (6 * H + _kv_width(c) + 4 * inter)
    if cfg.gradient_checkpointing:
        kept = 0 if cfg.offload_activations else L * T * H * b
        return kept + 2 * per_layer
    return L * per_layer


def memory_plan(model, cfg, info: ModelInfo, ref_model=None) -> dict[str, float]:
    """Estimated GiB of both phases. The update (``total_gb``): weights (policy and reference
    copy), gradients, AdamW state, activations of one micro-batch at the configured lengths, the
    fused loss's buffers; plus what full fp32 logits would take, which the fused loss never
    allocates. The optimizer step (``optimizer_step_gb``): AdamW's foreach step allocates one more
    copy of the trainable weights' size (its sqrt(v), measured) while the gradients are still held;
    the update's total is the larger of backward and step. Sampling (``sampling_total_gb``): the
    resident weights and AdamW state plus the backend's cache (``sampling_gb``). ``peak_gb`` is the
    larger phase. ``host_gb``: pinned host memory (offloaded activations; vLLM's weights asleep)."""
    c = _text_config(model)
    H, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    b = params[0].element_size()
    T, M = tokens_per_microbatch(cfg)
    activations = _activation_bytes(c, cfg, T, b)
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else None
    head_trainable = head is not None and head.requires_grad
    dtype = params[0].dtype if params[0].is_floating_point() else torch.float32
    path = route(
        cfg.loss_impl, params[0].device, shape=(M, H, V), dtype=dtype, trainable_head=head_trainable,
        importance_sampling_level=cfg.importance_sampling_level,
        couples_rows=GRPOLossParams.from_config(cfg).couples_rows,
    )  # fmt: skip
    # The path's own buffers (workspace, fp32 accumulators) plus the dHidden it returns.
    loss = extra_bytes(path, M, H, V, dtype, trainable_head=head_trainable) + M * H * b
    trainable_gb = sum(p.numel() * p.element_size() for p in trainable) / GB
    plan = {
        "weights_gb": sum(p.numel() * p.element_size() for p in params) / GB,
        "ref_weights_gb": 0.0
        if ref_model is None
        else sum(p.numel() * p.element_size() for p in ref_model.parameters()) / GB,
        "gradients_gb": trainable_gb,
        # AdamW's two moments, plus Kahan summation's compensation buffer when it is on (all in the weights' dtype).
        "optimizer_gb": (3 if info.kahan_summation else 2) * trainable_gb,
        "optimizer_step_gb": trainable_gb,
        "activations_gb": activations / GB,
        "loss_gb": loss / GB,
        "tokens_per_microbatch": float(T),
        "kahan_summation": float(info.kahan_summation),
        "full_logits_gb": M * V * 4 / GB,
    }
    resident = sum(plan[k] for k in ("weights_gb", "ref_weights_gb", "optimizer_gb"))  # held in both phases
    backend = info.generation_backend
    sampling, engine_awake = sampling_gb(cfg, backend, kv_bytes_per_token(model), V, params[0].device)
    plan["sampling_gb"] = sampling
    # The update's peak; a vLLM engine without sleep mode keeps its share of the GPU through it.
    backward = sum(plan[k] for k in ("gradients_gb", "activations_gb", "loss_gb"))
    step = plan["gradients_gb"] + plan["optimizer_step_gb"]
    plan["total_gb"] = resident + engine_awake + max(backward, step)
    # Host: the checkpointed layer inputs offloaded to pinned memory; vLLM's weights while it sleeps (level 1).
    offloaded = L * T * H * b if cfg.gradient_checkpointing and cfg.offload_activations else 0
    asleep = plan["weights_gb"] if info.generation_backend == "vllm" and cfg.vllm_enable_sleep_mode else 0.0
    plan["host_gb"] = offloaded / GB + asleep
    # Sampling: gradients are freed by the last step's zero_grad(set_to_none=True).
    plan["sampling_total_gb"] = resident + sampling
    plan["peak_gb"] = max(plan["total_gb"], plan["sampling_total_gb"])
    return plan


def sampling_gb(cfg, backend: str, kv_bytes_per_token: int, vocab: int, device: torch.device) -> tuple[float, float]:
    """(GiB the sampling phase adds, GiB of it still held during the update).

    hf: the dense KV cache of one generate call, every row at prompt + completion length, plus
    one decode step's fp32 logits per row. continuous: its paged cache holds at most as much (rows
    free their blocks when they finish), so the same bound; graph: its slot cache is that dense cache.
    vllm: ``vllm_gpu_memory_utilization`` of the device (its weight copy and KV cache), handed back
    during the update only in sleep mode (its weights then wait in host memory)."""
    if backend == "vllm":
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        engine = cfg.vllm_gpu_memory_utilization * total / GB
        return engine, 0.0 if cfg.vllm_enable_sleep_mode else engine
    rows = cfg.generation_batch_size or cfg.generation_batch_size_total()
    prompt = cfg.max_prompt_length or 512
    kv = rows * (prompt + cfg.max_completion_length) * kv_bytes_per_token
    return (kv + rows * vocab * 4) / GB, 0.0


def format_plan(plan: dict[str, float], info: ModelInfo | None = None) -> str:
    parts = [f"{k[:-3]} {plan[k]:.2f}" for k in ("weights_gb", "ref_weights_gb", "gradients_gb", "optimizer_gb",
                                                  "activations_gb", "loss_gb")]  # fmt: skip
    line = (
        f"memory plan (GiB): {', '.join(parts)}; update {plan['total_gb']:.2f} at "
        f"{plan['tokens_per_microbatch']:.0f} tokens per micro-batch "
        f"(full logits would add {plan['full_logits_gb']:.2f}); sampling {plan['sampling_total_gb']:.2f} "
        f"(KV cache {plan['sampling_gb']:.2f}); optimizer step +{plan['optimizer_step_gb']:.2f}; "
        f"pinned host {plan['host_gb']:.2f}"
    )
    if info:
        line += "\n" + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(info).items())
    return line


def release_cached_memory(device: torch.device) -> None:
    """After sampling: the KV cache is unreachable but its blocks stay in the caching allocator,
    where the update's differently sized tensors cannot reuse them; hand them back."""
    if device.type == "cuda":
        gc.collect()  # reference cycles in generate's outputs can hold cache tensors
        torch.cuda.empty_cache()
