"""``kernels/decode_attention.py``: the split-KV decode kernel (Triton interpreter on CPU) and its twin
against a float64 reference: GQA groups 1 to 7, head dims 16/64/80/128, lengths 1 to L, every dtype,
cache views (a slot subset, a longer allocation, strided q), outputs poisoned."""

from __future__ import annotations

import math

import pytest
import torch
from fastgrpo.kernels import decode_attention as DA
from fastgrpo.kernels._debug import poison_outputs

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _reference(q, keys, values, lengths, scaling):
    S, H, D = q.shape
    KV = keys.shape[1]
    out = torch.zeros(S, H, D, dtype=torch.float64)
    for s in range(S):
        n = int(lengths[s])
        for h in range(H):
            k, v = keys[s, h // (H // KV), :n].double(), values[s, h // (H // KV), :n].double()
            w = (k @ q[s, h].double() * scaling).softmax(0)
            out[s, h] = w @ v
    return out


def _inputs(S, H, KV, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, H, D, generator=g).to(dtype)
    keys = torch.randn(S, KV, L, D, generator=g).to(dtype)
    values = torch.randn(S, KV, L, D, generator=g).to(dtype)
    lengths = torch.randint(1, L + 1, (S,), generator=g)
    lengths[0], lengths[-1] = 1, L  # one column, every column
    return q, keys, values, lengths


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize(
    "S,H,KV,L,D", [(3, 4, 2, 37, 16), (2, 7, 1, 70, 64), (4, 8, 8, 33, 80), (2, 12, 2, 100, 128), (1, 2, 1, 1, 16)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_matches_float64(impl, S, H, KV, L, D, dtype):
    q, keys, values, lengths = _inputs(S, H, KV, L, D, dtype)
    scaling = 1 / math.sqrt(D)
    with poison_outputs():
        got = DA.decode_attention(q, keys, values, lengths, scaling, impl=impl)
    assert got.dtype == dtype and got.shape == (S, H, D)
    want = _reference(q, keys, values, lengths, scaling)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_views_of_a_larger_cache_and_strided_queries(impl):
    """The first S slots of a longer cache, allocated for more positions than are read, and q a strided
    view: the same result as on compact copies."""
    S, H, KV, L, D = 3, 6, 2, 45, 32
    q_big, keys_big, values_big, _ = _inputs(5, 2 * H, KV, L + 19, D, torch.float32, seed=1)
    q = q_big[:S, ::2]  # (S, H, D), heads strided
    keys, values = keys_big[:S], values_big[:S]
    lengths = torch.tensor([1, 40, L + 19])
    with poison_outputs():
        got = DA.decode_attention(q, keys, values, lengths, 0.2, impl=impl)
        compact = DA.decode_attention(q.contiguous(), keys.contiguous(), values.contiguous(), lengths, 0.2, impl=impl)
    torch.testing.assert_close(got, compact, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double(), _reference(q, keys, values, lengths, 0.2), rtol=0, atol=2e-5)


def test_columns_past_a_slots_length_are_never_read():
    """NaN written past each slot's length changes nothing (the kernel masks its loads there)."""
    q, keys, values, lengths = _inputs(3, 4, 2, 50, 16, torch.float32, seed=2)
    want = DA.decode_attention(q, keys, values, lengths, 0.25, impl="triton")
    for s, n in enumerate(lengths.tolist()):
        keys[s, :, n:] = float("nan")
        values[s, :, n:] = float("nan")
    torch.testing.assert_close(DA.decode_attention(q, keys, values, lengths, 0.25, impl="triton"), want, rtol=0, atol=0)


def test_split_plan_covers_every_column_with_whole_blocks():
    for slots, kv, length in [(1, 1, 1), (1, 2, 4096), (128, 2, 4352), (3, 1, 97), (256, 8, 100)]:
        splits, per = DA.split_plan(slots, kv, length)
        assert per % DA.BLOCK_N == 0 and splits * per >= length > (splits - 1) * per
        assert splits == 1 or slots * kv * (splits - 1) < DA.TARGET_PROGRAMS
    assert DA.split_plan(1, 2, 4096)[0] > 1  # one slot: the length is split across programs


def test_bad_impl_is_refused():
    q, keys, values, lengths = _inputs(1, 2, 1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="impl must be"):
        DA.decode_attention(q, keys, values, lengths, 0.25, impl="cuda")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_expanded_queries_and_a_transposed_cache(impl):
    """q one row expanded over the slots (stride 0), the cache stored (S, L, KV, D) and read through a
    transpose, lengths expanded: against float64 and the same call on compact copies."""
    S, H, KV, L, D = 4, 4, 2, 41, 16
    q_row, keys_t, values_t, _ = _inputs(1, H, KV, L, D, torch.float32, seed=3)
    q = q_row.expand(S, H, D)
    keys = keys_t.expand(S, KV, L, D).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    values = values_t.expand(S, KV, L, D).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert q.stride(0) == 0 and keys.stride(1) == D and not keys.is_contiguous()
    lengths = torch.tensor([7]).expand(S)
    with poison_outputs():
        got = DA.decode_attention(q, keys, values, lengths, 0.25, impl=impl)
        compact = DA.decode_attention(q.contiguous(), keys.contiguous(), values.contiguous(), lengths.contiguous(),
                                      0.25, impl=impl)  # fmt: skip
    torch.testing.assert_close(got, compact, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double(), _reference(q, keys, values, lengths, 0.25), rtol=0, atol=2e-5)
