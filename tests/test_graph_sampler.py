"""The ``graph`` backend's parts: the slot forward against each supported family's own forward, the
logits processing against transformers' processors, compaction, chunks, LoRA, refusals (CPU, eager)."""

from __future__ import annotations

import pytest
import torch

from fastgrpo.train.data import format_prompt
from fastgrpo.train.policy import completion_logprobs
from fastgrpo.train.sampling import HFGenerator, SamplingParams
from fastgrpo.train.sampling import graph as G
from fastgrpo.train.sampling.slot_model import SlotCache, check_supported, slot_forward

ROWS = ("completion_ids", "completion_mask", "truncated")


@pytest.fixture(scope="module")
def model_and_tokenizer(embedded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = embedded
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _prompts(tok):
    return [format_prompt(tok, q, s) for q, s in (("3+4", None), ("9+9", "Add the two digits."), ("0+5", "Add."))]


def _same_rows(got, want):
    for name in ROWS:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, msg=name)


def _logprobs_are_the_policys(policy, ro, temperature):
    m = ro.completion_mask
    want = completion_logprobs(policy, ro, temperature, "torch")[m]
    torch.testing.assert_close(ro.sampler_logprobs[m], want, rtol=1e-5, atol=1e-5)


def _tiny(kind: str, dtype=torch.float32):
    import transformers

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config = {
        "llama": lambda: transformers.LlamaConfig(**common, attention_bias=True),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=32),  # head_dim != hidden / heads
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slot_forward_is_the_models_forward(kind, dtype):
    """Prompts of different lengths in one call (right padding written, never read), then one token at a
    time, against the model's own forward of each sequence alone."""
    model = _tiny(kind, dtype)
    torch.manual_seed(1)
    lengths = [9, 5, 12]
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    tokens = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        cache = SlotCache.empty(model, 3, 32, "cpu", dtype)
        prefill = slot_forward(model, tokens, torch.arange(12).expand(3, 12), cache)
        nxt = torch.tensor([[5], [6], [7]])
        step = slot_forward(model, nxt, torch.tensor(lengths)[:, None], cache)
        for i, s in enumerate(seqs):
            want = model(torch.cat([s, nxt[i]])[None]).logits[0].float()
            got = torch.cat([prefill[i, : len(s)], step[i]]).float()
            torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))


def test_processed_logits_are_transformers_processors():
    """Repetition penalty, temperature, top-k and top-p, in transformers' order, as its processors make them."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 40) * 3
    history = torch.randint(0, 40, (5, 7))
    seen = torch.zeros(5, 40, dtype=torch.bool).scatter_(1, history, True)
    for params in (
        SamplingParams(1, 1, temperature=0.7),
        SamplingParams(1, 1, temperature=1.3, top_k=4),
        SamplingParams(1, 1, top_p=0.6),
        SamplingParams(1, 1, temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.3),
    ):
        want = logits.clone()
        if params.repetition_penalty != 1.0:
            want = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(history, want)
        if params.temperature != 1.0:
            want = TemperatureLogitsWarper(params.temperature)(history, want)
        if params.top_k:
            want = TopKLogitsWarper(params.top_k)(history, want)
        if params.top_p < 1:
            want = TopPLogitsWarper(params.top_p)(history, want)
        torch.testing.assert_close(G.process_logits(logits, seen, params), want, rtol=0, atol=1e-6)


def test_draw_samples_the_processed_distribution():
    """Gumbel-max over log-softmax: 40,000 draws from a 5-token distribution, each frequency within 4
    standard errors; the reported log-prob is the drawn token's."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40_000, 5).contiguous()
    token, logp = G.draw(logits)
    freq = torch.bincount(token, minlength=5).double() / 40_000
    se = (probs * (1 - probs) / 40_000).sqrt().double()
    assert ((freq - probs.double()).abs() <= 4 * se + 1e-12).all(), freq
    torch.testing.assert_close(logp, probs.log()[token])


def test_compaction_keeps_every_row_and_halves_the_batch(model_and_tokenizer, monkeypatch):
    """Looking after every step, the batch shrinks (12 slots -> 6 -> ... as rows finish); the rows are
    still hf's greedy rows, in order."""
    model, tok = model_and_tokenizer
    sizes = []
    run = G.GraphGenerator._run_step
    monkeypatch.setattr(G.GraphGenerator, "_run_step", lambda self, b, p, e: (sizes.append(b.size), run(self, b, p, e)))
    params = SamplingParams(num_generations=4, max_completion_length=14, top_k=1)
    want = HFGenerator(model, tok, 64).generate(_prompts(tok), params)
    got = G.GraphGenerator(model, tok, 64, check_every=1).generate(_prompts(tok), params)
    _same_rows(got, want)
    assert sizes[0] == 12 and min(sizes) < 12 and sizes == sorted(sizes, reverse=True), sizes
    assert set(sizes) <= {12, 6, 3, 2, 1}


def test_shrink_halves_while_the_rows_fit():
    assert [G.shrink(128, n) for n in (128, 65, 64, 33, 32, 1)] == [128, 128, 64, 64, 32, 1]
    assert G.shrink(12, 3) == 3 and G.shrink(12, 4) == 6 and G.shrink(1, 1) == 1


def test_calls_of_batch_size_rows_give_the_same_rows(model_and_tokenizer):
    model, tok = model_and_tokenizer
    whole = SamplingParams(num_generations=2, max_completion_length=10, top_k=1)
    one_prompt = SamplingParams(num_generations=2, max_completion_length=10, top_k=1, batch_size=2)
    a = G.GraphGenerator(model, tok, 64).generate(_prompts(tok), whole)
    b = G.GraphGenerator(model, tok, 64).generate(_prompts(tok), one_prompt)
    _same_rows(a, b)


def test_repetition_penalty_is_applied_to_prompt_and_completion_tokens(model_and_tokenizer):
    """The sampler's log-prob of each token is taken after the penalty on every real token before it
    (the prompt's, padding excluded, and the completion's so far), then the temperature."""
    model, tok = model_and_tokenizer
    params = SamplingParams(4, 10, temperature=0.9, repetition_penalty=1.8)
    torch.manual_seed(0)
    ro = G.GraphGenerator(model, tok, 64).generate(_prompts(tok), params)
    m = ro.completion_mask
    for i in range(len(ro)):
        prompt = ro.prompt_ids[i][ro.prompt_mask[i]]
        completion = ro.completion_ids[i][m[i]]
        with torch.no_grad():
            logits = model(torch.cat([prompt, completion])[None]).logits[0, len(prompt) - 1 : -1].float()
        for t in range(len(completion)):
            seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
            seen[torch.cat([prompt, completion[:t]])] = True
            x = G.process_logits(logits[t : t + 1], seen[None], params)
            want = x.log_softmax(-1)[0, completion[t]]
            torch.testing.assert_close(ro.sampler_logprobs[i, t], want, rtol=1e-5, atol=1e-5)


def test_a_lora_policy_samples_as_hf(model_and_tokenizer):
    import peft

    model, tok = model_and_tokenizer
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = peft.get_peft_model(model, lora)
    try:
        params = SamplingParams(num_generations=2, max_completion_length=10, top_k=1)
        want = HFGenerator(policy, tok, 64).generate(_prompts(tok), params)
        got = G.GraphGenerator(policy, tok, 64).generate(_prompts(tok), params)
        _same_rows(got, want)
        torch.manual_seed(0)
        ro = G.GraphGenerator(policy, tok, 64).generate(_prompts(tok), SamplingParams(4, 12, temperature=0.7))
        _logprobs_are_the_policys(policy, ro, 0.7)
    finally:
        policy.unload()


def test_other_families_and_long_sliding_windows_are_refused():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="runs model_type llama/mistral/qwen2/qwen3, not 'gpt2'"):
        check_supported(gpt2, 10)
    mistral = _tiny("mistral")
    mistral.config.sliding_window = 16
    check_supported(mistral, 16)
    with pytest.raises(ValueError, match=r"prompt \+ completion \(17\) is longer than the model's sliding window"):
        check_supported(mistral, 17)


def test_the_decode_kernel_in_the_loop_gives_hf_rows(model_and_tokenizer, monkeypatch):
    """The split-KV Triton kernel (interpreted) in place of the twin for the one-token steps: hf's greedy
    rows, and log-probs the policy's."""
    from fastgrpo.train.sampling import slot_model

    monkeypatch.setattr(slot_model, "DECODE_IMPL", "triton")
    model, tok = model_and_tokenizer
    params = SamplingParams(num_generations=2, max_completion_length=8, top_k=1)
    want = HFGenerator(model, tok, 64).generate(_prompts(tok), params)
    got = G.GraphGenerator(model, tok, 64, check_every=2).generate(_prompts(tok), params)
    _same_rows(got, want)
    torch.manual_seed(0)
    ro = G.GraphGenerator(model, tok, 64).generate(_prompts(tok), SamplingParams(2, 8, temperature=0.7))
    _logprobs_are_the_policys(model, ro, 0.7)


def test_the_cli_refuses_another_family_before_loading_it(tmp_path, capsys):
    """A local model of another family (its config.json says gpt2; no weights: loading would fail
    otherwise) is one line before the output folder is made."""
    from fastgrpo.cli import main

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+2", "answer": "3"}\n{"prompt": "2+2", "answer": "4"}\n')
    out = tmp_path / "out"
    argv = ["train", "--generation_backend", "graph", "--model", str(model), "--dataset", str(data)]
    assert main([*argv, "--output_dir", str(out), "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastgrpo train: error:")]
    assert len(errors) == 1 and "runs model_type llama/mistral/qwen2/qwen3, not 'gpt2'" in errors[0], errors
    assert not out.exists()


def test_dynamic_rope_is_refused():
    """Dynamic NTK scaling recomputes its frequencies on the host from the longest position seen, which a
    CUDA graph cannot replay."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="cannot run dynamic RoPE scaling"):
        check_supported(model, 10)
    check_supported(_tiny("llama"), 10)


def test_prompts_per_call_follow_batch_size_and_the_device(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = G.GraphGenerator(model, tok, 64)
    assert gen._prompts_per_call(7, 20, SamplingParams(4, 16)) == 7  # CPU: all of them
    assert gen._prompts_per_call(7, 20, SamplingParams(4, 16, batch_size=8)) == 2
    assert gen._prompts_per_call(7, 20, SamplingParams(4, 16, batch_size=3)) == 1
