"""Liger body kernels (fastgrpo.train.body): same body as torch's, lm_head and loss untouched.

Without CUDA, Liger's kernels run through Triton's CPU interpreter, which runs Liger's RoPE
kernel as is but not its RMSNorm, SwiGLU or GeGLU kernels: ``interpreter_bridge`` says why and
bridges the gaps.
"""

import copy
import importlib
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
import triton.language as tl
from liger_kernel.transformers.geglu import LigerGEGLUMLP
from liger_kernel.transformers.rms_norm import LigerRMSNorm
from liger_kernel.transformers.rope import liger_rotary_pos_emb
from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

from fastgrpo.train.body import apply_liger_body, liger_supported, resolve_use_liger_body

from helpers import DEVICE, rel_err

SMALL = dict(vocab_size=97, hidden_size=40, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=10),  # also q_norm / k_norm
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=10),
}
# Modules Liger rewrites process-wide, imported up front so that their snapshot is the original.
MODULES = [importlib.import_module(f"transformers.models.{a}.modeling_{a}") for a in CONFIGS] + [torch.nn.functional]


@pytest.fixture(autouse=True)
def restore_modules():
    """Liger's module patch is global (see fastgrpo.train.body): undo it so other tests see plain torch."""
    saved = [(m, dict(vars(m))) for m in MODULES]
    yield
    for m, old in saved:
        for k in set(vars(m)) - set(old):
            delattr(m, k)
        for k, v in old.items():
            if vars(m).get(k) is not v:
                setattr(m, k, v)


@pytest.fixture
def interpreter_bridge(monkeypatch):
    """Three gaps of Triton's CPU interpreter (3.9) stop Liger's RMSNorm, SwiGLU and GeGLU kernels
    there (RoPE runs as is):
    1. Compiled Triton passes a Python float argument as an fp32 scalar; the interpreter passes the
       float itself, so Liger's ``eps.to(tl.float32)`` / ``gate_multiplier.to(tl.float32)`` fail
       ("'float' object has no attribute 'to'"). Wrapped here as fp32 scalars, as ints already are.
    2. RMSNorm calls ``triton.language.extra.libdevice.rsqrt`` and GeGLU ``libdevice.tanh``, which
       the interpreter does not emulate (the stubs return None: "cannot convert None ... to
       tensor"); routed to tl.math.rsqrt and, as tl.math has no tanh, 2 * sigmoid(2x) - 1.
    On CUDA nothing is bridged: the kernels run compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import liger_kernel.ops.geglu
    import liger_kernel.ops.rms_norm
    from triton.runtime import interpreter

    cvt = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return cvt(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
    monkeypatch.setattr(liger_kernel.ops.rms_norm, "rsqrt", lambda x: tl.math.rsqrt(x))
    monkeypatch.setattr(liger_kernel.ops.geglu, "tanh", lambda x: 2 * tl.sigmoid(2 * x) - 1)


SWIGLU = ["rms_norm", "swiglu", "rope"]


def tiny(arch: str):
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM
    return auto.from_config(CONFIGS[arch](), dtype=torch.float32, attn_implementation="sdpa").to(DEVICE)


def left_padded_batch(B=3, T=13, V=97):
    """Inputs as the policy builds them: left padding, positions counted from the first real token."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = mask[2, :1] = 0
    ids = torch.randint(0, V, (B, T), generator=g) * mask
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    batch = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def hidden_and_grads(model, batch, proj):
    """Last hidden states and the gradients of a linear loss on the real tokens (a loss like
    sum(h**2) amplifies fp32 rounding ~100x through the layers, hiding kernel errors in noise)."""
    model.zero_grad()
    hidden = model.base_model(**batch).last_hidden_state
    (hidden * proj * batch["attention_mask"][..., None]).sum().backward()
    return hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", CONFIGS)
def test_body_matches_torch(arch, interpreter_bridge):
    mlp, names = (LigerGEGLUMLP, ["rms_norm", "geglu", "rope"]) if arch == "gemma" else (LigerSwiGLUMLP, SWIGLU)
    model = tiny(arch)
    patched = copy.deepcopy(model)
    batch = left_padded_batch()
    real = batch["attention_mask"].bool()
    proj = torch.randn(*real.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref, ref_grads = hidden_and_grads(model, batch, proj)  # before the global RoPE patch

    assert apply_liger_body(patched) == names
    assert "forward" not in vars(patched)  # Liger's fused linear cross-entropy would rebind it
    base = patched.base_model
    modeling = importlib.import_module(type(model).__module__)
    assert base.norm.forward.__func__ is LigerRMSNorm.forward  # Gemma's offset rides on the instance
    assert base.layers[1].mlp.forward.__func__ is mlp.forward
    assert modeling.apply_rotary_pos_emb is liger_rotary_pos_emb
    out, grads = hidden_and_grads(patched, batch, proj)
    assert rel_err(out[real], ref[real]) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 10  # all but the lm_head
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 1e-5, name

    # The RoPE patch reaches the unpatched model too; it computes the same function.
    with torch.no_grad():
        again = model.base_model(**batch).last_hidden_state
    assert rel_err(again[real], ref[real]) < 1e-5


def test_rope_runs_under_the_plain_interpreter():
    """RoPE, the one body kernel the interpreter runs unbridged: per-row positions, odd head_dim/2."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 13, 10, generator=g), torch.randn(3, 2, 13, 10, generator=g)
    angles = torch.randn(3, 13, 5, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    q, k = q.to(DEVICE).requires_grad_(), k.to(DEVICE).requires_grad_()
    rotate = importlib.import_module("transformers.models.llama.modeling_llama").apply_rotary_pos_emb
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    results = []
    for fn in (rotate, liger_rotary_pos_emb):
        q_out, k_out = fn(q, k, cos, sin)
        results.append((q_out, k_out, *torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))))
    for got, want in zip(*results[::-1], strict=True):
        assert rel_err(got, want) < 1e-6


def test_head_loss_and_weights_untouched(interpreter_bridge):
    model = tiny("qwen2")
    params = dict(model.named_parameters())
    cls_forward, ce, loss_fn = type(model).forward, torch.nn.functional.cross_entropy, model.loss_function
    assert apply_liger_body(model) == SWIGLU
    assert apply_liger_body(model) == SWIGLU  # idempotent
    assert "forward" not in vars(model) and type(model).forward is cls_forward  # no fused-linear-CE forward
    assert "forward" not in vars(model.lm_head) and type(model.lm_head) is torch.nn.Linear
    assert torch.nn.functional.cross_entropy is ce and model.loss_function == loss_fn  # no Liger CE
    # Patched in place: the same modules and parameter tensors, the same state_dict.
    now = dict(model.named_parameters())
    assert now.keys() == params.keys() and all(now[n] is p for n, p in params.items())
    assert all(vars(m).get("forward") is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    batch = left_padded_batch()
    logits = model(**batch).logits  # the full model still runs: head and loss are torch's
    assert logits.shape == (3, 13, 97) and logits.isfinite().all()


def test_peft_model_is_unwrapped(interpreter_bridge):
    peft = pytest.importorskip("peft")  # an optional extra, like in the other peft tests
    model = tiny("qwen2")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    batch = left_padded_batch()
    with torch.no_grad():
        ref = lora(**batch).logits
    assert apply_liger_body(lora) == SWIGLU
    assert lora.get_base_model().model.norm.forward.__func__ is LigerRMSNorm.forward
    with torch.no_grad():
        assert rel_err(lora(**batch).logits, ref) < 1e-5


def test_unsupported_architecture():
    cfg = transformers.GPT2Config(vocab_size=11, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    with pytest.raises(ValueError, match="use_liger_body.*'gpt2'"):
        apply_liger_body(transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(ValueError, match="use_liger_body.*'made_up'"):
        apply_liger_body(SimpleNamespace(config=SimpleNamespace(model_type="made_up")))
    assert liger_supported("qwen2") and not liger_supported("gpt2") and not liger_supported("made_up")


def test_liger_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    with pytest.raises(ValueError, match="use_liger_body.*pip install liger-kernel"):
        apply_liger_body(SimpleNamespace(config=SimpleNamespace(model_type="qwen2")))
    monkeypatch.setattr("fastgrpo.train.body.liger_available", lambda: False)
    assert resolve_use_liger_body("auto", torch.device("cuda")) is False


def test_resolve_use_liger_body():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert resolve_use_liger_body("auto", cpu) is False and resolve_use_liger_body(None, cpu) is False
    assert resolve_use_liger_body("auto", cuda) is True and resolve_use_liger_body(None, "cuda:0") is True
    assert resolve_use_liger_body("auto", cuda, model_type="qwen2") is True
    assert resolve_use_liger_body("auto", cuda, model_type="gpt2") is False
    assert resolve_use_liger_body("true", cpu) is True and resolve_use_liger_body(True, cpu) is True
    assert resolve_use_liger_body(" False", cuda) is False and resolve_use_liger_body(False, cuda) is False
    for bad in ("bogus", 1, "yes"):
        with pytest.raises(ValueError, match="use_liger_body"):
            resolve_use_liger_body(bad, cpu)
