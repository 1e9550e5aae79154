"""Configuration of ``fastgrpo train``: one dataclass tree, the only source of truth.

Every field carries its help text (``opt``: field metadata); the command line
(``--learning_rate 1e-6``) and YAML files are generated from these classes. Field names are
unique across sections, follow TRL's ``GRPOConfig`` where the meaning is the same, and may be
given flat or under their section in YAML.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from ..ops.api import IMPLS
from ..ops.loss import LOSS_SPECS, LOSS_TYPES, GRPOLossParams

SCALE_REWARDS = ("group", "batch", "none")
GENERATION_BACKENDS = ("auto", "hf", "continuous", "graph", "vllm")
IS_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
# numpy (which vLLM seeds) takes seeds in [0, 2**32); torch takes more, so this is the range all accept.
MAX_SEED = 2**32 - 1
# Where an infinite value would mean something, the field already has a finite or None way to say it.
INF_SPELLED_OTHERWISE = {
    "max_grad_norm": "0 turns clipping off",
    "vllm_importance_sampling_clip_max": "none = no cap",
    "delta": "none = off",
}
# Fields that name one of a fixed set: ``fastgrpo train --help`` lists the set from here, so it cannot drift.
FIELD_CHOICES: dict[str, tuple[str, ...]] = {"loss_type": LOSS_TYPES, "lr_scheduler_type": LR_SCHEDULERS}


def opt(default: Any, help: str) -> Any:
    """A config field with its default and its help text (the CLI's ``--help``, the README's tables)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelConfig:
    model: str | None = opt(None, "hub id or local directory; None = the embedded offline default")
    dtype: str = opt("auto", '"auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16"')
    attn_implementation: str = opt(
        "auto", '"auto" (flash_attention_2 if installed, else sdpa_varlen) or a transformers name'
    )
    gradient_checkpointing: bool = opt(True, "recompute activations in the backward instead of keeping them")
    offload_activations: bool = opt(False, "checkpointed layer inputs wait for the backward in (pinned) CPU memory")
    padding_free: bool | None = opt(None, "micro-batch as one packed row; None = auto (CUDA + varlen attention)")
    use_liger_body: bool | None = opt(None, "Liger RMSNorm/SwiGLU/RoPE in the body; None = auto (CUDA, if installed)")
    use_peft: bool = opt(
        False, "train LoRA adapters (pip install fastgrpo[lora]); the reference is the base, adapters off"
    )
    lora_r: int = opt(16, "LoRA rank (adapter matrices are r x in and out x r)")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] | None = opt(None, "module names to adapt; None = every linear layer of the body")
    trust_remote_code: bool = opt(False, "allow custom modelling code from the model directory")
    device: str = opt("auto", '"auto" (cuda if available), "cpu" or "cuda[:N]"')
    loss_impl: str = opt(
        "auto", 'fused loss path: "auto", "chunked" (3 GEMMs), "fused" (on chip; alias "triton") or "torch"'
    )


@dataclasses.dataclass
class DataConfig:
    dataset: str | None = opt(
        None, "hub name or local json/jsonl/parquet/csv file; None with model=None = embedded task"
    )
    dataset_config: str | None = opt(None, 'hub dataset configuration name (e.g. "main" for openai/gsm8k)')
    dataset_split: str = opt("train", "split to train on")
    prompt_column: str = opt("prompt", "column with the prompt (a string or a list of chat messages)")
    answer_column: str | None = opt("answer", "column passed to rewards as ``answer``; None = no answer column")
    system_prompt: str | None = opt(None, "prepended as a system message when the tokenizer has a chat template")
    max_prompt_length: int | None = opt(
        512, "prompts longer than this many tokens are cut from the left; None = no cut"
    )
    shuffle_dataset: bool = opt(True, "visit prompts in a seeded random order, reshuffled every epoch")


@dataclasses.dataclass
class GenerationConfig:
    num_generations: int = opt(8, "G: completions sampled per prompt")
    max_completion_length: int | None = opt(256, "tokens per completion; longer ones are cut (truncated)")
    temperature: float = opt(1.0, "sampling temperature, also applied to the logits in the loss")
    top_p: float = opt(1.0, "nucleus sampling")
    top_k: int = opt(0, "top-k sampling; 0 = off")
    repetition_penalty: float = opt(1.0, "HF repetition penalty; 1 = off")
    generation_batch_size: int | None = opt(
        None, "sequences per call (hf, graph) or in flight (continuous); None = all"
    )
    generation_backend: str = opt(
        "auto", "hf, continuous, graph, vllm, or auto (CUDA: continuous; CPU: hf to 1024 tokens)"
    )
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm: fraction of GPU memory vLLM may take (weights + KV cache)")
    vllm_enable_sleep_mode: bool = opt(True, "vllm: free its KV cache and offload its weights during the update")


@dataclasses.dataclass
class CorrectionConfig:
    vllm_importance_sampling_correction: bool | None = opt(
        None, "weight the loss by pi_train(old)/pi_sampler (TRL's name); None = auto (on for vllm)"
    )
    vllm_importance_sampling_mode: str = opt(
        "sequence_mask", "token_truncate/token_mask/sequence_truncate/sequence_mask"
    )
    vllm_importance_sampling_clip_max: float | None = opt(
        3.0, "C_max: truncate ratios above it, or mask them; None = no cap"
    )
    vllm_importance_sampling_clip_min: float | None = opt(
        None, "C_min: truncate ratios below it, or mask them; None = none"
    )


@dataclasses.dataclass
class RewardConfig:
    reward_funcs: list[str] = dataclasses.field(
        default_factory=lambda: ["accuracy", "format"],
        metadata={"help": "built-in name, module:function, or reward-model directory"},
    )
    reward_weights: list[float] | None = opt(None, "one weight per reward function; None = all 1")
    overlong_buffer: int = opt(0, "soft_overlong: penalty ramps over the last this-many tokens")
    overlong_penalty_factor: float = opt(1.0, "soft_overlong: penalty at and beyond max_completion_length")


@dataclasses.dataclass
class GRPOAlgoConfig:
    loss_type: str = opt("dapo", "the objective and how it averages tokens and completions (fastgrpo.fused_grpo_loss)")
    beta: float = opt(0.0, "k3 KL weight to the reference policy; > 0 loads a frozen reference copy")
    epsilon: float = opt(0.2, "lower clip of the importance ratio")
    epsilon_high: float | None = opt(0.28, "upper clip (DAPO clip-higher); None = epsilon")
    delta: float | None = opt(None, "two-sided clipping cap on the unclipped ratio; None = off")
    importance_sampling_level: str = opt("token", '"token" or "sequence" (GSPO)')
    use_bias_correction_kl: bool = opt(False, "multiply the KL by the importance ratio")
    sapo_temperature_pos: float = opt(1.0, "SAPO gate temperature for positive advantages")
    sapo_temperature_neg: float = opt(1.05, "SAPO gate temperature otherwise")
    top_entropy_quantile: float = opt(
        1.0,
        "train on this top fraction of each micro-batch's loss tokens by entropy (TRL's name; one extra lm_head "
        "pass without gradient); 1 = every token",
    )
    off_policy_mask_threshold: float | None = opt(
        None,
        "off-policy sequence masking (TRL's name): drop the policy term of a negative-advantage completion whose "
        "mean log(pi_sampler / pi) exceeds this; None = off",
    )
    vespo_k_pos: float = opt(2.0, "VESPO (loss_type vespo): gamma weight power for advantages >= 0 (TRL's name)")
    vespo_lambda_pos: float = opt(3.0, "VESPO: gamma weight decay for advantages >= 0")
    vespo_k_neg: float = opt(3.0, "VESPO: gamma weight power for advantages < 0")
    vespo_lambda_neg: float = opt(2.0, "VESPO: gamma weight decay for advantages < 0")
    entropy_coef: float = opt(
        0.0,
        "entropy bonus (TRL's name): the loss minus this times the mean entropy over the batch's loss tokens "
        "(with top_entropy_quantile < 1: each micro-batch's mean over the tokens it keeps, weighted by its loss "
        "tokens), for every loss_type; 0 = off, < 0 penalizes entropy",
    )
    scale_rewards: str = opt("group", 'advantage scaling: "group" std, "batch" std, or "none" (Dr. GRPO)')
    num_iterations: int = opt(1, "mu: optimizer passes over each generation batch")
    dynamic_sampling: bool = opt(True, "DAPO: drop groups whose rewards are all equal, sample more prompts")
    max_resample_rounds: int = opt(3, "dynamic sampling: extra sampling rounds before training on what is kept")
    mask_truncated_completions: bool = opt(True, "DAPO overlong filtering: truncated completions get no loss")


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = opt("fastgrpo-output", "metrics, plots, checkpoints and the resolved config go here")
    max_steps: int = opt(-1, "optimizer steps; -1 = num_train_epochs passes over the prompts")
    num_train_epochs: float = opt(1.0, "used when max_steps is -1")
    per_device_train_batch_size: int = opt(8, "completions per micro-batch (when max_tokens_per_microbatch is None)")
    max_tokens_per_microbatch: int | None = opt(
        None, "token budget per micro-batch, sequences grouped by length; None = off"
    )
    gradient_accumulation_steps: int = opt(4, "micro-batches per optimizer step; generation batch = their product")
    learning_rate: float = opt(1e-6, "peak AdamW learning rate")
    lr_scheduler_type: str = opt("linear", "learning-rate schedule after the warmup_ratio warmup")
    warmup_ratio: float = opt(0.0, "fraction of max_steps spent warming up linearly from 0")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.99, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    # A 16-bit compensation buffer per trainable weight keeps the part of each update that bf16/fp16 rounding
    # drops (plain AdamW on bf16 weights at lr 1e-6 loses most updates).
    kahan_summation: bool | None = opt(
        None, "Kahan-summed AdamW (torch-optimi); None = auto: on for 16-bit trainable weights if it fits memory"
    )
    max_grad_norm: float = opt(1.0, "clip the global gradient norm; 0 = off")
    seed: int = opt(42, "seeds data order, sampling and initialization")
    save_steps: int = opt(0, "checkpoint every this many steps (0 = only at the end)")
    save_total_limit: int | None = opt(2, "keep at most this many checkpoints; None = all")
    resume_from_checkpoint: str | None = opt(None, 'checkpoint directory or "latest" in output_dir')
    overwrite_output_dir: bool = opt(False, "start afresh in an output_dir that holds checkpoints (deletes them)")
    logging_steps: int = opt(10, "print a metrics line every this many steps and at the last (metrics.jsonl: all)")
    disable_tqdm: bool = opt(False, "no progress bar")
    plot: bool = opt(True, "write reward.png at the end")


@dataclasses.dataclass
class Config:
    """The whole configuration. Read a field flat (``cfg.learning_rate``: names are unique across
    sections), except ``cfg.model.model``, whose section shares its name; write through its section
    (``cfg.train.learning_rate = ...``)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    correction: CorrectionConfig = dataclasses.field(default_factory=CorrectionConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    grpo: GRPOAlgoConfig = dataclasses.field(default_factory=GRPOAlgoConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __getattr__(self, name: str) -> Any:
        # Flat read access (cfg.learning_rate): names are unique across sections.
        section = FIELD_SECTIONS.get(name)
        if section is None:
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, section), name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def generation_batch_size_total(self) -> int:
        return self.train.per_device_train_batch_size * self.train.gradient_accumulation_steps


_SECTION_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(Config)}
SECTIONS = tuple(_SECTION_CLASSES)
FIELD_SECTIONS: dict[str, str] = {}
for _section, _cls in _SECTION_CLASSES.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FIELD_SECTIONS, f"duplicate config field {_f.name}"
        FIELD_SECTIONS[_f.name] = _section


def field_types() -> dict[str, Any]:
    """Flat field name -> resolved type annotation."""
    out = {}
    for cls in _SECTION_CLASSES.values():
        hints = typing.get_type_hints(cls)
        out.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    return out


def field_help() -> dict[str, str]:
    """Flat field name -> its help text (field metadata: the CLI's help and the README's tables)."""
    return {f.name: f.metadata["help"] for cls in _SECTION_CLASSES.values() for f in dataclasses.fields(cls)}


def _convert(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML or command-line value to the field's type, with an error naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        # Optional switches read None as "auto": let users write that too.
        is_none = is_none or (bool in args and isinstance(value, str) and value.lower() == "auto")
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(name, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_convert(name, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        return _convert_number(name, value, tp)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _convert_number(name: str, value: Any, tp: type) -> int | float:
    """``tp(value)`` for int or float; a bool (YAML's true is an int to Python) or a fraction for an int is refused."""
    what = "an integer" if tp is int else "a number"
    fraction = tp is int and isinstance(value, float) and not value.is_integer()
    if not isinstance(value, bool) and not fraction:
        try:
            return tp(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} must be {what}, got {value!r}")


def flatten(values: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if FIELD_SECTIONS.get(k) != key:
                    raise ValueError(f"unknown config key {key}.{k} in {where}; valid keys: {_valid_keys()}")
                flat[k] = v
        elif key in FIELD_SECTIONS:
            flat[key] = value
        else:
            raise ValueError(f"unknown config key {key!r} in {where}; valid keys: {_valid_keys()}")
    return flat


def _valid_keys() -> str:
    return ", ".join(sorted(FIELD_SECTIONS))


def build_config(*layers: tuple[dict[str, Any], str]) -> Config:
    """Defaults, then each (values, where) layer in order (YAML file, then command line)."""
    cfg = Config()
    types_ = field_types()
    for values, where in layers:
        for key, value in flatten(values, where).items():
            setattr(getattr(cfg, FIELD_SECTIONS[key]), key, _convert(key, value, types_[key]))
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not a text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_finite(cfg: Config) -> None:
    """Every float field (and each value of a float list) is finite: nan and inf fail late or silently
    (inf epochs overflow the step count, an inf learning rate samples from NaN logits)."""
    for name, tp in field_types().items():
        kinds = {tp, *typing.get_args(tp)}
        if float not in kinds and list[float] not in kinds:
            continue
        value = getattr(cfg, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not math.isfinite(v):
                hint = f" ({INF_SPELLED_OTHERWISE[name]})" if name in INF_SPELLED_OTHERWISE else ""
                raise ValueError(f"{name} must be a finite number, got {v}{hint}")


def validate(cfg: Config) -> None:
    """Invalid values get a one-line ValueError naming the field, before any heavy work."""
    _check_finite(cfg)
    _validate_model(cfg.model)
    d = cfg.data
    _check(d.max_prompt_length is None or d.max_prompt_length > 0, "max_prompt_length must be > 0 or None")
    _validate_generation(cfg)
    _validate_correction(cfg.correction)
    c = cfg.correction  # on for sure when asked for; auto resolves with the backend (UpdateSettings checks again)
    mode, on = c.vllm_importance_sampling_mode, c.vllm_importance_sampling_correction
    check_correction_for_loss(cfg.grpo.loss_type, mode, on)
    _validate_rewards(cfg.reward, cfg.generation)
    _validate_grpo(cfg)
    _validate_train(cfg)


def _validate_model(m: ModelConfig) -> None:
    _check(
        m.dtype in ("auto", "float32", "bfloat16", "float16"),
        f"dtype must be auto/float32/bfloat16/float16, got {m.dtype!r}",
    )
    _check(DEVICE_RE.fullmatch(m.device) is not None, f"device must be auto, cpu, cuda or cuda:N, got {m.device!r}")
    _check(m.loss_impl in IMPLS, f"loss_impl must be one of {'/'.join(IMPLS)}, got {m.loss_impl!r}")
    _check(
        m.gradient_checkpointing or not m.offload_activations,
        "offload_activations needs gradient_checkpointing: true (it offloads the checkpointed layer inputs)",
    )
    _check(m.lora_r > 0, f"lora_r must be > 0, got {m.lora_r}")
    _check(m.lora_alpha > 0, f"lora_alpha must be > 0 (the adapters' scale is lora_alpha / lora_r), got {m.lora_alpha}")
    _check(
        not any(name.rsplit(".", 1)[-1] == "lm_head" for name in m.lora_target_modules or []),
        "lora_target_modules must not include lm_head: the fused loss reads the output layer's base weight, "
        "so an adapter there would never train",
    )
    _check(0 <= m.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {m.lora_dropout}")


def _validate_generation(cfg: Config) -> None:
    g, a = cfg.generation, cfg.grpo
    _check(
        g.num_generations >= 2,
        f"num_generations must be >= 2 (advantages compare completions), got {g.num_generations}",
    )
    spec = LOSS_SPECS.get(a.loss_type)
    if g.max_completion_length is None and spec is not None and spec.normalizer.needs_max_completion_length:
        raise ValueError(f"loss_type={a.loss_type!r} needs max_completion_length (its constant normalizer)")
    _check(
        g.max_completion_length is not None and g.max_completion_length > 0,
        f"max_completion_length must be > 0, got {g.max_completion_length}",
    )
    _check(g.temperature > 0 and math.isfinite(g.temperature), f"temperature must be > 0, got {g.temperature}")
    _check(0 < g.top_p <= 1, f"top_p must be in (0, 1], got {g.top_p}")
    _check(g.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {g.repetition_penalty}")
    _check(g.top_k >= 0, f"top_k must be >= 0, got {g.top_k}")
    _check(g.generation_batch_size is None or g.generation_batch_size > 0, "generation_batch_size must be > 0 or None")
    _check(
        g.generation_backend in GENERATION_BACKENDS,
        f"generation_backend must be one of {'/'.join(GENERATION_BACKENDS)}, got {g.generation_backend!r}",
    )
    _check(
        0 < g.vllm_gpu_memory_utilization <= 1,
        f"vllm_gpu_memory_utilization must be in (0, 1], got {g.vllm_gpu_memory_utilization}",
    )


def check_correction_for_loss(loss_type: str, mode: str, enabled: bool | None) -> None:
    """A loss type with a row weight (VESPO) folds the correction's per-token ratios into it: with the correction
    on, a sequence-level mode is refused, as TRL refuses it."""
    spec = LOSS_SPECS.get(loss_type)
    _check(
        not (enabled and spec is not None and spec.row_weight is not None and mode.startswith("sequence_")),
        f"loss_type={loss_type!r} with the sampler correction needs vllm_importance_sampling_mode token_truncate or "
        f"token_mask, got {mode!r}",
    )


def _validate_correction(c: CorrectionConfig) -> None:
    _check(
        c.vllm_importance_sampling_mode in IS_CORRECTION_MODES,
        f"vllm_importance_sampling_mode must be one of {'/'.join(IS_CORRECTION_MODES)}, "
        f"got {c.vllm_importance_sampling_mode!r}",
    )
    for name in ("vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
        v = getattr(c, name)
        _check(v is None or (v > 0 and math.isfinite(v)), f"{name} must be > 0 and finite, or None, got {v}")
    lo, hi = c.vllm_importance_sampling_clip_min, c.vllm_importance_sampling_clip_max
    _check(
        not (c.vllm_importance_sampling_mode.endswith("_truncate") and lo is None and hi is None),
        f"vllm_importance_sampling_mode={c.vllm_importance_sampling_mode!r} needs "
        "vllm_importance_sampling_clip_max or vllm_importance_sampling_clip_min (nothing to truncate to)",
    )
    _check(
        lo is None or hi is None or lo < hi,
        f"vllm_importance_sampling_clip_min ({lo}) must be below vllm_importance_sampling_clip_max ({hi})",
    )


def _validate_rewards(r: RewardConfig, g: GenerationConfig) -> None:
    _check(len(r.reward_funcs) > 0, "reward_funcs must name at least one reward function")
    if r.reward_weights is not None:
        _check(
            len(r.reward_weights) == len(r.reward_funcs),
            f"reward_weights has {len(r.reward_weights)} values for {len(r.reward_funcs)} reward_funcs",
        )
        _check(all(math.isfinite(w) for w in r.reward_weights), "reward_weights must be finite")
    _check(r.overlong_buffer >= 0, f"overlong_buffer must be >= 0, got {r.overlong_buffer}")
    _check(r.overlong_penalty_factor >= 0, f"overlong_penalty_factor must be >= 0, got {r.overlong_penalty_factor}")
    if "soft_overlong" in r.reward_funcs:
        _check(
            0 < r.overlong_buffer <= g.max_completion_length,
            f"soft_overlong needs 0 < overlong_buffer <= max_completion_length, got {r.overlong_buffer}",
        )


def _validate_grpo(cfg: Config) -> None:
    a = cfg.grpo
    try:  # the loss's own checks, the ones fused_grpo_loss runs: one place for them
        GRPOLossParams.from_config(cfg)
    except TypeError as e:
        raise ValueError(str(e)) from None
    _check(a.scale_rewards in SCALE_REWARDS, f"scale_rewards must be one of {SCALE_REWARDS}, got {a.scale_rewards!r}")
    _check(a.num_iterations >= 1, f"num_iterations must be >= 1, got {a.num_iterations}")
    _check(a.max_resample_rounds >= 0, f"max_resample_rounds must be >= 0, got {a.max_resample_rounds}")
    q = a.top_entropy_quantile
    _check(0 < q <= 1, f"top_entropy_quantile must be in (0, 1], got {q}")


def _validate_train(cfg: Config) -> None:
    t, g = cfg.train, cfg.generation
    _check(t.max_steps == -1 or t.max_steps > 0, f"max_steps must be > 0 or -1, got {t.max_steps}")
    _check(t.num_train_epochs > 0, f"num_train_epochs must be > 0, got {t.num_train_epochs}")
    _check(t.per_device_train_batch_size > 0, "per_device_train_batch_size must be > 0")
    _check(
        t.max_tokens_per_microbatch is None or t.max_tokens_per_microbatch > 0,
        f"max_tokens_per_microbatch must be > 0 or None, got {t.max_tokens_per_microbatch}",
    )
    _check(t.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be > 0")
    total = cfg.generation_batch_size_total()
    _check(
        total % g.num_generations == 0,
        f"per_device_train_batch_size * gradient_accumulation_steps ({total}) must be a multiple of "
        f"num_generations ({g.num_generations})",
    )
    _check(t.learning_rate >= 0, f"learning_rate must be >= 0, got {t.learning_rate}")
    _check(t.lr_scheduler_type in LR_SCHEDULERS, f"lr_scheduler_type must be one of {LR_SCHEDULERS}")
    _check(0 <= t.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _check(t.weight_decay >= 0, f"weight_decay must be >= 0, got {t.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, name) < 1, f"{name} must be in [0, 1), got {getattr(t, name)}")
    _check(t.adam_epsilon >= 0, f"adam_epsilon must be >= 0, got {t.adam_epsilon}")
    _check(t.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {t.max_grad_norm}")
    _check(0 <= t.seed <= MAX_SEED, f"seed must be in [0, 2**32 - 1] (numpy's range, which vLLM seeds), got {t.seed}")
    _check(t.save_steps >= 0, f"save_steps must be >= 0, got {t.save_steps}")
    _check(t.save_total_limit is None or t.save_total_limit >= 1, "save_total_limit must be >= 1 or None")
    _check(t.logging_steps >= 1, f"logging_steps must be >= 1, got {t.logging_steps}")
