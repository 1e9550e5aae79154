"""The memory plan counts both phases: the update and sampling (each backend's cache)."""

import types

import pytest
import torch

from fastgrpo.train.memory import GB, memory_plan, sampling_gb, tokens_per_microbatch
from fastgrpo.train.modeling import ModelInfo

from helpers import train_config


def _cfg(**values):
    base = dict(max_prompt_length=100, max_completion_length=300, generation_batch_size=None,
                per_device_train_batch_size=4, gradient_accumulation_steps=2,
                vllm_gpu_memory_utilization=0.25, vllm_enable_sleep_mode=True)  # fmt: skip
    base.update(values)
    cfg = types.SimpleNamespace(**base)
    cfg.generation_batch_size_total = lambda: cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return cfg


@pytest.mark.parametrize("backend", ["hf", "continuous"])
def test_kv_cache_bound_of_the_transformers_backends(backend):
    # 8 rows (4 x 2) of 400 tokens at 1000 B per token, plus one fp32 logits row each.
    assert sampling_gb(_cfg(), backend, 1000, 50, torch.device("cpu")) == ((8 * 400 * 1000 + 8 * 50 * 4) / GB, 0.0)
    # generation_batch_size caps the rows one call (or the continuous scheduler) holds.
    got, _ = sampling_gb(_cfg(generation_batch_size=2), backend, 1000, 50, torch.device("cpu"))
    assert got == (2 * 400 * 1000 + 2 * 50 * 4) / GB


@pytest.mark.parametrize("sleep", [True, False])
def test_vllm_takes_its_share_and_keeps_it_through_the_update_without_sleep_mode(monkeypatch, sleep):
    props = types.SimpleNamespace(total_memory=80 * GB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    engine, awake = sampling_gb(_cfg(vllm_enable_sleep_mode=sleep), "vllm", 1000, 50, torch.device("cuda"))
    assert engine == pytest.approx(20.0) and awake == (0.0 if sleep else pytest.approx(20.0))


def test_plan_has_both_phases_and_the_peak(embedded, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = train_config(embedded, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(embedded[0])
    plan = memory_plan(model, cfg, ModelInfo(generation_backend="hf"))
    resident = plan["weights_gb"] + plan["ref_weights_gb"] + plan["optimizer_gb"]
    assert plan["sampling_total_gb"] == pytest.approx(resident + plan["sampling_gb"]) and plan["sampling_gb"] > 0
    backward = plan["activations_gb"] + plan["loss_gb"]
    assert plan["total_gb"] == pytest.approx(resident + plan["gradients_gb"] + max(backward, plan["optimizer_step_gb"]))
    assert plan["peak_gb"] == max(plan["total_gb"], plan["sampling_total_gb"])
    assert plan["optimizer_step_gb"] == pytest.approx(plan["gradients_gb"]) and plan["host_gb"] == 0.0


def test_optimizer_step_temporaries_are_what_adamw_allocates():
    """AdamW's foreach step (the CUDA default) allocates one copy of the trainable weights' size
    beyond its state; measured on CPU with foreach forced, fp32 and bf16."""
    from fastgrpo.benchmarks.bench_trl import LiveTensorBytes

    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(n, 37, dtype=dtype)) for n in (301, 64, 1)]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the state (2 copies) is allocated here, and counted as optimizer_gb
        with LiveTensorBytes() as live:
            opt.step()
        assert live.peak == sum(p.numel() * p.element_size() for p in params)


def test_offloaded_activations_and_a_sleeping_engine_are_counted_on_the_host(embedded, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded[0])
    c = model.config
    cfg = train_config(embedded, tmp_path, offload_activations=True)
    plan = memory_plan(model, cfg, ModelInfo(generation_backend="hf"))
    T = tokens_per_microbatch(cfg)[0]
    assert plan["host_gb"] == pytest.approx(c.num_hidden_layers * T * c.hidden_size * 4 / GB) and plan["host_gb"] > 0
    asleep = train_config(embedded, tmp_path, vllm_enable_sleep_mode=True)
    on = memory_plan(model, asleep, ModelInfo(generation_backend="vllm"))
    assert on["host_gb"] == pytest.approx(on["weights_gb"])
