"""TRL adapter: TRL's ``GRPOTrainer`` with every log-prob and loss computed by fastgrpo.

Change one import line::

    from fastgrpo.integrations.trl import GRPOTrainer  # instead of: from trl import GRPOTrainer

and keep the same ``GRPOConfig``, model, rewards and launcher (``accelerate launch`` for DDP,
FSDP2 or DeepSpeed). Checked against TRL 1.16.

What changes: the policy's per-token log-probs, entropies and loss come from the final hidden
states and the lm_head through ``fastgrpo.ops.FusedGRPOLoss`` (gradients formed in the forward on
the chunked path, or logits on chip on the fused path), and the old and reference log-probs
through ``fastgrpo.ops.chunked_logprobs``. Full-vocabulary logits never exist; TRL's own chunked
head avoids them too, with [4096 tokens, 32768 vocab] tiles recomputed in the backward (4 head
GEMM passes), where ours forms the gradients in the forward (3 passes). Everything else
(generation, rewards, advantages, vLLM, the optimizer step, logging, checkpoints) is TRL's. The
loss, its gradient accumulation and multi-process normalizers, and the logged metrics (``kl``,
``entropy``, ``clip_ratio/*``, ``cispo_clip_ratio``) follow TRL 1.16's ``_compute_loss``.

The fused ops run inside the model's forward (a ``fastgrpo=`` keyword the adapter adds next to
TRL's ``fused_lm_head=``), so DDP's gradient hooks, FSDP2's gathers and PEFT's adapter switches
see an ordinary forward. ``trainer.fastgrpo_last_route`` says which path ran the last loss.

Refused at construction, each with a ``ValueError`` naming the field (the fused op computes a
different quantity, so a silent fallback would train something else): a ``loss_type`` outside
``fastgrpo.ops.LOSS_TYPES`` (every TRL 1.16 type is in it), an MoE family
without a ``load_balancing_loss_func`` (``router_aux_loss_coef != 0``), a logit transform in the model config
whose meaning is not known here (``lm_head_multiplier``, ``output_multiplier*``, ``logits_scaling`` outside the
Granite and HyperCLOVA X families), a PEFT adapter on ``lm_head``
(``target_modules`` / ``modules_to_save``), vision-language models and processors, and under
DeepSpeed ZeRO-3 any path but ``fastgrpo_impl="chunked"``, ``importance_sampling_level=
"sequence"``, ``off_policy_mask_threshold`` or ``loss_type="vespo"`` (their backward reads the lm_head again,
outside ZeRO-3's gather). ``off_policy_mask_threshold`` (TRL's off-policy sequence masking) runs: it reads
a row's whole log-probs, so it takes the 4-pass route, as GSPO does. An MoE model's router
load-balancing loss is computed from the same backbone forward as the fused loss, with the model
family's own ``load_balancing_loss_func``, and added and logged (``aux_loss``) as TRL does.
``top_entropy_quantile < 1`` runs: one lm_head pass without gradient gives this forward's entropies,
TRL's own ``get_high_entropy_mask`` turns them into the mask, and the mask gates the policy term (and the
entropy bonus). ``entropy_coef`` / ``use_adaptive_entropy`` run: the op subtracts the coefficient times the
mean entropy over the effective mask, its gradient formed with the rest (in the chunked path's row kernels, or
by the 4-pass backward), and the adaptive controller moves the coefficient as TRL's does (``entropy_coef`` and
``policy_loss`` logged, its state saved with checkpoints by TRL's own hooks). ``loss_type="vespo"`` runs: its
gamma weight of each row's sequence ratio (with the vLLM correction folded in, not multiplied) takes the
4-pass route, and ``vespo/phi_seq_mean`` is logged. Softcapped and scaled heads run
(``final_logit_softcapping``: Gemma 2 and 3; ``logit_scale``: Cohere; ``logits_scaling``: Granite): the
transform is applied in every path's logit tiles and rows, and its derivative in their backward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from collections.abc import Callable
from contextlib import nullcontext

import torch

from fastgrpo.integrations import TRL_INSTALL

try:
    import trl
    from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin
except ModuleNotFoundError as e:  # TRL is an extra: one line saying which, not "No module named 'trl'"
    if e.name != "trl":  # TRL is there and something it imports is not: its own error says what
        raise
    raise ImportError(f"fastgrpo.integrations.trl needs TRL >= 1.16: trl not installed ({TRL_INSTALL})") from None

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed: nothing is sharded
    DTensor = FSDPModule = ()

from fastgrpo.ops import IMPLS, FusedGRPOLoss, chunked_logprobs, masked_entropy
from fastgrpo.ops.checks import check_fusable_model, check_workspace_bytes, head_transform
from fastgrpo.ops.loss import LOSS_TYPES, GRPOLossParams, loss_spec

_TRL_INIT = inspect.signature(trl.GRPOTrainer.__init__)


def _num_items_normalized(loss_type: str) -> bool:
    """Whether TRL divides this loss by num_items_in_batch (the generation batch's tokens)."""
    return loss_spec(loss_type).normalizer.micro_batch == "num_items"


@dataclasses.dataclass(frozen=True)
class HeadCall:
    """What the patched forward runs in place of the lm_head.

    ``fn(hidden, weight, bias)`` gets the (B, logits_to_keep, H) hidden states that predict the
    last ``logits_to_keep`` tokens, the (V, H) lm_head weight (gathered under FSDP2 / ZeRO-3) and
    its (V,) bias or None; the forward returns what ``fn`` returns. With ``aux_loss`` (an MoE model)
    it returns ``(what fn returns, the router load-balancing loss)``, as the model's own head computes it.
    """

    logits_to_keep: int
    fn: Callable
    aux_loss: bool = False


def add_head_call(model, *, cast_lm_head_to_fp32: bool = False) -> None:
    """Let ``model(..., fastgrpo=HeadCall(...))`` run the backbone only and hand its final hidden
    states and the lm_head to ``HeadCall.fn``. Without the keyword the forward is unchanged
    (TRL's fused head, generation)."""
    inner = model.forward

    @functools.wraps(type(model).forward)  # ``generate`` validates its kwargs against this signature
    def forward(self, *args, fastgrpo: HeadCall | None = None, **kwargs):
        if fastgrpo is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        if fastgrpo.aux_loss:
            kwargs["output_router_logits"] = True
        # Looked up on every call: FSDP and PEFT replace modules after the patch.
        backbone = self.base_model(*args, **kwargs)
        k = fastgrpo.logits_to_keep
        hidden = backbone.last_hidden_state[:, -k - 1 : -1]
        head = self.get_output_embeddings()
        weight, bias, release = _whole_head(head)
        hidden = hidden.to(weight.device)  # a model split over devices can end elsewhere
        context = nullcontext()
        if cast_lm_head_to_fp32:
            hidden, context = hidden.float(), torch.autocast(hidden.device.type, enabled=False)
        with context, maybe_gather_lm_head_ctx(weight, bias):
            out = fastgrpo.fn(hidden, weight, bias)
        release()
        if fastgrpo.aux_loss:
            return out, router_aux_loss(self, backbone.router_logits, kwargs.get("attention_mask"))
        return out

    model.forward = types.MethodType(forward, model)


def _whole_head(head) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[], None]]:
    """The lm_head's weight and bias, whole, and what to call after the head pass.

    Under FSDP2 the root unit's forward has gathered a head that lives in it. A head in its own unit is never
    called (only its weight is read), so FSDP2 would neither gather it nor reduce its gradient: its own
    ``unshard`` gathers it here, and the backward then reduce-scatters (averages) its gradient across ranks as
    for every unit. ``full_tensor()`` would not: its backward keeps each rank's rows of that rank's own gradient.
    Without gradient (reference, old log-probs, eval) the unit is resharded right after the pass; with it (a
    frozen head too: the 4-pass backward reads the weight again), FSDP2's end-of-backward reshards it."""
    weight, bias = head.weight, head.bias
    if not isinstance(weight, DTensor):
        return weight, bias, lambda: None
    if isinstance(head, FSDPModule):
        head.unshard()
        return head.weight, head.bias, (lambda: None) if torch.is_grad_enabled() else head.reshard
    return weight.full_tensor(), None if bias is None else bias.full_tensor(), lambda: None


def router_aux_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss the model's own causal-LM head adds: its family's
    ``load_balancing_loss_func`` over the backbone's router logits, with the head's expert counts."""
    # Through the MRO: FSDP2 (and other wrappers) re-class the model in their own module.
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    func = next((m.load_balancing_loss_func for m in modules if hasattr(m, "load_balancing_loss_func")), None)
    if func is None or not hasattr(model, "num_experts") or not hasattr(model, "num_experts_per_tok"):
        raise ValueError(
            f"router_aux_loss_coef != 0 on {type(model).__name__}: fastgrpo finds no load_balancing_loss_func "
            "with num_experts / num_experts_per_tok for it"
        )
    if router_logits is None:
        return None
    return func(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def _is_peft_tuned(module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return False
    return isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))


def _names(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_config(args, peft_config=None) -> None:
    """Refuse, by field name, what fastgrpo's loss cannot compute exactly (module docstring)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported by fastgrpo's fused loss; use one of {LOSS_TYPES}"
        )
    if peft_config is not None:
        targets = _names(getattr(peft_config, "target_modules", None))
        saved = _names(getattr(peft_config, "modules_to_save", None))
        for field, names in (("target_modules", targets), ("modules_to_save", saved)):
            if any(t == "lm_head" or t.endswith(".lm_head") for t in names):
                raise ValueError(f"peft_config.{field} includes lm_head; fastgrpo's loss reads the base lm_head weight")


def check_model(model, processing_class=None) -> None:
    """Refuse models whose head or inputs the fused loss does not cover."""
    if getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model"):
        base = model.get_base_model()
    else:
        base = model
    config = base.config
    if config.get_text_config() is not config or getattr(config, "vision_config", None) is not None:
        raise ValueError(f"model {type(base).__name__} is multimodal; fastgrpo's TRL adapter supports text models only")
    if processing_class is not None and hasattr(processing_class, "image_processor"):
        raise ValueError("processing_class is a multimodal processor; fastgrpo's TRL adapter supports text only")
    check_fusable_model(base)
    if _is_peft_tuned(base.get_output_embeddings()):
        raise ValueError("the lm_head carries a PEFT adapter (target_modules/modules_to_save includes lm_head)")


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs and loss run through fastgrpo (module docstring).

    Same arguments as ``trl.GRPOTrainer``, plus, keyword-only:

    Args:
        fastgrpo_impl: fastgrpo path, one of ``fastgrpo.ops.IMPLS`` (default "auto": on CUDA the
            chunked 3-GEMM path when its workspace fits, else logits on chip; the torch twin on
            CPU).
        workspace_bytes: int > 0 or None: bound on the logits of one chunk of tokens, on the
            chunked path and the torch twin (None: 1 GiB chunked, capped by free memory on CUDA;
            64 MiB twin). The fused path keeps its logits on chip.
    """

    def __init__(self, *args, fastgrpo_impl: str = "auto", workspace_bytes: int | None = None, **kwargs):
        if fastgrpo_impl not in IMPLS:
            raise ValueError(f"fastgrpo_impl must be one of {IMPLS}, got {fastgrpo_impl!r}")
        check_workspace_bytes(workspace_bytes)
        bound = _TRL_INIT.bind(self, *args, **kwargs).arguments
        config = bound.get("args")
        if config is not None:  # TRL builds a default GRPOConfig otherwise, which is supported
            check_config(config, bound.get("peft_config"))
        if not isinstance(bound["model"], str):
            check_model(bound["model"], bound.get("processing_class"))
        super().__init__(*args, **kwargs)
        check_model(self.model, self.processing_class)
        if self.aux_loss_enabled:  # refused now, not at the first step, if the family has no such loss
            policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            router_aux_loss(policy, None, None)
        self.fastgrpo_impl = fastgrpo_impl
        self.fastgrpo_workspace_bytes = workspace_bytes
        self._zero3_checks()
        a = self.args
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.fastgrpo_head = head_transform(policy)  # the model's logit scale and softcap, for every head pass
        params = dataclasses.replace(GRPOLossParams.from_config(a), **self.fastgrpo_head)  # GRPOConfig's names
        self.fastgrpo_loss = FusedGRPOLoss(
            impl=self.fastgrpo_impl, workspace_bytes=workspace_bytes, **dataclasses.asdict(params)
        )
        self.fastgrpo_last_route: str | None = None
        add_head_call(policy, cast_lm_head_to_fp32=a.cast_lm_head_to_fp32)
        if self.ref_model is not None:
            add_head_call(self.accelerator.unwrap_model(self.ref_model), cast_lm_head_to_fp32=a.cast_lm_head_to_fp32)

    def _zero3_checks(self) -> None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            return
        # Only the chunked path forms its weight gradient in the forward, where the head is gathered.
        if self.fastgrpo_impl == "auto":
            self.fastgrpo_impl = "chunked"
        if self.fastgrpo_impl != "chunked" or GRPOLossParams.from_config(self.args).couples_rows:
            raise ValueError(
                "under DeepSpeed ZeRO-3 fastgrpo needs fastgrpo_impl='chunked', importance_sampling_level='token', "
                "no off_policy_mask_threshold and a loss_type other than 'vespo'"
            )

    # ------------------------------------------------------------------ log-probs (old, ref)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        given = sorted(name for name, value in multimodal.items() if value is not None)
        if given:
            raise ValueError(f"fastgrpo's TRL adapter supports text only; got multimodal inputs {given}")
        k = logits_to_keep
        step = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), step):
            ids, am = input_ids[start : start + step], attention_mask[start : start + step]
            active = am[:, -k:] != 0
            targets = ids[:, -k:]

            def fn(hidden, weight, bias, active=active, targets=targets):
                # Only scored tokens are projected; the rest read 0, as in TRL.
                lp, ent = chunked_logprobs(
                    hidden[active],
                    weight,
                    targets[active],
                    bias=bias,
                    temperature=self.temperature,
                    return_entropy=True,
                    impl=self.fastgrpo_impl,
                    workspace_bytes=self.fastgrpo_workspace_bytes,
                    **self.fastgrpo_head,
                )
                zeros = torch.zeros(active.shape, dtype=lp.dtype, device=lp.device)
                return zeros.masked_scatter(active, lp), zeros.masked_scatter(active, ent)

            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=am, fastgrpo=HeadCall(k, fn, compute_aux_loss))
            (lp, ent), a = out if compute_aux_loss else (out, None)
            logps.append(lp)
            entropies.append(ent)
            aux.append(a)
        aux_loss = torch.stack(aux).mean() if compute_aux_loss else None  # TRL: the mean over chunks
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, aux_loss

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        given = sorted(name for name in ("pixel_values", "image_grid_thw", "token_type_ids") if name in inputs)
        if given:
            raise ValueError(f"fastgrpo's TRL adapter supports text only; got multimodal inputs {given}")
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
        # TRL's off-policy mask measures drift from the sampler where it has its log-probs (vLLM), else from old.
        sampling = inputs.get("sampling_per_token_logps") if self.args.off_policy_mask_threshold is not None else None
        mode = "train" if self.model.training else "eval"
        num_items = None
        if _num_items_normalized(self.loss_type):
            # TRL: num_items_in_batch spans the generation batch; rescale to one accumulation window.
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.current_gradient_accumulation_steps / self.args.steps_per_generation

        params = self._loss_params(mode)

        def fn(hidden, weight, bias):
            entropy_mask = None  # TRL's mask gates the policy term and the entropy bonus
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self._high_entropy_mask(hidden, weight, bias, completion_ids, mask)
            out = self.fastgrpo_loss(
                hidden, weight, completion_ids, mask, advantages, old, ref, bias, num_items, ratio, sampling,
                entropy_mask, params=params,
            )  # fmt: skip
            return out, entropy_mask

        call = HeadCall(completion_ids.size(1), fn, self.aux_loss_enabled)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, fastgrpo=call)
        (out, entropy_mask), aux_loss = out if self.aux_loss_enabled else (out, None)
        self.fastgrpo_last_route = self.fastgrpo_loss.last_route
        loss = out.loss
        if not _num_items_normalized(self.loss_type) and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps
        if self._entropy_bonus_enabled:
            self._entropy_bonus_step(mode, out, mask if entropy_mask is None else mask * entropy_mask)
        self._log_loss_metrics(mode, out.logprobs, out.entropy, old, ref, advantages, mask, ratio)
        if aux_loss is not None:  # TRL: the policy loss is already scaled for accumulation, so scale aux too
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _loss_params(self, mode: str) -> GRPOLossParams:
        """The op's hyper-parameters for this micro-batch: the held ones, with TRL's entropy bonus coefficient of
        the step (adaptive control applies it only while the last window's entropy is at or below the target). TRL
        divides the bonus by the accumulation steps for every loss type; the ones it does not divide by them
        (num_items-normalized) get the division here, in the coefficient."""
        params = self.fastgrpo_loss.params
        if not self._entropy_bonus_enabled:
            return params
        coef = self.entropy_coef
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            coef = 0.0
        if _num_items_normalized(self.loss_type) and mode == "train":
            coef = coef / self.current_gradient_accumulation_steps
        return dataclasses.replace(params, entropy_coef=coef)

    @torch.no_grad()
    def _entropy_bonus_step(self, mode: str, out, effective_mask: torch.Tensor) -> None:
        """TRL's bookkeeping around the entropy bonus: the ``policy_loss`` metric, and under adaptive control the
        window's entropy over the effective mask, which moves ``entropy_coef`` at each optimizer step."""
        policy_loss = out.metrics.get("policy_loss", out.loss.detach())  # absent when the coefficient is 0
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            eff = effective_mask.to(out.entropy.dtype)
            stats = torch.stack([(out.entropy * eff).sum(), eff.sum()])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                entropy = (total[0] / total[1].clamp(min=1.0)).item()
                a = self.args
                if entropy <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    @torch.no_grad()
    def _high_entropy_mask(self, hidden, weight, bias, targets, mask) -> torch.Tensor:
        """TRL's top_entropy_quantile mask (its own ``get_high_entropy_mask``: the quantile over every process's
        tokens) from this forward's entropies: one lm_head pass without gradient before the loss, since the
        mask must be known before any token's gradient."""
        entropies = masked_entropy(
            hidden, weight, targets, mask, bias=bias, temperature=self.temperature, impl=self.fastgrpo_impl,
            workspace_bytes=self.fastgrpo_workspace_bytes, **self.fastgrpo_head,
        )  # fmt: skip
        return self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

    @torch.no_grad()
    def _log_loss_metrics(self, mode, logp, entropy, old, ref, advantages, mask, ratio=None) -> None:
        """TRL 1.16's loss metrics, from the detached log-probs the fused op returned."""
        mask = mask.to(logp.dtype)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        log_ratio = logp - (logp if old is None else old)
        spec = loss_spec(self.loss_type)
        row_weight = None
        if spec.row_weight is not None:  # VESPO's phi, from the token-level log ratio and the sampling correction
            live = mask.bool()
            adv = advantages.float() if advantages.shape[1] == 1 else torch.where(live, advantages.float(), 0.0)
            ratio = None if ratio is None else ratio.float()
            row_weight = spec.row_weight(log_ratio.float(), live, ratio, adv, self.fastgrpo_loss.params)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef = torch.exp(log_ratio)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            total = self.accelerator.reduce(local, reduction="sum")
            return (total[0] / total[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            kl = torch.exp(ref - logp) - (ref - logp) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * coef
            metrics["kl"].append(global_masked_mean(kl))
        metrics["entropy"].append(global_masked_mean(entropy))
        if row_weight is not None:
            metrics[spec.row_weight_metric].append(global_masked_mean(row_weight))
        if spec.clipped:
            if self.args.delta is not None:  # TRL counts clipping on the delta-capped ratio
                coef = coef.clamp(max=self.args.delta)
            low = ((coef < 1 - self.epsilon_low) & (advantages < 0)).float()
            high = ((coef > 1 + self.epsilon_high) & (advantages > 0)).float()
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
        elif spec.clip_metric is not None:
            clipped = ((coef > self.epsilon_high) & (advantages > 0)).float()
            metrics[spec.clip_metric].append(global_masked_mean(clipped))
