"""Bad input is refused before any kernel runs, with the argument named."""

import pytest
import torch

import fastgrpo

from helpers import grpo_inputs, loss_args


def _call(**over):
    inp = grpo_inputs(B=2, T=5, H=16, V=50)
    inp.update({k: v for k, v in over.items() if k in inp or k == "bias"})
    hp = {k: v for k, v in over.items() if k not in inp and k != "bias"}
    args, logprobs = loss_args(inp)
    return fastgrpo.fused_grpo_loss(*args, **logprobs, bias=inp.get("bias"), **{"impl": "torch", **hp})


CASES = [
    (dict(hidden=torch.randn(2, 5, 17)), ValueError, "weight"),
    (dict(hidden=torch.randn(10, 16)), ValueError, "hidden"),
    (dict(weight=torch.randn(50, 16).double()), TypeError, "dtype"),
    (dict(hidden=torch.randn(2, 5, 16).bfloat16()), TypeError, "weight"),
    (dict(targets=torch.zeros(2, 5)), TypeError, "targets"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, "targets"),
    (dict(targets=torch.full((2, 5), 50)), ValueError, "targets must lie in"),
    (dict(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.full((2, 5), 0.5)), ValueError, "mask"),
    (dict(advantages=torch.randn(3)), ValueError, "advantages"),
    (dict(advantages=torch.tensor([1.0, float("nan")])), ValueError, "advantages must be finite"),
    (dict(advantages=torch.tensor([1, 2])), TypeError, "advantages"),
    (dict(old_logprobs=torch.randn(2, 4)), ValueError, "old_logprobs"),
    (dict(ref_logprobs=None, beta=0.1), ValueError, "ref_logprobs"),
    (dict(bias=torch.randn(49)), ValueError, "bias"),
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="step"), ValueError, "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(epsilon=-0.1), ValueError, "epsilon"),
    (dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(num_items_in_batch=torch.tensor([3.0, 4.0])), ValueError, "num_items_in_batch must be a scalar"),
    (dict(importance_sampling_ratio=torch.ones(2, 4)), ValueError, "importance_sampling_ratio must have shape"),
    (dict(importance_sampling_ratio=torch.ones(2, 5, dtype=torch.long)), TypeError, "importance_sampling_ratio"),
    (dict(importance_sampling_ratio=torch.full((2, 1), -1.0)), ValueError, "importance_sampling_ratio must be"),
]


@pytest.mark.parametrize("over,exc,needle", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_bad_input_names_the_argument(over, exc, needle):
    with pytest.raises(exc, match=needle):
        _call(**over)


def test_targets_outside_vocab_are_fine_where_masked():
    inp = grpo_inputs(B=2, T=5, H=16, V=50)
    out = _call(targets=torch.where(inp["mask"], inp["targets"], 10**6))
    assert torch.isfinite(out.loss)


def test_chunked_logprobs_checks():
    h, w = torch.randn(4, 8), torch.randn(30, 8)
    with pytest.raises(ValueError, match="targets must lie in"):
        fastgrpo.chunked_logprobs(h, w, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="targets must have shape"):
        fastgrpo.chunked_logprobs(h, w, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
        import os

        os.environ["TRITON_INTERPRET"], old = "0", os.environ.get("TRITON_INTERPRET", "0")
        try:
            fastgrpo.chunked_logprobs(h, w, torch.tensor([0, 1, 2, 3]), impl="triton")
        finally:
            os.environ["TRITON_INTERPRET"] = old
    with pytest.raises(ValueError, match="impl='fused' needs CUDA"):
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            fastgrpo.fused_grpo_loss(
                h[None], w, torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4), torch.ones(1), impl="fused"
            )
        finally:
            os.environ["TRITON_INTERPRET"] = old


def test_empty_batch_gives_zero_loss():
    out = fastgrpo.fused_grpo_loss(
        torch.randn(0, 5, 16, requires_grad=True),
        torch.randn(50, 16),
        torch.zeros(0, 5, dtype=torch.long),
        torch.zeros(0, 5, dtype=torch.bool),
        torch.zeros(0),
        impl="torch",
    )
    assert out.logprobs.shape == (0, 5)


def test_module_rejects_unknown_hyper_parameter():
    with pytest.raises(TypeError, match="epsilon_hi"):
        fastgrpo.FusedGRPOLoss(epsilon_hi=0.28)
