"""Heads that transform their logits (Gemma 2's softcap, Cohere's scale, Granite's divisor) in fastgrpo train:
the model's transform reaches every head pass the trainer makes, which must then agree with the model's own
logits (what the sampler draws from)."""

import pytest
import torch

from fastgrpo.ops import head_transform
from fastgrpo.train.policy import completion_logprobs

from helpers import train_config

FAMILIES = {
    # family: (config class, model class, extra config, expected head fields)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, final_logit_softcapping=0.3),
               {"logit_scale": 1.0, "final_logit_softcapping": 0.3}),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=4.0),
               {"logit_scale": 4.0, "final_logit_softcapping": None}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=0.25),
                {"logit_scale": 4.0, "final_logit_softcapping": None}),
}  # fmt: skip


def _save_model(family, embedded, path):
    """A tiny random model of ``family`` with the embedded task's tokenizer, saved as a model folder."""
    import transformers

    config_cls, model_cls, extra, _ = FAMILIES[family]
    tok = transformers.AutoTokenizer.from_pretrained(embedded[0])
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=tok.model_max_length, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fastgrpo_train_uses_the_models_head_transform(family, embedded, tmp_path):
    from fastgrpo.train.trainer import GRPOTrainer

    model_dir = _save_model(family, embedded, tmp_path / "model")
    attention = {"attn_implementation": "eager"} if family == "gemma2" else {}  # Gemma 2 has no SDPA path
    cfg = train_config((model_dir, embedded[1]), tmp_path / "out", max_steps=1, temperature=0.8, beta=0.04, **attention)
    trainer = GRPOTrainer(cfg)
    try:
        assert head_transform(trainer.model) == FAMILIES[family][3]
        assert {k: getattr(trainer.params, k) for k in FAMILIES[family][3]} == FAMILIES[family][3]
        batch = trainer.sample_batch()
        ro = batch.rollouts
        got = trainer.updater.logprobs(trainer.model, ro)
        # The model's own head (its forward applies the transform), then TRL's temperature.
        ids = torch.cat([ro.prompt_ids, ro.completion_ids.clamp(min=0)], 1)
        am = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
        with torch.no_grad():
            logits = trainer.model(input_ids=ids, attention_mask=am).logits.double()
        P, C = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
        want = (logits[:, P - 1 : P + C - 1] / 0.8).log_softmax(-1)
        want = want.gather(-1, ro.completion_ids.clamp(min=0)[..., None]).squeeze(-1)
        m = ro.completion_mask.bool()
        torch.testing.assert_close(got[m].double(), want[m], rtol=1e-4, atol=1e-5)
        # Without the transform the head gives other log-probs: the comparison above can fail.
        plain = completion_logprobs(trainer.model, ro, 0.8, "torch")
        assert (plain[m] - got[m]).abs().max() > 1e-2
        metrics = trainer.updater.update(batch)  # one update through the fused loss with the transform
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    finally:
        trainer.close()


def _config_only(**fields):
    """A stand-in model: ``head_transform`` reads only ``model.config``."""
    import types

    return types.SimpleNamespace(config=types.SimpleNamespace(**fields))


@pytest.mark.parametrize(
    "fields, want",
    [
        (dict(model_type="cohere2", logit_scale=0.25), {"logit_scale": 0.25, "final_logit_softcapping": None}),
        (dict(model_type="granitemoe", logits_scaling=8), {"logit_scale": 0.125, "final_logit_softcapping": None}),
        (dict(model_type="hyperclovax", logits_scaling=2.0), {"logit_scale": 2.0, "final_logit_softcapping": None}),
        (dict(model_type="gemma3_text", final_logit_softcapping=30.0), {"logit_scale": 1.0,
                                                                        "final_logit_softcapping": 30.0}),
        # RecurrentGemma caps with its own field name, always.
        (dict(model_type="recurrent_gemma", logits_soft_cap=30.0), {"logit_scale": 1.0,
                                                                    "final_logit_softcapping": 30.0}),
        (dict(model_type="llama", logit_scale=1.0), {"logit_scale": 1.0, "final_logit_softcapping": None}),
    ],
)  # fmt: skip
def test_head_transform_reads_each_family_as_transformers_applies_it(fields, want):
    assert head_transform(_config_only(**fields)) == want


@pytest.mark.parametrize(
    "fields, match",
    [
        # MPT's config has a logit_scale that transformers' head does not apply: refused, not applied.
        (dict(model_type="mpt", logit_scale=2.0), "logit_scale=2.0"),
        (dict(model_type="granite", logits_scaling=0), "logits_scaling=0"),
        (dict(model_type="cohere", logit_scale="inv_sqrt_d_model"), "logit_scale='inv_sqrt_d_model'"),
        (dict(model_type="falcon_h1", lm_head_multiplier=0.5), "lm_head_multiplier=0.5"),
        (dict(model_type="gemma2", final_logit_softcapping=-1.0), "final_logit_softcapping=-1.0"),
    ],
)
def test_head_transform_refuses_what_it_cannot_apply_by_field(fields, match):
    with pytest.raises(ValueError, match=match):
        head_transform(_config_only(**fields))
