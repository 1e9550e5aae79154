"""The sampling backends on CUDA (skipped without one; the vLLM tests also without vLLM installed).

The CPU suite holds ``hf`` and ``continuous`` to the same checks on CPU, and ``vllm``'s translations to
a fake engine (``test_vllm_backend.py``); these run the real things: the sampler's log-probs against the
policy's own, greedy identity across backends, and vLLM's weight push, LoRA merge and sleep mode.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fastgrpo.train import attention
from fastgrpo.train.data import format_prompt
from fastgrpo.train.policy import completion_logprobs
from fastgrpo.train.sampling import HFGenerator, SamplingParams
from fastgrpo.train.sampling.continuous import ContinuousGenerator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded):
    """The embedded model on the GPU in fp32, as the trainer holds it (training attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attention.register()
    model_dir, _ = embedded
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention.NAME, dtype=torch.float32)
    return model.to("cuda").train(), AutoTokenizer.from_pretrained(model_dir), model_dir


def _prompts(tokenizer) -> list[str]:
    return [format_prompt(tokenizer, q, s) for q, s in (("3+4", None), ("9+9", "Add the two digits."), ("0+5", "Add."))]


def _vllm(model, tokenizer, model_dir, tmp_path, **values):
    from fastgrpo.train.config import build_config
    from fastgrpo.train.sampling.vllm import VLLMGenerator, VLLMSettings

    base = dict(model=model_dir, output_dir=str(tmp_path), max_prompt_length=64, max_completion_length=16)
    base.update(vllm_gpu_memory_utilization=0.2, vllm_enable_sleep_mode=True)
    return VLLMGenerator(model, tokenizer, VLLMSettings.from_config(build_config(({**base, **values}, "test"))))


def _assert_logprobs_are_the_policys(model, ro, temperature, tol):
    want = completion_logprobs(model, ro, temperature, "torch")
    m = ro.completion_mask
    assert ro.sampler_logprobs is not None and (ro.sampler_logprobs[~m] == 0).all()
    torch.testing.assert_close(ro.sampler_logprobs[m], want[m], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [HFGenerator, ContinuousGenerator], ids=["hf", "continuous"])
def test_sampler_logprobs_are_the_policys_on_cuda(model_and_tokenizer, backend):
    model, tok, _ = model_and_tokenizer
    torch.manual_seed(0)
    ro = backend(model, tok, 64).generate(_prompts(tok), SamplingParams(4, 16, temperature=0.7))
    assert ro.completion_ids.is_cuda
    _assert_logprobs_are_the_policys(model, ro, 0.7, 1e-4)


def test_greedy_is_identical_across_backends_on_cuda(model_and_tokenizer):
    model, tok, _ = model_and_tokenizer
    params = SamplingParams(num_generations=2, max_completion_length=8, top_k=1)
    hf = HFGenerator(model, tok, 64).generate(_prompts(tok), params)
    cb = ContinuousGenerator(model, tok, 64).generate(_prompts(tok), params)
    for name in ("completion_ids", "completion_mask", "truncated"):
        torch.testing.assert_close(getattr(cb, name), getattr(hf, name), rtol=0, atol=0, msg=name)


def test_graph_backend_on_cuda_replays_graphs_and_matches_hf(model_and_tokenizer):
    """The graph backend on CUDA: captured once per batch size, greedy rows equal hf's (looking after
    every step, so the batch shrinks and several graphs run), log-probs the policy's at temperature 0.7,
    and a second call (new buffers) captures anew."""
    from fastgrpo.train.sampling.graph import GraphGenerator

    model, tok, _ = model_and_tokenizer
    params = SamplingParams(num_generations=4, max_completion_length=16, top_k=1)
    gen = GraphGenerator(model, tok, 64, check_every=1)
    hf = HFGenerator(model, tok, 64).generate(_prompts(tok), params)
    for _ in range(2):
        got = gen.generate(_prompts(tok), params)
        for name in ("completion_ids", "completion_mask", "truncated"):
            torch.testing.assert_close(getattr(got, name), getattr(hf, name), rtol=0, atol=0, msg=name)
        assert len([k for k in gen._graphs if isinstance(k, int)]) >= 2
    torch.manual_seed(0)
    ro = gen.generate(_prompts(tok), SamplingParams(4, 16, temperature=0.7))
    _assert_logprobs_are_the_policys(model, ro, 0.7, 1e-4)


@needs_vllm
def test_vllm_samples_what_the_policy_scores_and_follows_its_updates(model_and_tokenizer, tmp_path):
    """Processed log-probs equal the policy's; after sleep, a weight change and a push, they equal the
    changed policy's; sleeping gives memory back."""
    model, tok, model_dir = model_and_tokenizer
    gen = _vllm(model, tok, model_dir, tmp_path)
    params = SamplingParams(4, 16, temperature=0.7)
    ro = gen.generate(_prompts(tok), params)
    _assert_logprobs_are_the_policys(model, ro, 0.7, 2e-3)
    free_awake = torch.cuda.mem_get_info()[0]
    gen.release()
    assert torch.cuda.mem_get_info()[0] > free_awake  # the KV cache (and weights, level 1) left the GPU
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
        gen.update_weights()
        ro = gen.generate(_prompts(tok), params)
        _assert_logprobs_are_the_policys(model, ro, 0.7, 2e-3)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


@needs_vllm
def test_vllm_samples_from_the_merged_lora_policy(model_and_tokenizer, tmp_path):
    import peft

    model, tok, model_dir = model_and_tokenizer
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = peft.get_peft_model(model, lora)
    try:
        gen = _vllm(policy, tok, model_dir, tmp_path)
        ro = gen.generate(_prompts(tok), SamplingParams(4, 16, temperature=0.7))
        _assert_logprobs_are_the_policys(policy, ro, 0.7, 2e-3)
    finally:
        policy.unload()  # the module fixture's model, without adapters, for the tests after this one
