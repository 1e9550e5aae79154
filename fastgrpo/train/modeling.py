"""Building the policy for training: device and dtype, load, LoRA, body kernels, checkpointing,
the reference.

Order matters: Liger patches the modules peft then wraps; checkpointing is enabled last so the
offloading checkpoint function sees the final layers.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fastgrpo.ops.checks import check_fusable_model as check_fusable

from .attention import NAME as SDPA_VARLEN
from .attention import register as register_attention
from .body import apply_liger_body, resolve_use_liger_body
from .hub import hub_offline, hub_source, is_hub_model, is_local_model
from .offload import enable_gradient_checkpointing

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


# Weights are loaded from safetensors only: unpickling a .bin/.pt file can run any code it holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NO_PICKLES = (
    "fastgrpo loads safetensors weights only, never pickled ones (unpickling can run code); convert them "
    "where you trust them: model.save_pretrained(dir, safe_serialization=True)"
)


def check_safetensors_weights(name: str, path: Path) -> None:
    """A local model directory whose weights are pickled only (pytorch_model.bin) is refused in one line."""
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"model directory {name!r} holds pickled weights ({', '.join(pickled)}): {NO_PICKLES}")


def check_model_path(name: str) -> None:
    """A local path that does not exist, or holds no config.json or only pickled weights, fails here,
    before anything is loaded."""
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name!r} has no config.json")
        check_safetensors_weights(name, path)
        return
    if not is_hub_model(name):
        raise ValueError(f"model path {name!r} does not exist")


def resolve_attn_implementation(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return spec
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return SDPA_VARLEN


def load_model_and_tokenizer(
    name: str, *, dtype: torch.dtype, device: torch.device, attn_implementation: str, trust_remote_code: bool = False
):
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` from a hub id or local directory; the
    tokenizer gets a pad token (EOS) when it has none."""
    import transformers

    check_model_path(name)
    # A hub id with the hub unreachable (or an offline variable set): the cached copy, or one line now.
    local_only = not is_local_model(name) and hub_source("--model", name, "model")
    register_attention()
    try:
        with hub_offline(local_only):  # (transformers asks the hub for adapter_config.json despite local_files_only)
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code, local_files_only=local_only
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name,
                local_files_only=local_only,
                dtype=dtype,
                attn_implementation=resolve_attn_implementation(attn_implementation, device),
                trust_remote_code=trust_remote_code,
                use_safetensors=True,  # a hub repo with pickled weights only is refused, not unpickled
            )
    except (OSError, ValueError) as e:
        text = " ".join(str(e).split())
        if "safetensors" in text and ("no file named" in text or "does not appear to have" in text):
            text = f"it has no safetensors weights; {NO_PICKLES}"  # (transformers' own line says "do not set" it)
        raise ValueError(f"could not load model {name!r}: {text}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_fusable(model)
    return model.to(device), tokenizer


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


def check_checkpoint_kind(path: Path, use_peft: bool) -> None:
    """A LoRA checkpoint holds adapters only and a full one whole weights: resuming either with the other
    ``use_peft`` would silently train something else (fresh adapters on a trained model, or the base
    without its adapters)."""
    adapters = is_adapter_checkpoint(path)
    if adapters != bool(use_peft):
        kind = "LoRA adapters (a use_peft run)" if adapters else "full model weights (a run without use_peft)"
        raise ValueError(
            f"resume_from_checkpoint {str(path)!r} holds {kind}, but use_peft is {str(bool(use_peft)).lower()}; "
            f"resume with --use_peft {str(adapters).lower()}"
        )


@dataclass(frozen=True)
class ModelInfo:
    """What a run resolved about its model, printed under the memory plan and recorded by the benches."""

    attn_implementation: str | None = None  # the training attention (a transformers name or sdpa_varlen)
    padding_free: bool = False  # micro-batches packed into one row
    liger_body: list[str] = field(default_factory=list)  # Liger kernels applied to the body
    trainable_parameters: int = 0
    parameters: int = 0
    generation_backend: str = "hf"  # the resolved sampling backend (the memory plan's sampling phase)
    kahan_summation: bool = False  # AdamW with a Kahan compensation buffer (the plan's optimizer state)


def prepare_model(model, cfg, device: torch.device, resume_path: Path | None = None) -> tuple[object, ModelInfo]:
    """Liger body kernels, LoRA adapters (new, or a checkpoint's when resuming) and gradient
    checkpointing on a loaded model. Returns ``(model, info)``: the kernels applied and the parameter
    counts."""
    use_liger = resolve_use_liger_body(cfg.use_liger_body, device, model_type=model.config.model_type)
    liger = apply_liger_body(model) if use_liger else []
    if cfg.use_peft:
        lora_cfg = lora_config(cfg)
        import peft

        model.requires_grad_(False)
        if resume_path is not None and is_adapter_checkpoint(resume_path):
            model = peft.PeftModel.from_pretrained(model, str(resume_path), is_trainable=True)
        else:
            model = peft.get_peft_model(model, lora_cfg)
        head = model.get_output_embeddings()
        if hasattr(head, "lora_A"):  # an output layer under another name (embed_out, output) matched a target
            raise ValueError(
                f"lora_target_modules {cfg.lora_target_modules} adapt the output layer ({type(head).__name__}): the "
                "fused loss reads its base weight, so that adapter would never train; leave it out"
            )
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=cfg.offload_activations)
    model.config.use_cache = False
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, ModelInfo(
        liger_body=liger, trainable_parameters=trainable, parameters=sum(p.numel() for p in model.parameters())
    )


def build_models(cfg, device: torch.device, dtype: torch.dtype, resume_path: Path | None = None):
    """Returns ``(model, ref_model, tokenizer, info)``.

    ``model`` is the trainable policy (a peft model when ``use_peft``). ``ref_model`` is a frozen
    copy of the initial weights when ``beta > 0`` and the whole model trains, else None (with
    LoRA the reference is the policy with adapters disabled). ``info`` says what was resolved:
    attention, padding_free, liger kernels, parameter counts.
    """
    if cfg.use_peft:
        lora_config(cfg)  # peft missing: fail before loading anything
    if resume_path is not None:
        check_checkpoint_kind(resume_path, cfg.use_peft)
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    load = dict(dtype=dtype, device=device, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    # LoRA checkpoints hold adapters only: the base always comes from cfg.model.model.
    path = cfg.model.model if (cfg.use_peft or resume_path is None) else str(resume_path)
    model, tokenizer = load_model_and_tokenizer(str(path), **load)
    model, info = prepare_model(model, cfg, device, resume_path)
    info = replace(info, attn_implementation=attn, padding_free=resolve_padding_free(cfg.padding_free, attn, device))
    ref_model = None
    if cfg.beta > 0 and not cfg.use_peft:  # the reference is the initial policy, also after a resume
        ref_model, _ = load_model_and_tokenizer(cfg.model.model, **load)
        if info.liger_body:
            apply_liger_body(ref_model)
        ref_model.eval().requires_grad_(False)
    return model, ref_model, tokenizer, info
