"""Offloaded gradient checkpointing gives the losses and gradients of plain checkpointing and of
none at all, keeping one host copy per layer input (CPU here: the CUDA stream path is not run)."""

from __future__ import annotations

import pytest
import torch
import transformers

from fastgrpo.train import offload
from fastgrpo.train.offload import enable_gradient_checkpointing, offload_stats, offloaded_checkpoint

LAYERS, HIDDEN, VOCAB = 3, 32, 97
MODES = ("none", "plain", "offload")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention with whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(mode: str, attention_dropout: float = 0.0, lora: bool = False):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attention_dropout=attention_dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        peft = pytest.importorskip("peft")
        # Random B as well as A: with the default B = 0 every A gradient would be zero.
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(model, lcfg)
    if mode != "none":
        enable_gradient_checkpointing(model, offload=mode == "offload")
    return model.train()


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def packed_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 11), generator=g)
    # Three sequences in one row: transformers finds the boundaries from the restarting positions.
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]])
    return {"input_ids": ids, "position_ids": positions}


def loss_of(model, batch):
    """Token cross-entropy over real tokens plus a hidden-state term, as one scalar."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**batch, use_cache=False).last_hidden_state  # (B, T, H)
    logits = base.lm_head(hidden).float()
    ids = batch["input_ids"]
    weight = batch.get("attention_mask", torch.ones_like(ids))[:, 1:].float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return (ce * weight.flatten()).sum() / weight.sum() + (hidden.float() ** 2).mean()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch])
def test_same_loss_and_grads(make_batch):
    results = {}
    for mode in MODES:
        model = tiny_model(mode)
        loss = loss_of(model, make_batch())
        loss.backward()
        results[mode] = (loss.detach(), grads(model))
        assert len(results[mode][1]) == sum(1 for _ in model.parameters())  # every parameter is compared
    for mode in ("plain", "offload"):
        torch.testing.assert_close(results[mode][0], results["none"][0], atol=1e-6, rtol=0)
        assert_same_grads(results[mode][1], results["none"][1])


def test_offload_path_taken():
    model = tiny_model("offload")
    inputs = []
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append(args[0]), with_kwargs=True)
        for layer in decoder_layers(model)
    ]
    batch = padded_batch()
    offload_stats.reset()
    loss = loss_of(model, batch)
    for h in hooks:
        h.remove()
    B, T = batch["input_ids"].shape
    assert offload_stats.tensors == LAYERS
    assert offload_stats.bytes == LAYERS * B * T * HIDDEN * 4
    # The last entry links back to the first: each holds a host copy of one layer input, not the input itself.
    entry, saved = offload._last(), []
    while entry is not None:
        saved.append(entry)
        entry = entry.prev() if entry.prev is not None else None
    saved = saved[:LAYERS][::-1]
    assert len(saved) == len(inputs) == LAYERS
    for entry, x in zip(saved, inputs, strict=True):
        assert entry.host.device.type == "cpu"
        assert entry.host.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        torch.testing.assert_close(entry.host, x.detach(), atol=0, rtol=0)
    loss.backward()
    assert offload_stats.reloads == LAYERS
    assert offload_stats.prefetched == LAYERS - 1  # every layer but the last one run brought in the next needed
    assert all(entry.used and entry.device_copy is None for entry in saved)


def test_dropout_masks_replayed():
    results = {}
    for mode, seed in (("none", 123), ("offload", 123), ("offload", 7)):
        model = tiny_model(mode, attention_dropout=0.5)
        torch.manual_seed(seed)
        loss_of(model, padded_batch()).backward()
        results[mode, seed] = grads(model)
    assert_same_grads(results["offload", 123], results["none", 123])
    # The seed matters, so the equality above is the recompute replaying the forward's masks.
    differs = [not torch.allclose(results["offload", 7][n], g) for n, g in results["none", 123].items()]
    assert any(differs)


@pytest.mark.parametrize("embeds", [False, True])
def test_lora_grads(embeds):
    results = {}
    for mode in ("none", "offload"):
        model = tiny_model(mode, lora=True)
        batch = padded_batch()
        layer0_input = []
        hook = decoder_layers(model)[0].register_forward_pre_hook(
            lambda mod, args, kwargs, seen=layer0_input: seen.append(args[0].requires_grad), with_kwargs=True
        )
        if embeds:  # the frozen embedding's output, without the hook that makes it require grad
            inputs_embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
            hidden = (
                model.get_base_model()
                .model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], use_cache=False)
                .last_hidden_state
            )
            loss = (hidden**2).mean()
        else:
            loss = loss_of(model, batch)
        loss.backward()
        hook.remove()
        results[mode] = grads(model)
        # With checkpointing, transformers makes the embedding output require grad; not inputs_embeds.
        assert layer0_input == [mode == "offload" and not embeds]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(".layers.0." in n for n in names)
    assert set(results["offload"]) == set(names)  # every adapter, layer 0's included, got a gradient
    assert all(bool(g.abs().sum() > 0) for g in results["offload"].values())
    assert_same_grads(results["offload"], results["none"])


@pytest.mark.parametrize("order", ["fifo", "lifo"])
def test_micro_batches_and_no_grad(order):
    batches = [padded_batch(), packed_batch()]
    ref = tiny_model("none")
    for batch in batches:
        loss_of(ref, batch).backward()
    with torch.no_grad():
        ref_out = ref(**padded_batch()).logits

    model = tiny_model("offload")
    offload_stats.reset()
    first = loss_of(model, batches[0])
    with torch.no_grad():  # e.g. a reference pass between micro-batches: stores nothing
        out = model(**padded_batch()).logits
    assert offload_stats.tensors == LAYERS
    second = loss_of(model, batches[1])
    assert offload_stats.tensors == 2 * LAYERS
    for loss in (first, second) if order == "fifo" else (second, first):
        loss.backward()
    assert offload_stats.reloads == 2 * LAYERS
    assert_same_grads(grads(model), grads(ref))
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)

    offload_stats.reset()
    with torch.inference_mode():
        model(**padded_batch())
    assert offload_stats.tensors == 0


def test_function_tuple_outputs_and_rest_grads():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)

    def fn(h, scale, tag):
        assert tag == "tag"
        return torch.nn.functional.dropout(lin(h), 0.5) * scale, None, (h**2).sum()

    def run(checkpointed):
        lin.zero_grad()
        x.grad = w.grad = None
        torch.manual_seed(5)
        a, none, b = (offloaded_checkpoint if checkpointed else lambda f, *args: f(*args))(fn, x, w, "tag")
        assert none is None
        (a.sum() + 2 * b).backward(retain_graph=True)
        (a**2).mean().backward()  # a second backward through the same graph reloads from host again
        return [t.grad.clone() for t in (x, w, lin.weight, lin.bias)]

    offload_stats.reset()
    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert offload_stats.tensors == 1 and offload_stats.reloads == 2
