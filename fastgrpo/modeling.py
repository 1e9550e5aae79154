"""Building the policy for training: load, LoRA, body kernels, checkpointing, the reference.

Order matters: Liger patches the modules peft then wraps; checkpointing is enabled last so the
offloading checkpoint function sees the final layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .attention import NAME as SDPA_VARLEN
from .policy import load_model_and_tokenizer, resolve_attn_implementation

# Attention paths that take a packed row without building a dense (L, L) mask.
PACKING_ATTENTION = ("flash_attention_2", "flash_attention_3", SDPA_VARLEN)


def resolve_padding_free(spec: bool | None, attn_implementation: str, device: torch.device) -> bool:
    """``None`` (auto) packs when the attention path needs no dense mask for packed rows, on CUDA.
    On CPU, where runs are small, one SDPA call per sequence costs more than the padding it saves
    (the embedded default: 29 s packed vs 22 s padded)."""
    if spec is not None:
        return bool(spec)
    return device.type == "cuda" and attn_implementation in PACKING_ATTENTION


def lora_config(cfg):
    try:
        import peft
    except ImportError:
        raise ValueError("use_peft needs peft: pip install 'fastgrpo[lora]'") from None
    targets = cfg.lora_target_modules or "all-linear"  # peft's all-linear leaves the lm_head out
    return peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip


def is_adapter_checkpoint(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def prepare_model(model, cfg, device: torch.device, resume_path: Path | None = None):
    """Liger body kernels, LoRA adapters (new, or a checkpoint's when resuming) and gradient
    checkpointing on a loaded model. Returns ``(model, info)``; ``info["liger_body"]`` lists the
    kernels applied."""
    from .body import apply_liger_body, resolve_use_liger_body

    use_liger = resolve_use_liger_body(cfg.use_liger_body, device, model_type=model.config.model_type)
    info: dict = {"liger_body": apply_liger_body(model) if use_liger else []}
    if cfg.use_peft:
        lora_cfg = lora_config(cfg)
        import peft

        model.requires_grad_(False)
        if resume_path is not None and is_adapter_checkpoint(resume_path):
            model = peft.PeftModel.from_pretrained(model, str(resume_path), is_trainable=True)
        else:
            model = peft.get_peft_model(model, lora_cfg)
    if cfg.gradient_checkpointing:
        from .offload import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, offload=cfg.offload_activations)
    model.config.use_cache = False
    model.train()
    info["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info


def build_models(cfg, device: torch.device, dtype: torch.dtype, resume_path: Path | None = None):
    """Returns ``(model, ref_model, tokenizer, info)``.

    ``model`` is the trainable policy (a peft model when ``use_peft``). ``ref_model`` is a frozen
    copy of the initial weights when ``beta > 0`` and the whole model trains, else None (with
    LoRA the reference is the policy with adapters disabled). ``info`` says what was resolved:
    attention, padding_free, liger kernels, parameter counts.
    """
    from .body import apply_liger_body

    if cfg.use_peft:
        lora_config(cfg)  # peft missing: fail before loading anything
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    load = dict(dtype=dtype, device=device, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    # LoRA checkpoints hold adapters only: the base always comes from cfg.model.model.
    path = cfg.model.model if (cfg.use_peft or resume_path is None) else str(resume_path)
    model, tokenizer = load_model_and_tokenizer(str(path), **load)
    model, info = prepare_model(model, cfg, device, resume_path)
    info = {"attn_implementation": attn, "padding_free": resolve_padding_free(cfg.padding_free, attn, device), **info}
    ref_model = None
    if cfg.beta > 0 and not cfg.use_peft:  # the reference is the initial policy, also after a resume
        ref_model, _ = load_model_and_tokenizer(cfg.model.model, **load)
        if info["liger_body"]:
            apply_liger_body(ref_model)
        ref_model.eval().requires_grad_(False)
    return model, ref_model, tokenizer, info
