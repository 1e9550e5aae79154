"""Use from compiled code, under autocast, and from the command line."""

import pytest
import torch

import fastgrpo
from fastgrpo.cli import main

from helpers import IMPLS, grpo_inputs, leaf, rel_err


@pytest.mark.parametrize("impl", IMPLS)
def test_under_torch_compile(impl):
    inp = grpo_inputs(seed=4)

    def step(h, w):
        out = fastgrpo.fused_grpo_loss(
            h,
            w,
            inp["targets"],
            inp["mask"],
            inp["advantages"],
            old_logprobs=inp["old_logprobs"],
            ref_logprobs=inp["ref_logprobs"],
            beta=0.04,
            epsilon_high=0.28,
            impl=impl,
        )
        return out.loss

    h1, w1 = leaf(inp["hidden"]), leaf(inp["weight"])
    eager = step(h1, w1)
    eager.backward()
    torch._dynamo.reset()
    h2, w2 = leaf(inp["hidden"]), leaf(inp["weight"])
    compiled = torch.compile(step, backend="aot_eager")(h2, w2)
    compiled.backward()
    assert compiled.dtype == torch.float32
    assert torch.allclose(compiled.detach(), eager.detach(), rtol=1e-5, atol=1e-6)
    assert rel_err(h2.grad, h1.grad) < 1e-5 and rel_err(w2.grad, w1.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_under_autocast_fp32_master_weight(impl):
    """bf16 autocast with an fp32 lm_head weight: the head runs in bf16, grads reach fp32 leaves."""
    inp = grpo_inputs(seed=6)
    h, w = leaf(inp["hidden"]), leaf(inp["weight"])
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        out = fastgrpo.fused_grpo_loss(h, w, inp["targets"], inp["mask"], inp["advantages"], impl=impl)
    out.loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = fastgrpo.fused_grpo_loss(
        inp["hidden"].bfloat16(),
        inp["weight"].bfloat16(),
        inp["targets"],
        inp["mask"],
        inp["advantages"],
        impl="torch",
    )
    assert abs(float(out.loss) - float(ref.loss)) < 1e-3


def test_hyper_parameters_stay_fp32():
    params = fastgrpo.GRPOLossParams(beta=torch.tensor(0.04, dtype=torch.float64), epsilon=0.2)
    assert type(params.beta) is float
    inp = grpo_inputs(seed=2)
    out = fastgrpo.fused_grpo_loss(
        inp["hidden"],
        inp["weight"],
        inp["targets"],
        inp["mask"],
        inp["advantages"],
        ref_logprobs=inp["ref_logprobs"],
        beta=params.beta,
        impl="torch",
    )
    assert out.loss.dtype == torch.float32 and out.logprobs.dtype == torch.float32


def test_cli_demo_runs_and_agrees(capsys):
    rc = main(
        ["demo", "--max_completion_length", "32", "--vocab_size", "2000", "--hidden_size", "64", "--impl", "torch"]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "agreement: OK" in text
