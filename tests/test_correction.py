"""The sampler/trainer mismatch correction (``fastgrpo.train.correction``) against a literal
transcription of TRL 1.16's ``vllm_importance_sampling_*`` formulas, and wired into the update."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from fastgrpo import fused_grpo_loss
from fastgrpo.train.config import CorrectionConfig, build_config
from fastgrpo.train.correction import CorrectionSettings, CorrectionStats, importance_sampling_ratio
from fastgrpo.train.policy import completion_hidden, completion_logprobs, lm_head
from fastgrpo.train.trainer import GRPOTrainer
from fastgrpo.train.update import Updater, UpdateSettings

from helpers import train_config

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


# ---- TRL 1.16, transcribed literally (grpo_trainer.py, _generate_and_score_completions) --------------------------


def trl_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The ``vllm_importance_sampling_ratio`` block; ``mask`` is TRL's int completion mask."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ("sequence_truncate", "token_truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


def trl_metrics(old, sampling, completion_mask, ratio, mode):
    """The ``sampling/*`` metrics block, one process (gather = identity)."""
    delta = torch.abs(old - sampling)
    mask = completion_mask.bool()
    delta = delta[mask & ~torch.isnan(delta)]
    out = {
        "sampling/sampling_logp_difference/mean": (torch.mean(delta) if delta.numel() > 0 else torch.tensor(0.0)),
        "sampling/sampling_logp_difference/max": torch.max(delta) if delta.numel() > 0 else torch.tensor(0.0),
    }
    flat = ratio.flatten() if mode in ("sequence_mask", "sequence_truncate") else ratio[mask]
    for name, fn in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
        out[f"sampling/importance_sampling_ratio/{name}"] = fn(flat) if flat.numel() > 0 else torch.tensor(0.0)
    return {k: float(v) for k, v in out.items()}


# ---- the ratio and metrics ---------------------------------------------------------------------------------------


def _inputs(seed=1, B=10, T=9, scale=1.0):
    """Log-prob pairs whose ratios fall on both sides of every bound: a fully masked row, NaN the
    sampler could not score on a few live tokens, garbage (NaN, -inf) on masked positions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    sampler = old + scale * torch.randn(B, T, generator=g)
    live = mask.nonzero()
    nan_at = live[torch.randperm(len(live), generator=g)[:3]]
    sampler[nan_at[:, 0], nan_at[:, 1]] = float("nan")
    sampler = torch.where(mask, sampler, torch.tensor([float("nan"), float("-inf")]).repeat(T)[:T])
    old = torch.where(mask, old, -7.0)
    return old, sampler, mask


def _settings(mode, clip_min=None, clip_max=3.0):
    return CorrectionSettings(enabled=True, mode=mode, clip_min=clip_min, clip_max=clip_max)


@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 3.0), (0.5, None), (0.8, 1.25)])
@pytest.mark.parametrize("mode", MODES)
def test_ratio_matches_trl(mode, clip_min, clip_max):
    old, sampler, mask = _inputs(scale=1.0 if mode.startswith("token") else 0.6)
    ratio, outside = importance_sampling_ratio(old, sampler, mask, _settings(mode, clip_min, clip_max))
    want = trl_ratio(old, sampler, mask.int(), mode, clip_min, clip_max)
    assert ratio.shape == want.shape == ((10, 1) if mode.startswith("sequence") else (10, 9))
    torch.testing.assert_close(ratio, want, rtol=0, atol=0)
    assert torch.isfinite(ratio).all() and (ratio >= 0).all()
    # Both sides of the bound are exercised where there is one, and `outside` is where it acted.
    raw = trl_ratio(old, sampler, mask.int(), mode.replace("mask", "truncate"), None, math.inf)
    hi = raw > (math.inf if clip_max is None else clip_max)
    lo = raw < (-math.inf if clip_min is None else clip_min)
    assert torch.equal(outside, hi | lo)
    if clip_max is not None:
        assert hi.any()
    if clip_min is not None:
        assert lo.any()
    assert (~(hi | lo)).any()


@pytest.mark.parametrize("mode", MODES)
def test_nan_sampler_logprobs_give_no_correction(mode):
    old, sampler, mask = _inputs()
    sampler = torch.where(mask, float("nan"), 0.0)  # nothing scored
    ratio, outside = importance_sampling_ratio(old, sampler, mask, _settings(mode, 0.5))
    assert torch.equal(ratio, torch.ones_like(ratio)) and not outside.any()


@pytest.mark.parametrize("clip_min", [None, 0.5])
@pytest.mark.parametrize("mode", MODES)
def test_metrics_match_trl_over_uneven_micro_batches(mode, clip_min):
    old, sampler, mask = _inputs(scale=1.0 if mode.startswith("token") else 0.6)
    settings = _settings(mode, clip_min)
    stats = CorrectionStats(settings)
    for rows in ([0], [1, 2, 3], [4, 5, 6, 7, 8, 9]):  # uneven: a mean of per-micro-batch means would differ
        ratio, outside = importance_sampling_ratio(old[rows], sampler[rows], mask[rows], settings)
        stats.add(old[rows], sampler[rows], mask[rows], ratio, outside)
    got = stats.metrics()
    full = trl_ratio(old, sampler, mask.int(), mode, clip_min, 3.0)
    want = trl_metrics(old, sampler, mask.int(), full, mode)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    ratio, outside = importance_sampling_ratio(old, sampler, mask, settings)
    hit = outside.flatten() if mode.startswith("sequence") else outside[mask]
    name = f"sampling/importance_sampling_ratio/{'masked' if mode.endswith('mask') else 'truncated'}_frac"
    assert set(got) == set(want) | {name}
    assert got[name] == pytest.approx(hit.float().mean().item()) and 0 < got[name] < 1


def test_metrics_of_an_empty_batch_are_zero():
    settings = _settings("token_mask")
    stats = CorrectionStats(settings)
    z = torch.zeros(2, 3)
    ratio, outside = importance_sampling_ratio(z, z, z.bool(), settings)
    stats.add(z, z, z.bool(), ratio, outside)
    assert all(v == 0.0 for v in stats.metrics().values())


def test_auto_resolution():
    auto = CorrectionConfig()
    assert not CorrectionSettings.resolve(auto, "hf").enabled
    assert not CorrectionSettings.resolve(auto, "continuous").enabled
    on = CorrectionSettings.resolve(auto, "vllm")
    assert on.enabled and on.mode == "sequence_mask" and on.clip_max == 3.0 and on.clip_min is None
    assert CorrectionSettings.resolve(CorrectionConfig(vllm_importance_sampling_correction=True), "hf").enabled
    assert not CorrectionSettings.resolve(CorrectionConfig(vllm_importance_sampling_correction=False), "vllm").enabled


@pytest.mark.parametrize(
    "values, match",
    [
        ({"vllm_importance_sampling_clip_max": 0}, "vllm_importance_sampling_clip_max must be > 0"),
        ({"vllm_importance_sampling_clip_max": -1.5}, "vllm_importance_sampling_clip_max must be > 0"),
        ({"vllm_importance_sampling_clip_min": 0}, "vllm_importance_sampling_clip_min must be > 0"),
        ({"vllm_importance_sampling_mode": "token"}, "vllm_importance_sampling_mode must be one of"),
        ({"vllm_importance_sampling_mode": "sequence_clip"}, "vllm_importance_sampling_mode must be one of"),
        ({"vllm_importance_sampling_clip_min": 4.0}, "vllm_importance_sampling_clip_min .* must be below"),
        (
            {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": None},
            "needs vllm_importance_sampling_clip_max or vllm_importance_sampling_clip_min",
        ),
    ],
)
def test_bad_correction_config(values, match):
    with pytest.raises(ValueError, match=match) as e:
        build_config((values, "test"))
    assert "\n" not in str(e.value)


# ---- in the update -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(embedded, tmp_path_factory):
    """A trainer on the embedded model (hf backend, correction auto), its initial weights, and one
    sampled batch of 16 completions."""
    cfg = train_config(embedded, tmp_path_factory.mktemp("correction"), max_steps=1, max_grad_norm=0.0)
    trainer = GRPOTrainer(cfg)
    batch = trainer.sample_batch()
    return trainer, copy.deepcopy(trainer.model.state_dict()), batch


def test_auto_is_off_for_hf(sampled):
    trainer, _, _ = sampled
    assert trainer.model_info.generation_backend == "hf"
    assert not trainer.updater.settings.correction.enabled


def _synthetic(trainer, state, batch, scale):
    """The batch with sampler log-probs = the policy's at ``state`` plus noise (0 where masked, a NaN)."""
    trainer.model.load_state_dict(state)
    ro = batch.rollouts
    old = completion_logprobs(trainer.model, ro, trainer.cfg.temperature, "torch")
    g = torch.Generator().manual_seed(1)
    sampler = old + scale * torch.randn(old.shape, generator=g)
    live = batch.loss_mask.nonzero()
    sampler[live[0, 0], live[0, 1]] = float("nan")
    sampler = torch.where(ro.completion_mask, sampler, 0.0)
    return dataclasses.replace(batch, rollouts=dataclasses.replace(ro, sampler_logprobs=sampler)), old


def _reference(model, state, batch, params, old, ratio, **extra):
    """Loss and gradients of the whole batch in one direct fused_grpo_loss call."""
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    ro = batch.rollouts
    weight, bias = lm_head(model)
    hp = dataclasses.asdict(params)
    out = fused_grpo_loss(completion_hidden(model, ro), weight, ro.completion_ids, batch.loss_mask, batch.advantages,
                          old_logprobs=old, bias=bias, importance_sampling_ratio=ratio, impl="torch",
                          **hp, **extra)  # fmt: skip
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "mode, num_iterations, loss_type, clip_min",
    [
        ("sequence_mask", 1, "dapo", None),
        ("token_truncate", 2, "dapo", 0.7),
        ("token_mask", 1, "grpo", 0.7),
        ("sequence_truncate", 2, "grpo", None),
        ("token_truncate", 2, "vespo", 0.7),  # VESPO folds the ratio into its gamma weight
    ],
)
def test_update_applies_trls_ratio(sampled, mode, num_iterations, loss_type, clip_min):
    trainer, state, batch = sampled
    scale = 0.6 if mode.startswith("token") else 0.3
    batch, old = _synthetic(trainer, state, batch, scale)
    cfg = copy.deepcopy(trainer.cfg)
    cfg.grpo.num_iterations = num_iterations
    cfg.train.per_device_train_batch_size = 10  # two uneven micro-batches: 10 + 6 rows
    params = dataclasses.replace(trainer.params, loss_type=loss_type)
    settings = UpdateSettings.from_config(cfg, packed=bool(cfg.model.padding_free), kahan=False)
    settings = dataclasses.replace(settings, correction=_settings(mode, clip_min), lr_scheduler_type="constant")
    updater = Updater(trainer.model, None, params, settings)
    assert [len(m.rows) for m in updater.micro_batches(batch)] == [10, 6]

    seen = []  # per iteration: weights, gradients, loss
    step, accumulate = updater.optimizer.step, updater.accumulate_gradients

    def record_step(*a, **k):
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        seen[-1] += (copy.deepcopy(trainer.model.state_dict()), grads)
        return step(*a, **k)

    def record_accumulate(*a, **k):
        out = accumulate(*a, **k)
        seen.append((out["loss"],))
        return out

    updater.optimizer.step, updater.accumulate_gradients = record_step, record_accumulate
    metrics = updater.update(batch)
    assert len(seen) == num_iterations

    ratio = trl_ratio(old, batch.rollouts.sampler_logprobs, batch.loss_mask.int(), mode, clip_min, 3.0)
    if mode.endswith("mask"):
        outside = ratio == 0
    else:
        outside = (ratio == 3.0) | (ratio == (-1.0 if clip_min is None else clip_min))
    assert outside.any() and not outside.all()  # the bound acts on some tokens (or rows), not all
    for loss, weights, grads in seen:
        want_loss, want = _reference(trainer.model, weights, batch, params, old, ratio)
        assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
        assert want.keys() == grads.keys()
        for n in want:
            torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    # The correction made a difference: without it the first gradient is another one.
    _, plain = _reference(trainer.model, seen[0][1], batch, params, old, None)
    diff = sum(float((plain[n] - seen[0][2][n]).abs().sum()) for n in plain)
    assert diff > 1e-3 * sum(float(g.abs().sum()) for g in plain.values())

    want = trl_metrics(old, batch.rollouts.sampler_logprobs, batch.loss_mask.int(), ratio, mode)
    for k, v in want.items():
        assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    frac = "masked_frac" if mode.endswith("mask") else "truncated_frac"
    assert 0 < metrics[f"sampling/importance_sampling_ratio/{frac}"] < 1


def test_update_applies_the_off_policy_mask_with_the_samplers_logprobs(sampled):
    """off_policy_mask_threshold in fastgrpo train: the update passes the backend's sampler log-probs to the
    op, so its loss and gradients are one direct call's with them, and the mask drops some rows' policy term."""
    trainer, state, batch = sampled
    batch, old = _synthetic(trainer, state, batch, 0.3)
    params = dataclasses.replace(trainer.params, off_policy_mask_threshold=0.01)
    cfg = copy.deepcopy(trainer.cfg)
    settings = UpdateSettings.from_config(cfg, packed=bool(cfg.model.padding_free), kahan=False)
    settings = dataclasses.replace(settings, lr_scheduler_type="constant")
    updater = Updater(trainer.model, None, params, settings)
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad(set_to_none=True)  # the module's trainer is shared: no other test's gradients
    sums = updater.accumulate_gradients(batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    sampler = batch.rollouts.sampler_logprobs
    want_loss, want = _reference(trainer.model, state, batch, params, None, None, sampling_logprobs=sampler)
    assert sums["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    plain_loss, _ = _reference(trainer.model, state, batch, trainer.params, None, None)
    assert abs(plain_loss - want_loss) > 1e-4  # some negative-advantage rows lost their policy term


def test_update_trains_on_the_high_entropy_tokens(sampled):
    """top_entropy_quantile in fastgrpo train: the update's loss and gradients are one direct call's with
    TRL's mask (this forward's entropies, the micro-batch's quantile) scaling the policy term."""
    from fastgrpo import chunked_logprobs
    from fastgrpo.ops.loss import high_entropy_mask

    trainer, state, batch = sampled
    cfg = copy.deepcopy(trainer.cfg)
    settings = UpdateSettings.from_config(cfg, packed=bool(cfg.model.padding_free), kahan=False)
    settings = dataclasses.replace(
        settings, lr_scheduler_type="constant", top_entropy_quantile=0.3, micro_batch_rows=len(batch.rollouts),
        max_tokens_per_microbatch=None,
    )  # fmt: skip
    updater = Updater(trainer.model, None, trainer.params, settings)
    assert len(updater.micro_batches(batch)) == 1  # TRL's quantile is per micro-batch
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad(set_to_none=True)  # the module's trainer is shared: no other test's gradients
    sums = updater.accumulate_gradients(batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    ro, m = batch.rollouts, batch.loss_mask
    with torch.no_grad():
        weight, bias = lm_head(trainer.model)
        _, ent = chunked_logprobs(completion_hidden(trainer.model, ro), weight, ro.completion_ids.clamp(min=0),
                                  bias=bias, temperature=trainer.params.temperature, return_entropy=True)  # fmt: skip
    keep = high_entropy_mask(ent, m, 0.3)
    assert 0 < int(keep.sum()) < int(m.sum())
    want_loss, want = _reference(trainer.model, state, batch, trainer.params, None, keep.float())
    assert sums["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    plain_loss, _ = _reference(trainer.model, state, batch, trainer.params, None, None)
    assert abs(plain_loss - want_loss) > 1e-4


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_update_entropy_bonus_is_the_batch_token_mean(sampled, loss_type):
    """entropy_coef in fastgrpo train, over two uneven micro-batches (10 + 6 rows): whatever the loss type's
    micro-batch weighting, the summed loss, policy loss and gradients are one whole-batch call's."""
    trainer, state, batch = sampled
    cfg = copy.deepcopy(trainer.cfg)
    cfg.train.per_device_train_batch_size = 10
    params = dataclasses.replace(trainer.params, loss_type=loss_type, entropy_coef=0.3)
    settings = UpdateSettings.from_config(cfg, packed=bool(cfg.model.padding_free), kahan=False)
    settings = dataclasses.replace(settings, lr_scheduler_type="constant", max_tokens_per_microbatch=None)
    updater = Updater(trainer.model, None, params, settings)
    assert [len(m.rows) for m in updater.micro_batches(batch)] == [10, 6]
    trainer.model.load_state_dict(state)
    trainer.model.zero_grad(set_to_none=True)
    sums = updater.accumulate_gradients(batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    want_loss, want = _reference(trainer.model, state, batch, params, None, None)
    assert sums["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    for n in want:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    plain_params = dataclasses.replace(params, entropy_coef=0.0)
    plain_loss, plain = _reference(trainer.model, state, batch, plain_params, None, None)
    assert sums["policy_loss"] == pytest.approx(plain_loss, rel=1e-4, abs=1e-6)
    assert abs(plain_loss - want_loss) > 1e-3  # the bonus counts
    assert any(not torch.allclose(plain[n], want[n], rtol=1e-3, atol=1e-6) for n in want)


def test_forced_on_without_sampler_logprobs_is_a_clear_error(embedded, tmp_path):
    cfg = train_config(embedded, tmp_path, max_steps=1, vllm_importance_sampling_correction=True)
    trainer = GRPOTrainer(cfg)
    assert trainer.updater.settings.correction.enabled
    batch = trainer.sample_batch()
    batch = dataclasses.replace(batch, rollouts=dataclasses.replace(batch.rollouts, sampler_logprobs=None))
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction .*'hf'.* no sampler log-probs"):
        trainer.updater.update(batch)
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction"):
        trainer.updater.accumulate_gradients(batch)
