"""The decoder's forward over a slot KV cache, with static shapes, for the ``graph`` backend.

A transformers decoder of the Llama family (``SUPPORTED``: Llama, Mistral, Qwen2, Qwen3) is walked
module by module (its norms, projections, MLPs, rotary embedding and head, LoRA wrappers included), so
the numbers are the model's own; only attention and the cache are ours. Each sequence owns a slot: row
``s`` of a ``(S, kv_heads, L, head_dim)`` key and value tensor per layer, position ``p`` at column
``p``. A step writes its tokens' keys and values at their positions and attends each query to the
columns at or before its own position, so the same code runs a prompt (T tokens per slot) and a decode
step (T = 1) without masks, padding bookkeeping or shapes that change between steps (CUDA graphs).
"""

from __future__ import annotations

import dataclasses

import torch

from ...kernels.decode_attention import decode_attention
from ..policy import unwrap

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# decode_attention's impl for one-token steps: "auto" is the split-KV Triton kernel on CUDA, the twin elsewhere.
DECODE_IMPL = "auto"


def check_family(kind: str | None, where: str = "") -> None:
    """Raise ``ValueError`` unless ``kind`` (a config's ``model_type``) is a family the slot forward runs."""
    if kind not in SUPPORTED:
        raise ValueError(
            f"generation_backend='graph' runs model_type {'/'.join(SUPPORTED)}, not {kind!r}{where}; "
            "use generation_backend='continuous' or 'hf'"
        )


def check_supported(model, context_length: int) -> None:
    """Raise ``ValueError`` naming what the slot forward cannot run exactly."""
    config = unwrap(model).config
    check_family(getattr(config, "model_type", None))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "dynamic" in str(rope.get("rope_type", rope.get("type", ""))):
        # Its frequencies are recomputed on the host from the longest position seen: not capturable.
        raise ValueError(
            "generation_backend='graph' cannot run dynamic RoPE scaling (rope_type "
            f"{rope.get('rope_type', rope.get('type'))!r}); use generation_backend='continuous'"
        )
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and context_length > window:
        raise ValueError(
            f"generation_backend='graph' attends to the whole context, and prompt + completion ({context_length}) "
            f"is longer than the model's sliding window ({window}); use generation_backend='continuous'"
        )


@dataclasses.dataclass
class SlotCache:
    """Keys and values of ``S`` slots, ``L`` positions each, per layer: ``(S, kv_heads, L, head_dim)``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @staticmethod
    def empty(model, slots: int, length: int, device, dtype) -> SlotCache:
        config = unwrap(model).config
        kv = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, kv, length, head_dim)
        n = config.num_hidden_layers
        return SlotCache(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
        )

    def select_(self, rows: torch.Tensor) -> None:
        """Slots ``rows`` (k,) moved to slots 0..k-1, in place (the tensors keep their storage)."""
        k = rows.numel()
        for t in (*self.keys, *self.values):
            t[:k] = t.index_select(0, rows)

    def repeat(self, times: int) -> SlotCache:
        """Each slot ``times`` times in a row (a prompt's KV forked to its G completions)."""
        return SlotCache([k.repeat_interleave(times, 0) for k in self.keys],
                         [v.repeat_interleave(times, 0) for v in self.values])  # fmt: skip


def prompt_attention(query, keys, values, scaling: float) -> torch.Tensor:
    """A prompt's own causal attention: query (S, H, T, D), its fresh keys/values (S, KV, T, D) at positions
    0..T-1 -> (S, T, H, D). The cache's later columns are empty then, so nothing else is read (a prompt
    forward never materializes (S, H, T, L) scores). GQA by repeating the KV heads."""
    rep = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(attn, x, cos, sin, cache: SlotCache, layer: int, rows, positions) -> torch.Tensor:
    S, T, _ = x.shape
    head_dim = cache.keys[layer].shape[-1]
    q = attn.q_proj(x).view(S, T, -1, head_dim)
    k = attn.k_proj(x).view(S, T, -1, head_dim)
    v = attn.v_proj(x).view(S, T, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (S, heads, T, D)
    c, s = cos[:, None], sin[:, None]
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    # (S, T) advanced indices around the head slice: the value is laid out (S, T, KV, D).
    cache.keys[layer][rows, :, positions] = k.transpose(1, 2).to(cache.keys[layer].dtype)
    cache.values[layer][rows, :, positions] = v.transpose(1, 2).to(cache.values[layer].dtype)
    if T == 1:  # a decode step: each slot reads its first positions + 1 columns
        out = decode_attention(q[:, :, 0], cache.keys[layer], cache.values[layer], positions[:, 0] + 1, attn.scaling,
                               impl=DECODE_IMPL)[:, None]  # fmt: skip
    else:
        out = prompt_attention(q, k, v, attn.scaling)
    return attn.o_proj(out.reshape(S, T, -1))


def slot_forward(
    model, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache, logits_at: torch.Tensor | None = None
) -> torch.Tensor:
    """tokens, positions (S, T) int64 for the cache's first S slots -> (S, T, V) logits of the model's head,
    or with ``logits_at`` (S,) int64 only those of token ``logits_at[s]`` of each slot, (S, V): a prompt's
    last token, without (S, T, V) logits (16 prompts of 1K tokens at a 152K vocabulary: 5 GB in bf16).
    T = 1 is a decode step at any positions; T > 1 is a prompt into empty slots, at positions 0..T-1.

    Writes every token's keys and values at its position; a position past a slot's real tokens (a
    prompt's right padding) is written too and overwritten later, never read by a real token before."""
    base = unwrap(model)
    body = base.model
    S = tokens.shape[0]
    view = SlotCache([k[:S] for k in cache.keys], [v[:S] for v in cache.values])
    rows = torch.arange(S, device=tokens.device)[:, None]
    h = body.embed_tokens(tokens)
    cos, sin = body.rotary_emb(h, positions)
    for i, layer in enumerate(body.layers):
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, view, i, rows, positions)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    if logits_at is not None:
        h = h[torch.arange(S, device=h.device), logits_at]
    return base.lm_head(body.norm(h))
