"""Padding-free (packed) backbone passes give the padded path's log-probs, loss and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastgrpo import FusedGRPOLoss
from fastgrpo.train.policy import completion_logprobs, policy_loss
from fastgrpo.train.rollouts import pack_rollouts
from fastgrpo.train.trainer import GRPOTrainer

from helpers import train_config


def test_pack_layout():
    from fastgrpo.train.rollouts import Rollouts

    ro = Rollouts(
        torch.tensor([[0, 5, 6], [7, 8, 9]]),
        torch.tensor([[False, True, True], [True, True, True]]),
        torch.tensor([[1, 2, 0], [3, 0, 0]]),
        torch.tensor([[True, True, False], [True, False, False]]),
        torch.tensor([False, False]),
    )
    p = pack_rollouts(ro)
    assert p.input_ids.tolist() == [[5, 6, 1, 2, 7, 8, 9, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert p.predict_index.tolist() == [1, 2, 6]  # states before tokens 1, 2 (row 0) and 3 (row 1)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_packed_matches_padded(embedded, tmp_path, loss_type):
    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, loss_type=loss_type, temperature=0.8))
    batch = trainer.sample_batch()
    mb = batch.rollouts.trim()
    assert bool((~mb.prompt_mask).any()) or bool((~mb.completion_mask).any())  # there is padding to drop
    loss_fn = FusedGRPOLoss(impl="torch", **dataclasses.asdict(trainer.params))
    results = []
    for padding_free in (False, True):
        trainer.model.zero_grad(set_to_none=True)
        logp = completion_logprobs(trainer.model, mb, 0.8, "torch", padding_free)
        out = policy_loss(trainer.model, mb, batch.loss_mask[:, : mb.completion_ids.shape[1]], batch.advantages,
                          loss_fn, old_logprobs=None, ref_logprobs=None, num_items_in_batch=None,
                          padding_free=padding_free)  # fmt: skip
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        results.append((logp[mb.completion_mask], out.loss.detach(), grads))
    (lp0, l0, g0), (lp1, l1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert g0.abs().sum() > 0


def test_padding_free_training_run(embedded, tmp_path):
    rows = GRPOTrainer(train_config(embedded, tmp_path, max_steps=2, padding_free=True, beta=0.04)).train()
    assert len(rows) == 2 and all(r["kl"] is not None and r["kl"] >= 0 for r in rows)
