"""fastgrpo.integrations.verl: verl's ``linear_cross_entropy`` hook against a float64 materialized
reference and a transcription of verl's torch reference (always), and against verl 0.9 itself, its
model-forward patch and its external-module hooks (where verl is installed)."""

import importlib
import inspect
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist

from fastgrpo.integrations import verl as fv
from fastgrpo.ops.reference import reference_logprobs

from helpers import DEVICE, IMPLS, leaf, rel_err

DTYPES = [torch.float32, torch.bfloat16]
H, V = 40, 1003  # nothing a multiple of a tile
# (token layout of hidden / labels, temperature): verl's FSDP forward passes (B, T, H) hidden states
# (B = 1 with remove-padding), its fused kernel flattens them; (N, H) goes through as is.
CASES = [pytest.param((3, 13), 0.7, id="BTH-t0.7"), pytest.param((37,), 1.0, id="NH-t1")]
VERL_SIGNATURE = [  # verl 0.9.1, verl/utils/kernel/linear_cross_entropy.py: LinearCrossEntropy.forward
    ("hidden", inspect.Parameter.empty),
    ("weight", inspect.Parameter.empty),
    ("labels", inspect.Parameter.empty),
    ("temperature", 1.0),
    ("reduction", "none"),
    ("dist_process_group", None),
]


def _inputs(lead, dtype, seed=0, scalar_grad=False, hidden_size=H):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(lead).numel())
    h = (torch.randn(*lead, hidden_size, generator=g) * 2 / hidden_size**0.25).to(DEVICE, dtype)
    w = (torch.randn(V, hidden_size, generator=g) / hidden_size**0.25).to(DEVICE, dtype)
    y = torch.randint(0, V, lead, generator=g).to(DEVICE)
    g_lp = torch.randn(() if scalar_grad else (n,), generator=g).to(DEVICE)
    g_ent = torch.randn(n, generator=g).to(DEVICE)
    return h, w, y, g_lp, g_ent


def _run(fn, h, w, y, g_lp, g_ent, *args, **kw):
    """(log_probs, entropy, dhidden, dweight) of ``fn`` with upstream grads on both outputs."""
    hh, ww = leaf(h), leaf(w)
    logp, ent = fn(hh, ww, y, *args, **kw)
    (logp * g_lp.to(logp.dtype)).sum().add((ent * g_ent.to(ent.dtype)).sum()).backward()
    return logp.detach(), ent.detach(), hh.grad, ww.grad


def _materialized(dtype):
    """verl's contract through ``reference_logprobs`` (full logits, matmul in ``dtype``)."""

    def fn(hidden, weight, labels, temperature=1.0, reduction="none"):
        x = hidden.reshape(-1, hidden.shape[-1])
        logp, ent = reference_logprobs(x, weight, labels.reshape(-1), None, temperature, compute_dtype=dtype)
        red = reduction.lower()
        return (logp.sum() if red == "sum" else logp.mean() if red == "mean" else logp), ent

    return fn


def _verl_torch_reference(hidden, weight, labels, temperature=1.0, reduction="none"):
    """A rewrite (not a copy) of what verl 0.9.1's pure-PyTorch references compute:
    ``_fused_linear_for_ppo_fwd`` in verl/utils/experimental/torch_functional.py and
    ``run_torch_entropy`` in verl's tests/utils/test_linear_cross_entropy.py (volcengine/verl on
    GitHub), the reference verl holds its Triton kernel to. Tokens flattened, fp32 logits divided
    by the temperature, entropy = logsumexp - sum(softmax * logits), log-probs = -cross_entropy
    with verl's reduction."""
    z = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t() / temperature
    entropy = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    logp = -torch.nn.functional.cross_entropy(z, labels.reshape(-1).long(), reduction=reduction.lower())
    return logp, entropy


NAMES = ("log_probs", "entropy", "dhidden", "dweight")


def _assert_close(got, dtype, temperature, reduction="none", same=None, g=None):
    """fp32: 2e-5 of float64. 16-bit: no worse than the same-dtype materialized reference's own
    error (or ``same``'s) plus a small slack."""
    exact = _run(_materialized(torch.float64), *g, temperature, reduction)
    if dtype == torch.float32:
        for name, x, r in zip(NAMES, got, exact, strict=True):
            assert rel_err(x, r) < 2e-5, name
        return
    same = same if same is not None else _run(_materialized(dtype), *g, temperature, reduction)
    for name, x, s, r in zip(NAMES, got, same, exact, strict=True):
        err, budget = rel_err(x, r), rel_err(s, r)
        assert err <= 1.5 * budget + 2e-3, f"{name}: {err:.2e} vs same-dtype reference {budget:.2e}"


# ----------------------------------------------------------------------------- always run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, temperature", CASES)
def test_matches_float64_reference(impl, dtype, lead, temperature):
    g = _inputs(lead, dtype, seed=1)
    got = _run(fv.linear_cross_entropy, *g, temperature, "none", impl=impl)
    n = int(torch.Size(lead).numel())
    assert got[0].shape == (n,) and got[1].shape == (n,)  # flat, as verl's kernel returns them
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].shape == g[0].shape and got[2].dtype == dtype and got[3].dtype == dtype
    _assert_close(got, dtype, temperature, g=g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "Mean"])
def test_reductions_are_scalar_log_probs(impl, reduction):
    lead, temperature = (2, 9), 1.3
    g = _inputs(lead, torch.float32, seed=2, scalar_grad=True)
    got = _run(fv.linear_cross_entropy, *g, temperature, reduction, impl=impl)
    assert got[0].shape == () and got[1].shape == (18,)
    per_token = fv.linear_cross_entropy(g[0], g[1], g[2], temperature, impl=impl)[0]
    want = per_token.sum() if reduction == "sum" else per_token.mean()
    assert torch.allclose(got[0], want, rtol=1e-6, atol=1e-6)
    _assert_close(got, torch.float32, temperature, reduction, g=g)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("lead, temperature", CASES)
def test_matches_transcribed_verl_torch_reference(reduction, lead, temperature):
    g = _inputs(lead, torch.float32, seed=3, scalar_grad=reduction != "none")
    got = _run(fv.linear_cross_entropy, *g, temperature, reduction, impl="torch")
    ref = _run(_verl_torch_reference, *g, temperature, reduction)
    for name, x, r in zip(NAMES, got, ref, strict=True):
        assert x.shape == r.shape and rel_err(x, r) < 2e-5, name


def test_megatron_layout_and_int32_labels():
    """Megatron's fused forward passes (S, 1, H) hidden states (a transposed view) with (1, S)
    labels; tokens pair up in row-major order, as in verl's kernel."""
    S = 23
    h, w, y, _, _ = _inputs((1, S), torch.float32, seed=4)
    sbh = h.transpose(0, 1)  # (S, 1, H), not contiguous
    logp, ent = fv.linear_cross_entropy(sbh, w, y.int(), 1.0, "none", None, impl="torch")
    flat = fv.linear_cross_entropy(h.reshape(S, H), w, y.reshape(S), impl="torch")
    assert logp.shape == (S,) and torch.equal(logp, flat[0]) and torch.equal(ent, flat[1])


def test_hook_has_verls_signature():
    hook = fv.make_hook("torch")
    params = list(inspect.signature(hook).parameters.values())
    assert [(p.name, p.default) for p in params] == VERL_SIGNATURE
    ours = list(inspect.signature(fv.linear_cross_entropy).parameters.values())[:6]
    assert [(p.name, p.default) for p in ours] == VERL_SIGNATURE
    h, w, y, _, _ = _inputs((5,), torch.float32)
    a = hook(h, w, y, 0.5, "none", None)
    b = fv.linear_cross_entropy(h, w, y, temperature=0.5, impl="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="impl"):
        fv.make_hook("cuda")


def _bad(**change):
    h, w, y, _, _ = _inputs((2, 3), torch.float32)
    kw = dict(hidden=h, weight=w, labels=y, temperature=1.0, reduction="none", dist_process_group=None)
    kw.update(change)
    return kw


@pytest.mark.parametrize(
    "change, error, name",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(reduction=None), TypeError, "reduction"),
        (dict(temperature="1.0"), TypeError, "temperature"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(labels=torch.zeros(2, 3)), TypeError, "labels"),
        (dict(labels=torch.zeros(7, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=torch.full((2, 3), V, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=torch.full((2, 3), -100, dtype=torch.long)), ValueError, "labels"),
        (dict(labels=[1, 2, 3, 4, 5, 6]), TypeError, "labels"),
        (dict(hidden=torch.randn(H)), ValueError, "hidden"),
        (dict(hidden=torch.randn(2, 3, H).numpy()), TypeError, "hidden"),
        (dict(weight=torch.randn(V, H + 1)), ValueError, "weight"),
        (dict(weight=torch.randn(V, H, dtype=torch.float64).to(torch.bfloat16)), TypeError, "weight"),
        (dict(dist_process_group="tp"), TypeError, "dist_process_group"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_arguments_name_the_argument(change, error, name):
    kw = _bad(**change)
    kw["labels"] = kw["labels"].to(DEVICE) if isinstance(kw["labels"], torch.Tensor) else kw["labels"]
    with pytest.raises(error, match=name):
        fv.linear_cross_entropy(**kw, impl="torch")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_process_group_of_one_is_accepted_larger_refused(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        h, w, y, _, _ = _inputs((4, 5), torch.float32)
        a = fv.linear_cross_entropy(h, w, y, 1.0, "none", dist.group.WORLD, impl="torch")
        b = fv.linear_cross_entropy(h, w, y, impl="torch")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        monkeypatch.setattr(fv.dist, "get_world_size", lambda group=None: 2)
        with pytest.raises(ValueError, match="dist_process_group has world size 2"):
            fv.linear_cross_entropy(h, w, y, 1.0, "none", dist.group.WORLD, impl="torch")
    finally:
        dist.destroy_process_group()


def test_importing_the_adapter_does_not_import_verl():
    code = "import sys, fastgrpo.integrations, fastgrpo.integrations.verl; print('verl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def fake_verl(monkeypatch):
    """A stand-in for verl's module tree (source module, a by-value importer, a lazy importer), so
    install's patching is tested without verl; sys.modules is restored afterwards."""

    def verls(*args, **kw):
        raise AssertionError("verl's CUDA kernel was called")

    mods = {}
    for name in ("verl", "verl.utils", "verl.utils.kernel", fv.VERL_MODULE, fv.BY_VALUE_IMPORTERS[0]):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods[fv.VERL_MODULE].linear_cross_entropy = verls
    mods[fv.BY_VALUE_IMPORTERS[0]].linear_cross_entropy = verls
    unrelated = types.ModuleType("unrelated_probe")
    unrelated.linear_cross_entropy = lambda *a: None  # someone else's function of the same name
    monkeypatch.setitem(sys.modules, "unrelated_probe", unrelated)
    return mods, verls, unrelated


def test_install_patches_source_and_by_value_importers(fake_verl):
    mods, verls, unrelated = fake_verl
    source, by_value = mods[fv.VERL_MODULE], mods[fv.BY_VALUE_IMPORTERS[0]]
    assert fv.installed_impl() is None
    patched = fv.install("torch")
    assert patched == [fv.VERL_MODULE, fv.BY_VALUE_IMPORTERS[0]]
    assert source.linear_cross_entropy is by_value.linear_cross_entropy and fv.installed_impl() == "torch"
    assert unrelated.linear_cross_entropy is not source.linear_cross_entropy
    h, w, y, _, _ = _inputs((3, 4), torch.float32)
    logp, ent = by_value.linear_cross_entropy(h, w, y, 1.0, "none")  # verl's would raise
    assert logp.shape == (12,)
    fv.install("auto")  # idempotent: switches impl everywhere, keeps verl's original
    assert by_value.linear_cross_entropy._fastgrpo_impl == "auto" and fv.installed_impl() == "auto"
    assert sorted(fv.uninstall()) == sorted(patched)
    assert source.linear_cross_entropy is verls and by_value.linear_cross_entropy is verls
    assert fv.installed_impl() is None and fv.uninstall() == []


# ----------------------------------------------------------------------------- with verl installed


@pytest.fixture
def real_verl():
    pytest.importorskip("verl")
    lce = importlib.import_module(fv.VERL_MODULE)
    fv.uninstall()  # e.g. VERL_USE_EXTERNAL_MODULES in this shell
    yield lce
    fv.uninstall()
    sys.modules.pop("fastgrpo.integrations.verl_plugin", None)


def test_signature_matches_verls(real_verl):
    params = list(inspect.signature(real_verl.LinearCrossEntropy.forward).parameters.values())[1:]  # drop ctx
    assert [(p.name, p.default) for p in params] == VERL_SIGNATURE


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, temperature", CASES)
def test_matches_verl_torch_backend(real_verl, impl, dtype, lead, temperature):
    """verl's own pure-PyTorch implementation (``FusedLinearForPPO``, what
    ``fused_kernel_options.impl_backend=torch`` runs), in small chunks."""
    tf = importlib.import_module("verl.utils.experimental.torch_functional")
    if tf._FLASH_ATTN_CROSS_ENTROPY_AVAILABLE and DEVICE.type != "cuda":
        pytest.skip("verl's torch backend takes flash-attn's CUDA cross entropy when it is installed")
    verl_torch = tf.FusedLinearForPPO(chunk_size=16, impl_backend="torch")

    def theirs(hidden, weight, labels, temperature):
        logp, ent = verl_torch(hidden, weight, labels, temperature=temperature)
        return logp.reshape(-1), ent.reshape(-1)  # (B, T) for 3-D inputs: the kernel's are flat

    g = _inputs(lead, dtype, seed=5)
    got = _run(fv.linear_cross_entropy, *g, temperature, "none", impl=impl)
    ref = _run(theirs, *g, temperature)
    if dtype == torch.float32:
        for name, x, r in zip(NAMES, got, ref, strict=True):
            assert rel_err(x, r) < 2e-5, name
    _assert_close(got, dtype, temperature, same=ref if dtype != torch.float32 else None, g=g)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="verl's Triton kernel needs CUDA")
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_verl_triton_kernel(real_verl, reduction):
    """verl's own fused kernel (hidden size a multiple of 128), bf16 as verl's tests run it."""
    g = _inputs((1, 301), torch.bfloat16, seed=6, scalar_grad=reduction != "none", hidden_size=128)
    got = _run(fv.linear_cross_entropy, *g, 0.9, reduction)
    ref = _run(real_verl.linear_cross_entropy, *g, 0.9, reduction)
    exact = _run(_materialized(torch.float64), *g, 0.9, reduction)
    for name, x, r, e in zip(NAMES, got, ref, exact, strict=True):
        assert x.shape == r.shape, name
        assert rel_err(x, e) <= 1.5 * rel_err(r, e) + 2e-3, name


def test_install_reaches_verls_model_forward(real_verl, monkeypatch):
    """verl's FSDP forward patch with the triton backend calls fastgrpo's function after install
    and gives what verl's torch backend gives, gradients of the model included."""
    transformers = pytest.importorskip("transformers")
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    cls = transformers.LlamaForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # verl patches the class: restore it afterwards
    cfg = transformers.LlamaConfig(
        vocab_size=203,
        hidden_size=40,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = cls(cfg).to(DEVICE)
    ids = torch.randint(0, 203, (1, 29), device=DEVICE)
    g_lp, g_ent = torch.randn(29, device=DEVICE), torch.randn(29, device=DEVICE)

    def run(backend):
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)
        model.zero_grad()
        out = model(input_ids=ids, return_dict=True, temperature=0.7)
        logp, ent = out.log_probs.reshape(-1), out.entropy.reshape(-1)
        (logp * g_lp + ent * g_ent).sum().backward()
        return logp.detach(), ent.detach(), model.lm_head.weight.grad.clone(), model.model.norm.weight.grad.clone()

    if DEVICE.type != "cuda":
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
        with pytest.raises((AssertionError, RuntimeError)):  # verl's kernel is CUDA only
            model(input_ids=ids, return_dict=True, temperature=0.7)
    assert fv.install("torch")[0] == fv.VERL_MODULE
    calls = []
    hook = real_verl.linear_cross_entropy
    monkeypatch.setattr(real_verl, "linear_cross_entropy", lambda *a, **k: calls.append(a[3:]) or hook(*a, **k))
    got = run("triton")
    assert calls == [(0.7, "none")] and got[0].shape == (29,)
    ref = run("torch")
    for name, x, r in zip(("log_probs", "entropy", "dlm_head", "dnorm"), got, ref, strict=True):
        assert rel_err(x, r) < 2e-5, name


def test_install_patches_loaded_by_value_importers(real_verl, monkeypatch):
    original = real_verl.linear_cross_entropy
    probe = types.ModuleType("by_value_probe")  # as `from verl.utils.kernel.linear_cross_entropy import ...`
    probe.linear_cross_entropy = original
    monkeypatch.setitem(sys.modules, "by_value_probe", probe)
    patched = fv.install()
    assert patched[0] == fv.VERL_MODULE and "by_value_probe" in patched
    assert probe.linear_cross_entropy is real_verl.linear_cross_entropy is not original
    for name in fv.BY_VALUE_IMPORTERS:  # the Megatron forwards, where megatron-core is installed
        if name in sys.modules:
            assert sys.modules[name].linear_cross_entropy is real_verl.linear_cross_entropy
    fv.uninstall()
    assert real_verl.linear_cross_entropy is original and probe.linear_cross_entropy is original


@pytest.mark.parametrize("impl_env", [None, "torch"])
def test_external_lib_loads_the_plugin(real_verl, monkeypatch, impl_env):
    """``model.external_lib`` goes through ``import_external_libs`` in HFModelConfig.__post_init__."""
    from verl.utils.import_utils import import_external_libs

    if impl_env is None:
        monkeypatch.delenv("FASTGRPO_VERL_IMPL", raising=False)
    else:
        monkeypatch.setenv("FASTGRPO_VERL_IMPL", impl_env)
    sys.modules.pop("fastgrpo.integrations.verl_plugin", None)
    assert fv.installed_impl() is None
    import_external_libs("fastgrpo.integrations.verl_plugin")
    assert fv.installed_impl() == (impl_env or "auto")
    assert sys.modules["fastgrpo.integrations.verl_plugin"].PATCHED[0] == fv.VERL_MODULE


def test_hf_model_config_external_lib_installs(real_verl, tmp_path):
    """The config line itself: HFModelConfig(external_lib=...) as each worker's init_model builds it."""
    transformers = pytest.importorskip("transformers")
    config_mod = pytest.importorskip("verl.workers.config.model")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        architectures=["LlamaForCausalLM"],
    )
    cfg.save_pretrained(tmp_path)
    sys.modules.pop("fastgrpo.integrations.verl_plugin", None)
    assert fv.installed_impl() is None
    config_mod.HFModelConfig(path=str(tmp_path), load_tokenizer=False, external_lib="fastgrpo.integrations.verl_plugin")
    assert fv.installed_impl() is not None


def test_env_var_loads_the_plugin_at_import_verl(real_verl):
    """``VERL_USE_EXTERNAL_MODULES`` is read by verl/__init__.py in a fresh process."""
    code = (
        "import torch, verl.utils.kernel.linear_cross_entropy as m\n"
        "h, w, y = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))\n"
        "lp, ent = m.linear_cross_entropy(h, w, y, 1.0, 'none')\n"
        "print(m.linear_cross_entropy._fastgrpo_impl, tuple(lp.shape), lp.dtype)\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="fastgrpo.integrations.verl_plugin", FASTGRPO_VERL_IMPL="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "torch (6,) torch.float32"
