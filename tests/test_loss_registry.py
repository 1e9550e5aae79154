"""The loss family is one table (``fastgrpo.ops.loss.LOSS_SPECS``): every caller looks a type up there.

A type registered under a new name with dapo's entry must behave as dapo everywhere: in every path of the
fused op (its policy term, normalizer and metrics) and in the trainer's micro-batch accumulation. That
holds only if no caller names a loss type itself, which is what the table is for.
"""

import dataclasses

import pytest
import torch

from fastgrpo import fused_grpo_loss
from fastgrpo.ops.loss import LOSS_SPECS, LOSS_TYPES, GRPOLossParams, loss_spec


@pytest.fixture
def dapo_twin(monkeypatch):
    """'dapo_twin': dapo's registry entry under a name no code spells."""
    monkeypatch.setitem(LOSS_SPECS, "dapo_twin", LOSS_SPECS["dapo"])
    return "dapo_twin"


def _problem(seed: int = 0, B: int = 3, T: int = 7, H: int = 16, V: int = 37):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a row with no loss token
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 3.0
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 3.0
    return hidden, weight, targets, mask, adv, old, ref


@pytest.mark.parametrize("impl", ["torch", "chunked", "triton"])
def test_a_new_entry_is_a_loss_type_on_every_path(dapo_twin, impl):
    hidden, weight, targets, mask, adv, old, ref = _problem()
    dtype = torch.float32
    outs = []
    for loss_type in ("dapo", dapo_twin):
        h = hidden.to(dtype).requires_grad_(True)
        out = fused_grpo_loss(
            h, weight.to(dtype), targets, mask, adv.to(dtype), old_logprobs=old.to(dtype), ref_logprobs=ref.to(dtype),
            beta=0.04, epsilon_high=0.28, loss_type=loss_type, impl=impl,
        )  # fmt: skip
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad, {k: v.detach() for k, v in out.metrics.items()}))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = outs
    assert torch.isfinite(loss_a) and grad_a.abs().sum() > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=0)
    assert metrics_b.keys() == metrics_a.keys()
    for k in metrics_a:
        torch.testing.assert_close(metrics_b[k], metrics_a[k], rtol=0, atol=0)


def test_every_type_has_one_entry_and_unknown_names_get_one_line():
    assert tuple(LOSS_SPECS) == LOSS_TYPES and len(set(LOSS_TYPES)) == len(LOSS_TYPES)
    for name in LOSS_TYPES:
        spec = loss_spec(name)
        assert spec.normalizer.micro_batch in ("num_items", "tokens", "rows"), name
    # TRL 1.16: the PPO-clipped ratio (and its clip metrics) for all but cispo and sapo; num_items_in_batch
    # for dapo and cispo; a constant normalizer (max_completion_length) for dr_grpo alone.
    assert {n for n in LOSS_TYPES if loss_spec(n).clipped} == {"grpo", "bnpo", "dr_grpo", "dapo", "luspo"}
    assert {n for n in LOSS_TYPES if loss_spec(n).normalizer.micro_batch == "num_items"} == {"dapo", "cispo", "vespo"}
    assert {n for n in LOSS_TYPES if loss_spec(n).normalizer.needs_max_completion_length} == {"dr_grpo"}
    # A row weight (VESPO's gamma of the sequence ratio) couples a row's tokens: the 4-pass route.
    assert {n for n in LOSS_TYPES if loss_spec(n).row_weight is not None} == {"vespo"}
    assert GRPOLossParams(loss_type="vespo").couples_rows and not GRPOLossParams(loss_type="dapo").couples_rows
    with pytest.raises(ValueError, match=r"loss_type must be one of \('grpo'.*got 'gpg'"):
        loss_spec("gpg")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOLossParams(loss_type="gpg")


def test_the_trainer_accumulates_a_new_entry_as_its_twin(dapo_twin, embedded, tmp_path):
    """Micro-batch scaling comes from the entry too: uneven micro-batches, dapo against its twin."""
    from fastgrpo.train.trainer import GRPOTrainer
    from fastgrpo.train.update import Updater

    from helpers import train_config

    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, beta=0.04))
    batch = trainer.sample_batch()
    settings = dataclasses.replace(trainer.updater.settings, micro_batch_rows=24)  # 24 + 24 + 16 rows
    grads, losses = [], []
    for loss_type in ("dapo", dapo_twin):
        params = dataclasses.replace(trainer.params, loss_type=loss_type)
        upd = Updater(trainer.model, None, params, settings)
        upd.optimizer.zero_grad(set_to_none=True)
        ref = [trainer.updater.ref_logprobs(m.rollouts) for m in upd.micro_batches(batch)]
        losses.append(upd.accumulate_gradients(batch, None, None, ref)["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    trainer.close()
    assert losses[0] == losses[1] and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"delta": 1.0}, "delta must be > 1 or None, got 1.0"),
        ({"epsilon": -0.1}, "epsilon must be >= 0"),
        ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be > 0"),
        ({"importance_sampling_level": "row"}, "importance_sampling_level must be one of"),
    ],
)
def test_the_op_and_the_config_refuse_the_same_loss_settings(bad, match):
    from fastgrpo.train.config import build_config

    with pytest.raises(ValueError, match=match):
        GRPOLossParams(**bad)
    with pytest.raises(ValueError, match=match):
        build_config((bad, "test"))


def test_loss_settings_read_from_fastgrpo_and_trl_configs_alike(tmp_path):
    trl = pytest.importorskip("trl")
    from fastgrpo.train.config import build_config

    values = dict(beta=0.02, epsilon=0.1, epsilon_high=0.3, delta=1.5, loss_type="bnpo", temperature=0.7,
                  importance_sampling_level="sequence", max_completion_length=48, use_bias_correction_kl=True,
                  sapo_temperature_pos=0.9, sapo_temperature_neg=1.2, off_policy_mask_threshold=0.3,
                  entropy_coef=0.01, vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5,
                  vespo_lambda_neg=1.5)  # fmt: skip
    ours = GRPOLossParams.from_config(build_config((values, "test")))
    theirs = GRPOLossParams.from_config(
        trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True, **values)
    )
    assert ours == theirs == GRPOLossParams(**values)
