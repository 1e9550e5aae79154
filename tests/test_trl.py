"""fastgrpo.integrations.trl.GRPOTrainer against stock trl.GRPOTrainer (TRL 1.16), step by step.

Both trainers run the same tiny Qwen2 (tests/trl_support.py) from the same seed in fp32; they
must sample the same completions and log the same metrics at every step, within fp32 rounding.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")
import trl  # noqa: E402
import trl_support as S  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastgrpo.integrations.trl import GRPOTrainer  # noqa: E402

METRICS = (
    "loss",
    "aux_loss",
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
    "cispo_clip_ratio",
    "vespo/phi_seq_mean",
    "policy_loss",
    "entropy_coef",
    "reward",
    "reward_std",
    "grad_norm",
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return S.save_model(tmp_path_factory.mktemp("tiny") / "model")


def run(cls, out, model_path, trainer_kwargs=None, **overrides):
    """Train; return (logged rows, sampled completion ids per generation, final parameters)."""
    tr = S.trainer(cls, out, model_path, trainer_kwargs=trainer_kwargs, **overrides)
    completions = []
    generate = tr._generate_and_score_completions

    def recording(self, inputs):
        batch = generate(inputs)
        completions.append(batch["completion_ids"].clone())
        return batch

    tr._generate_and_score_completions = types.MethodType(recording, tr)
    tr.train()
    rows = [row for row in tr.state.log_history if "loss" in row and "train_loss" not in row]
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    return rows, completions, params, tr


def assert_same_run(stock, ours, rtol=2e-5, atol=2e-6):
    rows_s, comp_s, params_s, _ = stock
    rows_o, comp_o, params_o, tr = ours
    assert len(rows_s) == len(rows_o) > 0
    assert len(comp_s) == len(comp_o) > 0
    for a, b in zip(comp_s, comp_o, strict=True):
        assert torch.equal(a, b), "different completions"
    for step, (a, b) in enumerate(zip(rows_s, rows_o, strict=True)):
        for key in METRICS:
            assert (key in a) == (key in b), (step, key)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=atol), (step, key, a[key], b[key])
    for name, p in params_s.items():
        torch.testing.assert_close(params_o[name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert tr.fastgrpo_last_route in ("torch", "chunked", "fused")


GRID = [
    pytest.param(loss, beta, iters, gas, id=f"{loss}-beta{beta}-it{iters}-gas{gas}")
    for loss in ("dapo", "grpo")
    for beta in (0.04, 0.0)
    for iters, gas in ((1, 1), (2, 2), (1, 2))
]


@pytest.mark.parametrize("loss_type, beta, num_iterations, gas", GRID)
def test_matches_stock_trl(tmp_path, model_path, loss_type, beta, num_iterations, gas):
    kw = dict(loss_type=loss_type, beta=beta, num_iterations=num_iterations, gradient_accumulation_steps=gas)
    stock = run(trl.GRPOTrainer, tmp_path / "stock", model_path, **kw)
    ours = run(GRPOTrainer, tmp_path / "ours", model_path, **kw)
    assert_same_run(stock, ours)
    if num_iterations == 2:  # the second pass over a batch is off-policy: clipping must be exercised
        assert any(row["clip_ratio/region_mean"] > 0 for row in stock[0])


VARIANTS = {
    "bnpo": dict(loss_type="bnpo", beta=0.04),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.04),
    "cispo": dict(loss_type="cispo", epsilon_high=1.05, num_iterations=2, gradient_accumulation_steps=2),
    "sapo": dict(loss_type="sapo", num_iterations=2, gradient_accumulation_steps=2),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, num_iterations=2),
    "delta-clip-higher": dict(delta=1.1, epsilon_high=0.28, num_iterations=2, gradient_accumulation_steps=2),
    "no-bias-correction-kl": dict(beta=0.04, use_bias_correction_kl=False, num_iterations=2),
    "temperature": dict(temperature=0.7, beta=0.04),
    "steps-per-generation": dict(steps_per_generation=4, gradient_accumulation_steps=2, beta=0.04),
    "cast-lm-head-fp32": dict(cast_lm_head_to_fp32=True, beta=0.04),
    # Negative: a row with a negative advantage is dropped as soon as pi drifts above pi_old on average.
    "off-policy-mask": dict(off_policy_mask_threshold=-0.001, num_iterations=2, beta=0.04),
    # Train on the top 20% of tokens by this forward's entropy (TRL's quantile, across micro-batches' processes).
    "entropy-quantile": dict(top_entropy_quantile=0.2, num_iterations=2, gradient_accumulation_steps=2, beta=0.04),
    # VESPO: the gamma weight of each row's sequence ratio (4-pass route); off-policy from the second iteration.
    "vespo": dict(loss_type="vespo", num_iterations=2, gradient_accumulation_steps=2, beta=0.04),
    "vespo-per-sign": dict(
        loss_type="vespo",
        num_iterations=2,
        vespo_k_pos=1.0,
        vespo_lambda_pos=1.5,
        vespo_k_neg=4.0,
        vespo_lambda_neg=0.5,
    ),
    # The entropy bonus on a num_items-normalized loss (dapo: the coefficient carries the accumulation division)
    # and on a row-mean one, with the top-entropy mask gating it.
    "entropy-bonus-dapo": dict(entropy_coef=0.05, num_iterations=2, gradient_accumulation_steps=2, beta=0.04),
    "entropy-bonus-grpo-quantile": dict(
        loss_type="grpo", entropy_coef=0.05, top_entropy_quantile=0.5, gradient_accumulation_steps=2
    ),
    # Adaptive control (Skywork-OR1): a target above the tiny model's entropy turns the bonus on after the first
    # window and raises the coefficient at every optimizer step.
    "adaptive-entropy": dict(
        use_adaptive_entropy=True,
        entropy_target=100.0,
        entropy_coef=0.01,
        entropy_coef_delta=0.02,
        gradient_accumulation_steps=2,
        beta=0.04,
    ),
}


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_matches_stock_trl_variants(tmp_path, model_path, overrides):
    stock = run(trl.GRPOTrainer, tmp_path / "stock", model_path, **overrides)
    ours = run(GRPOTrainer, tmp_path / "ours", model_path, **overrides)
    assert_same_run(stock, ours)


def test_matches_stock_trl_on_an_moe_model_with_its_router_aux_loss(tmp_path):
    """A Qwen2-MoE model: TRL adds router_aux_loss_coef x the load-balancing loss; the drop-in computes it
    from the same backbone forward as its fused loss, and logs the same aux_loss at every step."""
    path = S.save_model(tmp_path / "moe", moe=True)
    kw = dict(beta=0.04, num_iterations=2, gradient_accumulation_steps=2)
    stock = run(trl.GRPOTrainer, tmp_path / "stock", path, **kw)
    ours = run(GRPOTrainer, tmp_path / "ours", path, **kw)
    assert ours[3].aux_loss_enabled and ours[3].router_aux_loss_coef == 0.05
    assert_same_run(stock, ours)
    assert all(row["aux_loss"] > 0 for row in stock[0])


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_matches_stock_trl_on_a_transformed_head(tmp_path, family):
    """Gemma 2's softcapped head (final_logit_softcapping, small enough here to bend the logits) and Cohere's scaled
    one (logit_scale): the drop-in applies the transform in its fused paths and logs what stock TRL logs."""
    path = S.save_model(tmp_path / family, family=family)
    kw = dict(beta=0.04, num_iterations=2, gradient_accumulation_steps=2, entropy_coef=0.02)
    stock = run(trl.GRPOTrainer, tmp_path / "stock", path, **kw)
    ours = run(GRPOTrainer, tmp_path / "ours", path, **kw)
    assert_same_run(stock, ours)
    head = ours[3].fastgrpo_head
    assert head == ({"logit_scale": 1.0, "final_logit_softcapping": 0.1} if family == "gemma2" else
                    {"logit_scale": 3.0, "final_logit_softcapping": None})  # fmt: skip


def test_router_aux_loss_is_found_through_a_wrapper_class():
    """FSDP2 re-classes the model in torch's own module: the family's load_balancing_loss_func is found
    through the MRO; a dense model is refused by name."""
    from fastgrpo.integrations.trl import router_aux_loss

    moe = S.model(moe=True)
    fsdp = "torch.distributed.fsdp._fully_shard._fsdp_init"
    moe.__class__ = type("FSDPQwen2MoeForCausalLM", (type(moe),), {"__module__": fsdp})
    assert router_aux_loss(moe, None, None) is None  # found; nothing to compute without router logits
    with pytest.raises(ValueError, match="Qwen2ForCausalLM: fastgrpo finds no load_balancing_loss_func"):
        router_aux_loss(S.model(), None, None)


def test_matches_stock_trl_with_lora_reference_as_adapters_off(tmp_path, model_path):
    from peft import LoraConfig

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    kw = dict(beta=0.04, num_iterations=2, learning_rate=3e-2)
    stock = run(trl.GRPOTrainer, tmp_path / "stock", model_path, {"peft_config": lora()}, **kw)
    ours = run(GRPOTrainer, tmp_path / "ours", model_path, {"peft_config": lora()}, **kw)
    assert_same_run(stock, ours)
    assert any(row["kl"] > 0 for row in stock[0][1:])  # the reference really is the base model


def test_untied_head(tmp_path):
    path = S.save_model(tmp_path / "untied", tie=False)
    kw = dict(beta=0.04, num_iterations=2, max_steps=2)
    assert_same_run(run(trl.GRPOTrainer, tmp_path / "s", path, **kw), run(GRPOTrainer, tmp_path / "o", path, **kw))


# ----------------------------------------------------------------------------- no full logits


class LargestTensor(TorchDispatchMode):
    """Largest number of elements of any tensor an op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "family, features",
    [
        (None, {}),
        # The lifted refusals together: a softcapped head, the entropy bonus over the top-entropy mask, VESPO.
        ("gemma2", dict(entropy_coef=0.05, top_entropy_quantile=0.5, loss_type="vespo")),
    ],
    ids=["plain", "softcap-entropy-vespo"],
)
def test_no_full_vocabulary_logits_and_our_loss_ran(tmp_path, monkeypatch, family, features):
    # V = 4,099 against H = 16: one (tokens x V) logits tensor dwarfs every weight (V x H) and
    # activation, so the largest tensor shows whether logits were materialized.
    n_words, hidden, rows = 4096, 16, 8
    V = n_words + len(S.SPECIAL)
    path = S.save_model(tmp_path / "model", n_words=n_words, hidden_size=hidden, family=family)
    kw = dict(beta=0.04, num_iterations=2, max_steps=2, max_completion_length=10, **features)
    largest = {}
    for name, cls in (("stock", trl.GRPOTrainer), ("ours", GRPOTrainer)):
        extra = {"workspace_bytes": rows * V * 4} if cls is GRPOTrainer else None
        tr = S.trainer(cls, tmp_path / name, path, trainer_kwargs=extra, **kw)
        for method in ("_compute_loss", "_get_per_token_logps_and_entropies"):
            inner = getattr(tr, method)

            def watched(*a, inner=inner, tr=tr, name=name, **k):
                mode = LargestTensor()
                with mode:
                    out = inner(*a, **k)
                    if torch.is_tensor(out) and out.requires_grad:  # the loss: watch its backward too
                        out.backward(retain_graph=True)
                        tr.model.zero_grad()
                largest[name] = max(largest.get(name, 0), mode.largest)
                return out

            setattr(tr, method, watched)
        if cls is GRPOTrainer:

            def refuse(*a, **k):
                raise AssertionError("TRL's chunked log-prob head ran")

            import trl.trainer.utils as trl_utils

            monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", refuse)
        tr.train()
    tokens = 8 * 10  # per_device_train_batch_size x max_completion_length
    assert largest["stock"] >= tokens * V  # the check can fail: TRL materializes a chunk of logits
    assert largest["ours"] <= max(V * hidden, 4 * rows * V) < tokens * V


# ----------------------------------------------------------------------------- _compute_loss directly


def synthetic_inputs(tr, seed=0, B=8, P=5, K=10, ratio_shape=None, tool_mask=False):
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        prompt_ids=torch.randint(3, 60, (B, P), generator=g),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.randint(3, 60, (B, K), generator=g),
        completion_mask=(torch.arange(K)[None] < torch.randint(1, K + 1, (B, 1), generator=g)).long(),
        advantages=torch.randn(B, generator=g),
    )
    inputs["completion_mask"][1] = 0  # a row with no completion token
    if tool_mask:
        inputs["tool_mask"] = (torch.rand(B, K, generator=g) > 0.3).long()
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum().float()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        lp, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, K)
    m = inputs["completion_mask"]
    inputs["old_per_token_logps"] = lp + 0.3 * torch.randn(B, K, generator=g) * m
    inputs["ref_per_token_logps"] = lp - 0.3 * torch.randn(B, K, generator=g) * m
    if ratio_shape is not None:
        inputs["importance_sampling_ratio"] = torch.rand(*ratio_shape(B, K), generator=g) * 2
    return inputs


def both_losses(tr, inputs):
    """(loss, grads, metrics) of stock TRL's _compute_loss and ours on the same trainer and inputs."""
    out = []
    for compute in (trl.GRPOTrainer._compute_loss, GRPOTrainer._compute_loss):
        if compute is trl.GRPOTrainer._compute_loss:  # stock end to end, TRL's head included
            tr._get_per_token_logps_and_entropies = types.MethodType(
                trl.GRPOTrainer._get_per_token_logps_and_entropies, tr
            )
        else:
            del tr._get_per_token_logps_and_entropies
        tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        tr.model.zero_grad()
        loss = compute(tr, tr.model, dict(inputs))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads, {k: v for d in tr._metrics.values() for k, v in d.items()}))
    return out


def assert_same_loss(results):
    (loss_s, grads_s, metrics_s), (loss_o, grads_o, metrics_o) = results
    torch.testing.assert_close(loss_o, loss_s, rtol=1e-5, atol=1e-7)
    assert grads_s.keys() == grads_o.keys() and grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_o[name], grads_s[name], rtol=1e-4, atol=1e-7, msg=name)
    assert metrics_s.keys() == metrics_o.keys()
    for key in metrics_s:
        assert metrics_o[key] == pytest.approx(metrics_s[key], rel=1e-5, abs=1e-7), key


RATIOS = {
    "token": lambda B, K: (B, K),
    "sequence": lambda B, K: (B, 1),
}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("ratio", list(RATIOS))
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_compute_loss_with_sampler_correction_and_tool_mask(tmp_path, model_path, loss_type, ratio, level):
    tr = S.trainer(GRPOTrainer, tmp_path, model_path, beta=0.04, loss_type=loss_type, importance_sampling_level=level)
    tr.model.train()
    tr.use_vllm = tr.vllm_importance_sampling_correction = True  # TRL's vLLM IS correction, without vLLM
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train
    inputs = synthetic_inputs(tr, ratio_shape=RATIOS[ratio], tool_mask=True)
    assert_same_loss(both_losses(tr, inputs))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_compute_loss_in_eval_mode_and_with_accumulation(tmp_path, model_path, loss_type):
    tr = S.trainer(GRPOTrainer, tmp_path, model_path, beta=0.04, loss_type=loss_type, gradient_accumulation_steps=3)
    inputs = synthetic_inputs(tr)
    tr.model.eval()  # no accumulation normalizer in eval
    assert_same_loss(both_losses(tr, inputs))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 3
    assert_same_loss(both_losses(tr, inputs))


@pytest.mark.parametrize("ratio", list(RATIOS))
def test_compute_loss_vespo_folds_the_sampler_correction_into_its_weight(tmp_path, model_path, ratio):
    """VESPO with TRL's vLLM correction: the ratio enters the gamma weight's sequence ratio instead of multiplying
    the loss (TRL's ratio is 1 off the loss tokens, where its log-prob difference is masked to 0)."""
    tr = S.trainer(GRPOTrainer, tmp_path, model_path, beta=0.04, loss_type="vespo")
    tr.model.train()
    tr.use_vllm = tr.vllm_importance_sampling_correction = True
    tr.current_gradient_accumulation_steps = 1
    inputs = synthetic_inputs(tr, ratio_shape=RATIOS[ratio], tool_mask=True)
    if ratio == "token":
        live = inputs["completion_mask"] * inputs["tool_mask"]
        inputs["importance_sampling_ratio"] = torch.where(live.bool(), inputs["importance_sampling_ratio"], 1.0)
    (stock_loss, _, stock_metrics), _ = got = both_losses(tr, inputs)
    assert_same_loss(got)
    assert 0 < stock_metrics["vespo/phi_seq_mean"][0] < 1
    del inputs["importance_sampling_ratio"]
    tr.use_vllm = False
    uncorrected, _ = both_losses(tr, inputs)
    assert abs(float(uncorrected[0]) - float(stock_loss)) > 1e-4  # the correction moves the weight


# ----------------------------------------------------------------------------- refusals


def test_an_unknown_loss_type_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(trl.GRPOTrainer, "__init__", lambda *a, **k: pytest.fail("loaded before checking"))
    args = S.config(tmp_path)
    args.loss_type = "gpg"  # a loss type a later TRL might add: refused by name, not trained as something else
    with pytest.raises(ValueError, match="loss_type='gpg'"):
        GRPOTrainer(model="unused-model-id", reward_funcs=S.reward_length, args=args)


def test_lm_head_adapters_are_refused(tmp_path, model_path):
    from peft import LoraConfig

    for field, cfg in (
        ("target_modules", LoraConfig(r=4, target_modules=["q_proj", "lm_head"])),
        ("modules_to_save", LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ):
        with pytest.raises(ValueError, match=f"peft_config.{field} includes lm_head"):
            S.trainer(GRPOTrainer, tmp_path, model_path, trainer_kwargs={"peft_config": cfg})


def test_unknown_logit_transforms_and_bad_knobs_are_refused(tmp_path, model_path):
    model = S.model()
    model.config.lm_head_multiplier = 2.0  # a multiplier whose meaning differs by family: refused, not guessed
    args = S.config(tmp_path)
    with pytest.raises(ValueError, match="lm_head_multiplier=2.0"):
        GRPOTrainer(model=model, reward_funcs=S.reward_length, args=args, train_dataset=S.dataset())
    with pytest.raises(ValueError, match="fastgrpo_impl"):
        S.trainer(GRPOTrainer, tmp_path, model_path, trainer_kwargs={"fastgrpo_impl": "cuda"})
    with pytest.raises(ValueError, match="workspace_bytes"):
        S.trainer(GRPOTrainer, tmp_path, model_path, trainer_kwargs={"workspace_bytes": 0})


def test_multimodal_inputs_are_refused(tmp_path, model_path):
    tr = S.trainer(GRPOTrainer, tmp_path, model_path)
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="pixel_values"):
        tr._get_per_token_logps_and_entropies(tr.model, ids, ids, 3, pixel_values=torch.zeros(2, 3))


def test_bf16_autocast_earns_its_tolerance(tmp_path, model_path):
    """GRPOConfig's default bf16 autocast: our error against the fp32 loss and gradients is no
    worse than stock TRL's own bf16 error, plus a small slack."""
    kw = dict(beta=0.04, importance_sampling_level="token")
    ref_tr = S.trainer(GRPOTrainer, tmp_path / "fp32", model_path, **kw)
    inputs = synthetic_inputs(ref_tr)
    ref_tr.model.train()
    ref_tr.current_gradient_accumulation_steps = 1
    (loss32, grads32, _), _ = both_losses(ref_tr, inputs)
    tr = S.trainer(GRPOTrainer, tmp_path / "bf16", model_path, bf16=True, **kw)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    assert tr.accelerator.mixed_precision == "bf16"
    (loss_s, grads_s, _), (loss_o, grads_o, _) = both_losses(tr, inputs)

    def err(x, ref):
        return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-12))

    assert err(loss_s, loss32) > 1e-5  # autocast really ran in bf16
    assert err(loss_o, loss32) <= 2 * err(loss_s, loss32) + 1e-3
    for name in grads32:
        assert err(grads_o[name], grads32[name]) <= 2 * err(grads_s[name], grads32[name]) + 2e-3, name
