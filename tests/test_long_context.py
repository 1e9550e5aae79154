"""Long-context update machinery: token-budget micro-batches, sdpa_varlen packing, LoRA, memory plan."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import transformers

from fastgrpo.train import attention
from fastgrpo.train.config import build_config
from fastgrpo.train.trainer import GRPOTrainer
from fastgrpo.train.update import plan_micro_batches

from helpers import train_config


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_plan_respects_the_budget(packed):
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        P = [rng.randint(1, 30) for _ in range(n)]
        C = [rng.randint(1, 200) for _ in range(n)]
        budget = rng.randint(20, 600)
        groups = plan_micro_batches(P, C, 8, budget, packed)
        assert sorted(i for g in groups for i in g) == list(range(n))  # every row exactly once
        for g in groups:
            cost = sum(P[i] + C[i] for i in g) if packed else len(g) * (max(P[i] for i in g) + max(C[i] for i in g))
            assert cost <= budget or len(g) == 1  # only a sequence longer than the budget overflows, alone
        # First-fit decreasing never leaves two micro-batches that would fit together in one.
        if packed:
            costs = sorted(sum(P[i] + C[i] for i in g) for g in groups)
            assert len(costs) < 2 or costs[0] + costs[1] > budget


def test_without_budget_micro_batches_are_consecutive_rows():
    assert plan_micro_batches([1] * 7, [2] * 7, 3, None, True) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize(
    "loss_type, padding_free", [("dapo", True), ("dapo", False), ("bnpo", True), ("grpo", True), ("dr_grpo", True)]
)
def test_token_budget_micro_batches_give_the_whole_batch_gradient(embedded, tmp_path, loss_type, padding_free):
    cfg = train_config(embedded, tmp_path, max_steps=1, loss_type=loss_type, beta=0.04, padding_free=padding_free)
    trainer = GRPOTrainer(cfg)
    batch = trainer.sample_batch()
    lengths = (batch.rollouts.prompt_mask.sum(1) + batch.rollouts.completion_mask.sum(1)).tolist()
    if not padding_free:  # a padded micro-batch costs rows x (longest prompt + longest completion)
        lengths = [batch.rollouts.trim().prompt_ids.shape[1] + batch.rollouts.trim().completion_ids.shape[1]]
    results = []
    for size, budget in ((16, None), (16, max(lengths) + 3), (16, 2 * max(lengths) + 5)):
        trainer.updater.settings = dataclasses.replace(
            trainer.updater.settings, micro_batch_rows=size, max_tokens_per_microbatch=budget
        )
        micro = trainer.updater.micro_batches(batch)
        assert len(micro) == 1 if budget is None else len(micro) > 1
        ref_lp = [trainer.updater.ref_logprobs(m.rollouts) for m in micro]
        trainer.optimizer.zero_grad(set_to_none=True)
        out = trainer.updater.accumulate_gradients(batch, micro, None, ref_lp)
        results.append((out["loss"], _grads(trainer.model)))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-4, abs=1e-7)
        torch.testing.assert_close(grads, results[0][1], rtol=1e-4, atol=1e-7)
    assert results[0][1].abs().sum() > 0


def _tiny_lm(attn):
    cfg = transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    attention.register()
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)


def test_sdpa_varlen_packs_without_a_dense_mask(monkeypatch):
    import transformers.masking_utils as mu

    model = _tiny_lm(attention.NAME)
    lengths = [7, 1, 13, 4]
    ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = []
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: calls.append(k) or pytest.fail("dense mask built"))
    packed = model.base_model(input_ids=ids, position_ids=pos).last_hidden_state
    assert calls == []
    monkeypatch.undo()
    alone = [model.base_model(input_ids=x).last_hidden_state for x in ids.split(lengths, dim=1)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=1e-5, atol=1e-6)
    # Plain sdpa on the same packed row (transformers' block-diagonal mask) agrees too.
    dense = _tiny_lm("sdpa").base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-6)


def test_sdpa_varlen_generation_equals_sdpa():
    prompts = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    outs = [
        _tiny_lm(attn).generate(prompts, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for attn in ("sdpa", attention.NAME)
    ]
    assert torch.equal(outs[0], outs[1])


def test_padding_free_auto_and_config_switches():
    from fastgrpo.train.modeling import resolve_padding_free

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_padding_free(None, attention.NAME, cuda) and resolve_padding_free(None, "flash_attention_2", cuda)
    assert not resolve_padding_free(None, "sdpa", cuda) and resolve_padding_free(True, "sdpa", cuda)
    assert not resolve_padding_free(None, attention.NAME, cpu) and resolve_padding_free(True, attention.NAME, cpu)
    cfg = build_config(({"padding_free": "auto", "use_liger_body": "false", "max_tokens_per_microbatch": "4096"}, "t"))
    assert cfg.padding_free is None and cfg.use_liger_body is False and cfg.max_tokens_per_microbatch == 4096
    with pytest.raises(ValueError, match="offload_activations needs gradient_checkpointing"):
        build_config(({"offload_activations": True, "gradient_checkpointing": False}, "t"))
    with pytest.raises(ValueError, match="max_tokens_per_microbatch must be > 0"):
        build_config(({"max_tokens_per_microbatch": 0}, "t"))


def test_offload_gives_the_same_gradients_in_the_update(embedded, tmp_path):
    grads = []
    for offload in (False, True):
        trainer = GRPOTrainer(train_config(embedded, tmp_path / str(offload), max_steps=1, offload_activations=offload))
        torch.manual_seed(3)
        batch = trainer.sample_batch()
        trainer.updater.accumulate_gradients(batch)
        grads.append(_grads(trainer.model))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_lora_reference_is_the_base_model_and_head_is_frozen(embedded, tmp_path):
    pytest.importorskip("peft")  # an optional extra; the dev install has it
    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=2, use_peft=True, lora_r=4, beta=0.04,
                                       learning_rate=1e-2))  # fmt: skip
    assert trainer.ref_model is None  # no second copy of the weights
    base = GRPOTrainer(train_config(embedded, tmp_path / "base", max_steps=1, beta=0.0)).model
    batch = trainer.sample_batch()
    mb = trainer.updater.micro_batches(batch)[0].rollouts
    trainer.updater.update(batch)  # the adapters move away from zero
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    ref = trainer.updater.ref_logprobs(mb)
    torch.testing.assert_close(ref, trainer.updater.logprobs(base, mb), rtol=1e-5, atol=1e-5)
    assert (trainer.updater.logprobs(trainer.model, mb) - ref)[mb.completion_mask].abs().max() > 1e-4
    rows = trainer.train()
    assert all(r["kl"] >= 0 for r in rows)
    final = sorted(tmp_path.glob("checkpoint-*"))[-1]
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    resumed = GRPOTrainer(train_config(embedded, tmp_path, max_steps=3, use_peft=True, lora_r=4, beta=0.04,
                                       resume_from_checkpoint="latest"))  # fmt: skip
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_memory_plan_is_in_the_first_metrics_row(embedded, tmp_path):
    rows = GRPOTrainer(train_config(embedded, tmp_path, max_steps=2, beta=0.04)).train()
    plan = {k: v for k, v in rows[0].items() if k.startswith("memory/plan_")}
    assert plan["memory/plan_weights_gb"] > 0 and plan["memory/plan_ref_weights_gb"] == plan["memory/plan_weights_gb"]
    assert plan["memory/plan_total_gb"] >= plan["memory/plan_activations_gb"] > 0
    assert not any(k.startswith("memory/plan_") for k in rows[1])
    assert rows[0]["micro_batches"] == 2


def test_config_yaml_records_what_was_asked_not_what_it_resolved_to(embedded, tmp_path):
    """auto stays auto in config.yaml (the run's and each checkpoint's): a GPU run resolves padding_free
    and use_liger_body to on, and its checkpoint must still resume on a CPU, where auto means off."""
    from fastgrpo.train.config import load_yaml

    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, save_steps=1))
    trainer.train()
    for path in (tmp_path / "config.yaml", tmp_path / "checkpoint-1" / "config.yaml"):
        saved = load_yaml(path)["model"]
        assert saved["padding_free"] is None and saved["use_liger_body"] is None, path
    assert trainer.model_info.padding_free is False and trainer.updater.settings.packed is False  # resolved, kept apart
    forced = GRPOTrainer(train_config(embedded, tmp_path / "on", max_steps=1, padding_free=True))
    assert (
        forced.updater.settings.packed is True and load_yaml(tmp_path / "on" / "config.yaml")["model"]["padding_free"]
    )
