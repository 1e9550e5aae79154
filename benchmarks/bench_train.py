"""``fastgrpo bench train``: one ``fastgrpo train`` update step at long completion lengths, peak memory and tokens/s.

A model of a real architecture's shape is built from its config with random weights (no download:
memory and speed do not depend on the values), G synthetic rollouts per step with completion lengths
spread over [L/4, L] (one of them L), and ``fastgrpo.train.update.Updater`` runs the same micro-batching,
packing, checkpointing, LoRA and fused loss as ``fastgrpo train``. Each ``--lengths`` value is run
twice and the second step is measured (the first compiles kernels and allocates optimizer state).
Next to each measured peak is the memory plan's prediction for that row's completion length
(``fastgrpo.train.memory.memory_plan``, the plan ``fastgrpo train`` prints), so the plan gets checked.

    fastgrpo bench train --model qwen2.5-1.5b --lengths 1024 4096 16384 32768 --find-max
    fastgrpo bench train --model qwen2.5-7b --use-peft --lengths 16384 65536 --find-max --time-budget 420
    fastgrpo bench train --model qwen2.5-1.5b --rows 1 --lengths 4096 16384 --find-max --trl-contrast
    fastgrpo bench train --quick          # CPU: tiny model, proves the script works
    (or ``python benchmarks/bench_train.py ...``)

Peak memory is ``torch.cuda.max_memory_allocated`` over the measured step (CUDA, reset before it)
or the process's peak RSS (CPU: monotone over the whole run, so only the CUDA figures compare
lengths and modes; the column and the plot say which). Out of memory is a result ("OOM"), not a
crash; any other error is raised. ``--find-max`` starts from the longest ``--lengths`` value that
fit (and the shortest that did not), doubles the length until one runs out of memory, then
bisects to ``--granularity`` tokens. Each probe is ONE update step, measured: the updater is
already warm from the ``--lengths`` steps (if none fit, the first probe runs a warm step first).

On CUDA, ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` is set unless the user set
``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF``: segments that grow in place waste less
memory to fragmentation when every step allocates differently sized tensors, so lengths near the
limit fit (and OOM probes leave less behind). The setting in effect is a column of every row.

The plan: ``plan_peak_gb`` is the plan's ``peak_gb`` (the larger of its update and sampling phases),
``plan_update_gb`` its update phase (``total_gb``), the only phase this benchmark runs, and
``plan_vs_measured`` = ``plan_update_gb`` / measured peak, on CUDA only (None on CPU, where the
measured figure is the process's RSS, not the tensors the plan counts). The plan is arithmetic on
the config at the row's length: no step runs for it.

``--trl-contrast``: after fastgrpo's rows, stock ``trl.GRPOTrainer``'s update step (``trainer`` "trl")
at the same ``--lengths`` on the same synthetic rollouts (model preset, G, prompt and completion
lengths, dtype; ``--rows`` rows per micro-batch with G / rows accumulation steps; LoRA of the same
rank and target modules with ``--use-peft``), and with ``--find-max`` its longest length that fits
(the same search). No generation: the rollouts become the dict TRL's
``_generate_and_score_completions`` returns (micro-batches padded to the batch's longest completion,
as TRL pads them), then TRL's ``training_step`` per micro-batch, gradient clipping and the
optimizer step, as ``Trainer`` runs them; with ``--beta`` > 0 the step also runs TRL's reference
log-prob pass (adapters off), as fastgrpo's step does. The loss settings are fastgrpo's rows' (dapo,
clip 0.2/0.28, no KL bias correction: TRL 1.16's default would change the KL gradient), so on the same
weights both compute the same gradient (tested); TRL's own defaults otherwise: gradient checkpointing
on, its default AdamW, no offloading, ``--trl-attn`` attention (sdpa). Its rows carry
no plan (the plan models fastgrpo's update). Without trl installed they say "missing: trl not
installed (pip install 'fastgrpo[trl]')", and a line on stderr says so before the first model is built.

Output (see ``_common``): the Markdown table on stdout; one row per (trainer, packing mode, length), per
find-max probe (``kind`` "probe") and per find-max result (``kind`` "find-max", ``completion_length``
the longest that fits, ``first_oom`` the shortest that did not) appended to
``<out>/bench_train.jsonl`` and ``.csv`` as soon as it is measured, so a killed run keeps its
rows; at the end ``<out>/<device>/bench_train_<model>[_lora][_packed|_padded].md`` and ``.png``
(``cpu-quick/`` with ``--quick``; the packing suffix only with ``--packing on|off``).
``--time-budget S``: no length or probe is started once S seconds have passed, nor when the
nearest step measured so far, scaled by the square of the token ratio (attention grows
quadratically), says it would end past S; such rows say "skipped: time budget" (with the
predicted seconds), a find-max cut short says "stopped: time budget" (its length a lower bound),
and the run still writes its table and plot. A step already running is not stopped: leave room
for the longest one.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks._models import MODELS, dataset, reward_even_words, tokenizer

from fastgrpo.integrations import TRL_INSTALL, trl_missing
from fastgrpo.ops import GRPOLossParams
from fastgrpo.train.config import build_config
from fastgrpo.train.memory import format_plan, memory_plan
from fastgrpo.train.modeling import lora_config, prepare_model
from fastgrpo.train.rollouts import Batch, Rollouts
from fastgrpo.train.tracking import peak_memory_gb
from fastgrpo.train.update import Updater, UpdateSettings, resolve_kahan_summation

NAME = "bench_train"
SKIPPED = "skipped: time budget"
TRL_MISSING = f"missing: trl not installed ({TRL_INSTALL})"
# Both trainers' loss settings (beta: --beta). The KL bias correction is pinned: TRL 1.16 turns it on by default,
# fastgrpo does not, and it changes the gradient (not the loss) whenever beta > 0.
LOSS = dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, use_bias_correction_kl=False)
ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
EXPANDABLE = "expandable_segments:True"
_clock = time.perf_counter  # step times and the time budget (tests replace it)

# Defaults of the options that --quick changes: (full run, --quick).
DEFAULTS = dict(
    model=("qwen2.5-1.5b", "tiny"),
    lengths=([1024, 4096, 16384, 32768, 65536], [64, 160]),
    G=(8, 4),
    prompt_len=(256, 16),
    granularity=(1024, 64),
    max_length=(262144, 256),
)

CSV_FIELDS = [
    "kind", "packing", "completion_length", "tokens", "micro_batches", "peak_gib", "step_s", "tokens_per_s",
    "status", "steps", "first_oom", "probes", "predicted_s", "peak_memory", "trainable_parameters", "parameters",
    "trainer", "plan_peak_gb", "plan_update_gb", "plan_vs_measured",
]  # fmt: skip


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def trl_available() -> bool:
    return trl_missing() is None


def use_expandable_segments() -> str:
    """Turn on the CUDA allocator's expandable segments unless the user configured the allocator;
    returns the configuration in effect. Call before the first CUDA allocation (``environment()``
    already initializes CUDA); if CUDA is initialized already, the allocator is told directly."""
    for var in ALLOC_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    os.environ[ALLOC_VARS[0]] = EXPANDABLE
    if torch.cuda.is_initialized():  # too late for the variable: a caller used CUDA before main()
        try:
            setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9
            (setter or torch.cuda.memory._set_allocator_settings)(EXPANDABLE)
        except (AttributeError, RuntimeError) as e:
            print(f"note: could not enable {EXPANDABLE} after CUDA initialization: {e}", file=sys.stderr)
            return f"unset (CUDA was initialized first: {type(e).__name__})"
    return f"{ALLOC_VARS[0]}={EXPANDABLE}"


def build_model(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    import transformers

    from fastgrpo.train.attention import register

    register()
    cfg = transformers.Qwen2Config(**MODELS[name], max_position_embeddings=262144, rope_theta=1e6)
    torch.manual_seed(0)
    with device:
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)


def completion_lengths(G: int, length: int, seed: int) -> tuple[torch.Generator, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (G,), generator=g)
    lengths[0] = length
    return g, lengths


def token_count(args, length: int) -> int:
    """Prompt plus completion tokens of the synthetic batch at ``length`` (without building it)."""
    return args.G * args.prompt_len + int(completion_lengths(args.G, length, args.seed)[1].sum())


def synthetic_batch(G: int, prompt_len: int, length: int, vocab: int, device, seed: int) -> Batch:
    """G rollouts: prompts of ``prompt_len`` tokens, completion lengths uniform in [L/4, L], the first L."""
    g, lengths = completion_lengths(G, length, seed)
    completion_mask = torch.arange(length)[None] < lengths[:, None]
    rollouts = Rollouts(
        torch.randint(0, vocab, (G, prompt_len), generator=g),
        torch.ones(G, prompt_len, dtype=torch.bool),
        torch.randint(0, vocab, (G, length), generator=g),
        completion_mask,
        lengths == length,
    )
    rollouts = rollouts.map(lambda t: t.to(device))
    advantages = torch.randn(G, generator=g).to(device)
    return Batch(rollouts, completion_mask.to(device), advantages, {})


class Budget(C.Budget):
    """Whether a step may start: ``record(run key, tokens, s)``, the key a packing mode or "trl"."""

    def clock(self) -> float:
        return _clock()

    def predict(self, mode: str, tokens: int) -> float | None:
        """Seconds of one step: the nearest measured step below scaled by the token ratio squared, else
        the nearest above scaled linearly; this key's steps if any, else any key's. None: nothing yet."""
        steps = self.measured.get(mode) or [m for ms in self.measured.values() for m in ms]
        below = [m for m in steps if m[0] <= tokens]
        if below:
            t, s = max(below)
            return s * (tokens / t) ** 2
        if steps:
            t, s = min(steps)
            return s * tokens / t
        return None


def bench_config(args, packed: bool, length: int):
    """The ``fastgrpo train`` config the benchmark runs, at completion length ``length``."""
    return build_config((dict(
        model="bench", padding_free=packed, gradient_checkpointing=not args.no_checkpointing,
        offload_activations=args.offload, use_liger_body=args.liger, use_peft=args.use_peft,
        lora_r=args.lora_r, per_device_train_batch_size=args.rows,
        gradient_accumulation_steps=max(1, args.G // args.rows), max_tokens_per_microbatch=args.max_tokens,
        num_generations=args.G, max_completion_length=length, max_prompt_length=args.prompt_len,
        beta=args.beta, learning_rate=1e-6, loss_impl=args.loss_impl,
    ), "bench"))  # fmt: skip


class StepRun:
    """One trainer's model, warmed up across lengths; runs and measures update steps at one length.
    Subclasses say what a step is (``step``) and how gradients are dropped after one (``clear``)."""

    trainer = "fastgrpo"

    def __init__(self, args, device, budget: Budget, mode: str, key: str):
        self.args, self.device, self.budget = args, device, budget
        self.mode, self.key = mode, key  # key: whose measured steps predict this run's (Budget)
        self.warm = False  # a step has completed: kernels compiled, optimizer state allocated
        self.fields: dict = {}  # facts every row of the run carries

    def plan_fields(self, length: int) -> dict:
        return {}

    def step(self, batch: Batch) -> int:
        """One update step over the batch; returns its number of micro-batches."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def run(self, length: int, kind: str, steps: int) -> dict:
        """``steps`` update steps at ``length`` (the last one measured), unless the budget says no."""
        args, device = self.args, self.device
        tokens = token_count(args, length)
        row = dict(trainer=self.trainer, kind=kind, packing=self.mode, completion_length=length, tokens=tokens,
                   **self.fields, **self.plan_fields(length))  # fmt: skip
        predicted = self.budget.predict(self.key, tokens)
        predicted = None if predicted is None else steps * predicted
        if not self.budget.allows(predicted):
            return row | dict(status=SKIPPED, predicted_s=predicted)
        batch = synthetic_batch(args.G, args.prompt_len, length, self.vocab, device, args.seed)
        try:
            for _ in range(steps):  # the last step is measured
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = _clock()
                micro_batches = self.step(batch)
                C.synchronize(device)
                dt = _clock() - t0
                self.warm = True
            row.update(status="ok", steps=steps, step_s=dt, tokens_per_s=tokens / dt, peak_gib=peak_memory_gb(device))
            row.update(micro_batches=micro_batches, plan_vs_measured=plan_ratio(row, device))
            self.budget.record(self.key, tokens, dt)
        except Exception as e:
            if not C.is_oom(e):
                raise
            row.update(status="OOM", steps=steps)
        finally:
            self.clear()
            del batch
            C.free_memory(device)
        return row


def plan_ratio(row: dict, device: torch.device) -> float | None:
    """The plan's update phase over the measured peak; None on CPU, where the peak is the process's RSS."""
    if device.type != "cuda" or row.get("plan_update_gb") is None or not row.get("peak_gib"):
        return None
    return row["plan_update_gb"] / row["peak_gib"]


class ModeRun(StepRun):
    """One packing mode's model and fastgrpo ``Updater``, the code ``fastgrpo train`` runs."""

    def __init__(self, args, device, dtype, packed: bool, budget: Budget):
        mode = "on" if packed else "off"
        super().__init__(args, device, budget, mode=mode, key=mode)
        self.packed = packed
        cfg = bench_config(args, packed, max(args.lengths))
        model = build_model(args.model, dtype, device, args.attn)
        self.model, self.info = prepare_model(model, cfg, device)
        # The optimizer a run resolves to (auto: Kahan summation on 16-bit weights); OOM probes find its limit.
        kahan = resolve_kahan_summation(cfg.kahan_summation, self.model, fits=True)
        self.info = dataclasses.replace(self.info, kahan_summation=kahan)
        self.plan = memory_plan(self.model, cfg, self.info)
        params = GRPOLossParams(beta=args.beta, **LOSS)
        settings = UpdateSettings.from_config(cfg, packed=packed, kahan=kahan)
        # Every measured step at the same learning rate (no schedule runs it down to 0).
        self.updater = Updater(self.model, None, params, dataclasses.replace(settings, lr_scheduler_type="constant"))
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.fields = dict(
            trainable_parameters=self.info.trainable_parameters,
            parameters=self.info.parameters,
            liger_body=self.info.liger_body,
        )

    def plan_fields(self, length: int) -> dict:
        """The plan at this length: its config differs from the run's in ``max_completion_length`` only."""
        plan = memory_plan(self.model, bench_config(self.args, self.packed, length), self.info)
        return dict(plan_peak_gb=plan["peak_gb"], plan_update_gb=plan["total_gb"])

    def step(self, batch: Batch) -> int:
        return int(self.updater.update(batch)["micro_batches"])

    def clear(self) -> None:
        self.updater.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.updater, self.model
        C.free_memory(self.device)


def trl_config(args, out_dir: Path, device: torch.device, dtype: torch.dtype):
    """Stock GRPOConfig but for the bench's shapes and loss: G / rows micro-batches of ``--rows`` per step."""
    import dataclasses

    from trl import GRPOConfig

    extra = {}
    if args.no_checkpointing:  # TRL's default is on; transformers 5 renamed the option
        names = {f.name for f in dataclasses.fields(GRPOConfig)}
        extra["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
    return GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.rows, gradient_accumulation_steps=args.G // args.rows,
        num_generations=args.G, max_completion_length=max(args.lengths), learning_rate=1e-6, beta=args.beta, **LOSS,
        use_cpu=device.type != "cuda", bf16=dtype == torch.bfloat16, report_to="none", save_strategy="no",
        seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, log_completions=False, **extra,
    )  # fmt: skip


def enable_checkpointing(trainer) -> None:
    """The activation checkpointing the trainer's config asks for, turned on as ``Trainer.train()`` does
    before its first step: this benchmark never calls ``train()``."""
    args, model = trainer.args, trainer.model
    on = getattr(args, "activation_checkpointing", None)
    if not (args.gradient_checkpointing if on is None else on):
        return
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs or None
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trl_inputs(batch: Batch) -> dict:
    """The rollouts as TRL's ``_generate_and_score_completions`` returns them. No ``old_per_token_logps``:
    TRL leaves them out when one generation serves one optimizer step, as here."""
    ro = batch.rollouts
    completion_mask = ro.completion_mask.long()
    return dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask.long(), completion_ids=ro.completion_ids,
                completion_mask=completion_mask, advantages=batch.advantages,
                num_items_in_batch=completion_mask.sum())  # fmt: skip


class TRLRun(StepRun):
    """Stock ``trl.GRPOTrainer``'s update step on the same rollouts, without generation (module docstring)."""

    trainer = "trl"

    def __init__(self, args, device, dtype, budget: Budget):
        super().__init__(args, device, budget, mode="off", key="trl")  # TRL pads every micro-batch
        import trl

        self.work = tempfile.TemporaryDirectory(prefix="fastgrpo-bench-train-trl-")
        model = build_model(args.model, dtype, device, args.trl_attn)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        peft_config = lora_config(bench_config(args, False, max(args.lengths))) if args.use_peft else None
        self.trl = trl.GRPOTrainer(
            model=model, reward_funcs=[reward_even_words], args=trl_config(args, Path(self.work.name), device, dtype),
            train_dataset=dataset(args, self.vocab, args.G), processing_class=tokenizer(self.vocab),
            peft_config=peft_config,
        )  # fmt: skip
        enable_checkpointing(self.trl)
        self.trl.create_optimizer()
        self.trl._prepare_inputs = lambda inputs: inputs  # the inputs are prepared rollouts: no generation
        params = list(self.trl.model.parameters())
        self.fields = dict(
            trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
            parameters=sum(p.numel() for p in params),
        )

    def ref_logps(self, inputs: dict) -> torch.Tensor:
        """TRL's reference pass in ``_generate_and_score_completions`` (beta > 0 needs LoRA here: adapters off)."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        t = self.trl
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        off = disable_gradient_checkpointing(t.model, t.args.gradient_checkpointing_kwargs)
        with torch.no_grad(), off, use_adapter(t.model, adapter_name=None):
            logps, _, _ = t._get_per_token_logps_and_entropies(
                t.model, ids, mask, inputs["completion_ids"].size(1), batch_size=self.args.rows
            )
        return logps

    def step(self, batch: Batch) -> int:
        """What ``Trainer`` runs per optimizer step: ``training_step`` per micro-batch, clip, step, zero."""
        from trl.trainer.utils import split_tensor_dict

        t, model = self.trl, self.trl.model
        inputs = trl_inputs(batch)
        if t.beta != 0.0:
            inputs["ref_per_token_logps"] = self.ref_logps(inputs)
        micro = split_tensor_dict(inputs, t.args.gradient_accumulation_steps)  # as TRL's _prepare_inputs splits
        t.current_gradient_accumulation_steps = len(micro)
        for mb in micro:
            t.training_step(model, mb, None)  # None: GRPO batches carry no labels to count
        if t.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.args.max_grad_norm)
        t.optimizer.step()
        model.zero_grad()
        return len(micro)

    def clear(self) -> None:
        self.trl.model.zero_grad(set_to_none=True)

    def close(self) -> None:
        del self.trl
        self.work.cleanup()
        C.free_memory(self.device)


def find_max(run: StepRun, length_rows: list[dict], emit) -> dict:
    """Longest completion length that fits, to ``--granularity`` tokens; every probe is a row."""
    args, g = run.args, run.args.granularity
    lo = max((r["completion_length"] for r in length_rows if r["status"] == "ok"), default=0)
    hi = min((r["completion_length"] for r in length_rows if r["status"] == "OOM" and r["completion_length"] > lo),
             default=None)  # fmt: skip
    probes, stopped = 0, False

    def probe(length: int) -> bool | None:
        nonlocal probes, stopped
        row = emit(run.run(length, "probe", steps=1 if run.warm else 2))
        if row["status"] == SKIPPED:
            stopped = True
            return None
        probes += 1
        return row["status"] == "ok"

    length = max(g, 2 * lo) if lo else g
    while hi is None and length <= args.max_length:
        fits = probe(length)
        if fits is None:
            break
        if fits:
            lo, length = length, 2 * length
        else:
            hi = length
    bound = hi or args.max_length + g
    while not stopped and bound - lo > g:
        mid = (lo + bound) // 2 // g * g
        if mid in (lo, bound):
            break
        fits = probe(mid)
        if fits is None:
            break
        if fits:
            lo = mid
        else:
            hi = bound = mid
    status = ("stopped: time budget" if lo else SKIPPED) if stopped else ("ok" if lo else "none fits")
    return dict(trainer=run.trainer, kind="find-max", packing=run.mode, completion_length=lo or None, first_oom=hi,
                probes=probes, status=status, **run.fields)  # fmt: skip


def bench_rows(args, make_run, trainer: str, mode: str, budget: Budget, emit, unavailable: str | None = None):
    """One trainer's ``--lengths`` rows, then its find-max row. Where ``unavailable`` (the rows' status) or
    the budget is spent, rows without a step and no model built. Returns the (closed) run, or None."""
    status = unavailable or (None if budget.allows() else SKIPPED)
    if status:
        for n in args.lengths:
            emit(dict(trainer=trainer, kind="length", packing=mode, completion_length=n, tokens=token_count(args, n),
                      status=status))  # fmt: skip
        if args.find_max:
            emit(dict(trainer=trainer, kind="find-max", packing=mode, completion_length=None, status=status))
        return None
    print(f"{trainer}, packing {mode}: building {args.model} ...", file=sys.stderr, flush=True)
    run = make_run()
    try:
        rows = [emit(run.run(n, "length", steps=2)) for n in args.lengths]
        if args.find_max:
            emit(find_max(run, rows, emit))
        return run
    finally:
        run.close()


def bench_mode(args, device, dtype, packed: bool, budget: Budget, emit) -> dict | None:
    """fastgrpo's rows of one packing mode; the mode's model facts."""
    mode = "on" if packed else "off"
    run = bench_rows(args, lambda: ModeRun(args, device, dtype, packed, budget), "fastgrpo", mode, budget, emit)
    return None if run is None else dict(packing=mode, info=run.info, plan=run.plan)


def bench_trl(args, device, dtype, budget: Budget, emit) -> None:
    """Stock TRL's rows (``--trl-contrast``)."""
    missing = None if trl_available() else TRL_MISSING
    bench_rows(args, lambda: TRLRun(args, device, dtype, budget), "trl", "off", budget, emit, missing)


def plot(rows: list[dict], path: Path, device: torch.device, meta: dict) -> Path | None:
    mem, speed = {}, {}
    for r in rows:
        if r["status"] != "ok" or r["kind"] not in ("length", "probe"):
            continue
        label = f"{r['trainer']}, packing {r['packing']}" + (" (find-max probes)" if r["kind"] == "probe" else "")
        mem.setdefault(label, []).append((r["completion_length"], r["peak_gib"]))
        speed.setdefault(label, []).append((r["completion_length"], r["tokens_per_s"]))
        if device.type == "cuda" and r.get("plan_update_gb") is not None:  # CPU: RSS and plan are not comparable
            mem.setdefault(f"plan (update), packing {r['packing']}", []).append(
                (r["completion_length"], r["plan_update_gb"])
            )
    if not mem:
        return None
    what = "peak allocated" if device.type == "cuda" else "process peak RSS, monotone over the run"
    panels = [
        dict(title="peak memory (GiB) vs completion length", xlabel="completion length L", ylabel=f"GiB ({what})",
             series=mem),
        dict(title="tokens/s vs completion length", xlabel="completion length L", ylabel="tokens/s", series=speed),
    ]  # fmt: skip
    peft = f", LoRA r={meta['lora_r']}" if meta["use_peft"] else ""
    title = (
        f"update step, {meta['model']}{peft}, G={meta['G']}, {meta['dtype']} on {meta['device']} "
        f"({meta['git_commit'][:10]})"
    )
    return C.line_plots(path, panels, title)


def parse_args(argv):
    p = C.parser("fastgrpo bench train", __doc__)
    default = functools.partial(C.default_help, DEFAULTS)

    p.add_argument("--model", choices=sorted(MODELS), help=default("model"))
    p.add_argument("--lengths", type=int, nargs="+", help="completion lengths L; " + default("lengths"))
    p.add_argument("--G", type=int, help="completions per step (one group); " + default("G"))
    p.add_argument("--prompt-len", type=int, help=default("prompt_len"))
    p.add_argument("--rows", type=int, default=2, help="sequences per micro-batch (per_device_train_batch_size)")
    p.add_argument("--max-tokens", type=int, help="max_tokens_per_microbatch (overrides --rows grouping)")
    p.add_argument("--packing", choices=["on", "off", "both"], default="both")
    p.add_argument("--use-peft", action="store_true", help="LoRA (r=--lora-r, all linear layers), frozen head")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--offload", action="store_true", help="offload_activations")
    p.add_argument("--liger", choices=["auto", "true", "false"], default="auto", help="use_liger_body")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (LoRA reference = adapters off)")
    p.add_argument("--attn", default="sdpa_varlen", help="attn_implementation")
    p.add_argument("--loss-impl", default="auto")
    p.add_argument("--find-max", action="store_true", help="also find the longest completion length that fits")
    p.add_argument("--max-length", type=int, help="--find-max stops here; " + default("max_length"))
    p.add_argument("--granularity", type=int, help="--find-max resolution in tokens; " + default("granularity"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="seconds; lengths and probes past it are skipped (rows say so)")
    p.add_argument(
        "--trl-contrast", action="store_true", help="also stock trl.GRPOTrainer's update step (no generation)"
    )
    p.add_argument("--trl-attn", default="sdpa", help="attn_implementation of the --trl-contrast model")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, lengths 64 and 160, G=4")
    p.add_argument("--out", type=Path, help=C.OUT_HELP)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or C.default_out_dir()  # resolved against the working directory now
    C.fill_defaults(args, DEFAULTS)
    for name in ("G", "prompt_len", "rows", "granularity", "max_length", "lora_r"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.lengths) < 1:
        p.error("--lengths must be >= 1")
    if args.beta > 0 and not args.use_peft:
        p.error("--beta > 0 needs --use-peft here (a full-parameter reference copy is not built)")
    if args.use_peft and not peft_available():
        p.error("--use-peft needs peft, which is not installed: pip install 'fastgrpo[lora]'")
    if args.trl_contrast and (args.G < 2 or args.G % args.rows):
        # TRL's generation batch is rows x accumulation steps, a whole number of groups of G (G >= 2)
        p.error("--trl-contrast needs --G >= 2 and a multiple of --rows")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if not args.quick and torch.cuda.is_available() else "cpu")
    alloc_conf = use_expandable_segments() if device.type == "cuda" else None  # before CUDA is initialized
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meta = C.environment(device) | dict(
        model=args.model,
        dtype=str(dtype).removeprefix("torch."),
        G=args.G,
        prompt_len=args.prompt_len,
        rows=args.rows,
        max_tokens=args.max_tokens,
        use_peft=args.use_peft,
        lora_r=args.lora_r if args.use_peft else None,
        offload=args.offload,
        liger=args.liger,
        checkpointing=not args.no_checkpointing,
        beta=args.beta,
        attn=args.attn,
        loss_impl=args.loss_impl,
        seed=args.seed,
        granularity=args.granularity,
        max_length=args.max_length,
        time_budget=args.time_budget,
        quick=args.quick,
        cuda_alloc_conf=alloc_conf,
        trl_contrast=args.trl_contrast,
        trl_attn=args.trl_attn if args.trl_contrast else None,
        args=shlex.join(argv),
    )
    out = args.out or C.default_out_dir()
    run_dir = out / ("cpu-quick" if args.quick else C.slug(meta["device"]))
    suffix = {"both": "", "on": "_packed", "off": "_padded"}[args.packing]  # runs of one mode do not overwrite
    stem = f"{NAME}_{args.model}{'_lora' if args.use_peft else ''}{suffix}"
    peak_what = "cuda max allocated" if device.type == "cuda" else "process peak RSS"
    print(f"# update step, {args.model} on {meta['device']}, commit {meta['git_commit']}", flush=True)

    rows: list[dict] = []

    def emit(row: dict) -> dict:  # as each row lands: a killed run keeps its rows
        if row.get("peak_gib") is not None:
            row["peak_memory"] = peak_what
        rows.append(row)
        C.append_rows(out, NAME, [row], meta, CSV_FIELDS)
        timing = f", {row['step_s']:.3f} s, {row['peak_gib']:.2f} GiB" if row.get("step_s") is not None else ""
        print(f"{row['trainer']} packing {row['packing']} {row['kind']} L={row['completion_length']}: "
              f"{row['status']}{timing}", file=sys.stderr, flush=True)  # fmt: skip
        return row

    if args.trl_contrast and not trl_available():  # said before fastgrpo's rows, not after them
        print(f"trl contrast: {TRL_MISSING}; the trl rows will say so", file=sys.stderr)
    budget = Budget(args.time_budget)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.packing]
    facts = [bench_mode(args, device, dtype, packed, budget, emit) for packed in modes]
    if args.trl_contrast:
        bench_trl(args, device, dtype, budget, emit)

    peak_header = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    columns = [
        ("trainer", "trainer", "{}"), ("packing", "packing", "{}"), ("kind", "kind", "{}"),
        ("completion_length", "completion L", "{}"), ("tokens", "tokens", "{}"),
        ("micro_batches", "micro-batches", "{}"), ("peak_gib", peak_header, "{:.2f}"),
        ("plan_peak_gb", "plan GiB", "{:.2f}"), ("plan_vs_measured", "plan/measured", "{:.2f}"),
        ("step_s", "step s", "{:.3f}"), ("tokens_per_s", "tokens/s", "{:.0f}"), ("status", "status", "{}"),
        ("first_oom", "first OOM", "{}"), ("predicted_s", "predicted s", "{:.0f}"),
    ]  # fmt: skip
    table = C.markdown_table(rows, columns)
    print(table)
    notes = [
        f"Peak memory: {peak_what}. find-max rows: completion L = longest that fits (a lower bound when stopped "
        "by the time budget), first OOM = shortest that did not ('-': none up to --max-length); probes are one "
        "measured step each.",
        "plan GiB: the memory plan's peak at the row's completion length (fastgrpo rows); plan/measured: its "
        "update phase over the measured peak (CUDA only: the CPU figure is the process's RSS). Where the plan's "
        "peak is its sampling phase (not run here), plan_update_gb in the .jsonl/.csv is the update's.",
    ]
    if args.trl_contrast:
        notes.append(
            "trl rows: stock trl.GRPOTrainer, no generation: the same rollouts as TRL's prepared inputs, "
            f"training_step per micro-batch of {args.rows} (padded to the batch's longest completion), gradient "
            f"clipping and its default optimizer's step; attention {args.trl_attn}, TRL's default checkpointing"
            + (", plus its reference log-prob pass (beta > 0)" if args.beta > 0 else "")
            + ". No plan: the plan models fastgrpo's update."
        )
    for f in filter(None, facts):
        info = f["info"]
        liger = ", ".join(info.liger_body) or "none"
        notes.append(
            f"packing {f['packing']}: {info.parameters:,} parameters ({info.trainable_parameters:,} "
            f"trainable), Liger body: {liger}; {format_plan(f['plan'])} (L = {max(args.lengths)})"
        )
    title = f"Update step: {args.model}{' LoRA' if args.use_peft else ''}, G={args.G}, {meta['dtype']}"
    path = C.write_run(run_dir, stem, title, meta, table + "\n\n" + "\n\n".join(notes))
    print(f"appended {len(rows)} rows to {out / NAME}.jsonl/.csv; wrote {path}", file=sys.stderr)
    if not args.no_plot:
        png = plot(rows, run_dir / f"{stem}.png", device, meta)
        print(f"wrote {png}" if png else "no plot: no step was measured", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
