"""``fastgrpo train``: sample -> score -> update (DeepSeekMath Algorithm 1 with DAPO's additions).

One *step* is one generation batch (``per_device_train_batch_size * gradient_accumulation_steps``
completions, ``num_generations`` per prompt) followed by ``num_iterations`` optimizer updates
over it. The loss always goes through ``fastgrpo.fused_grpo_loss`` on backbone hidden states.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..ops import GRPOLossParams, head_transform
from . import checkpoint as ckpt
from .advantages import compute_advantages, process_advantages, zero_std_groups
from .config import Config, save_yaml
from .data import PromptSampler, format_prompt, load_prompt_dataset
from .hub import check_hub_sources
from .memory import format_plan, memory_plan
from .modeling import build_models, check_checkpoint_kind, resolve_device, resolve_dtype
from .resume import apply_optimizer_settings, changed_settings, check_resume_settings
from .rewards import RewardFunctionError, RewardScorer, build_reward_functions
from .rollouts import Batch, Rollouts
from .run_dir import RunDir
from .sampling import SamplingParams, build_generator, check_backend, completion_texts
from .tracking import (
    METRICS_FILE,
    NO_SIGNAL_SHARE,
    NO_SIGNAL_STEPS,
    PLOT_FILE,
    MetricsLog,
    PhaseTimes,
    log_line,
    no_signal_text,
    peak_memory_gb,
    plot_run,
    read_metrics,
    summary_line,
)
from .update import NonFiniteUpdate, Updater, UpdateSettings, has_16bit_trainable, resolve_kahan_summation


class RunStopped(RuntimeError):
    """A failure mid-run that says what happened and what was kept; the command line prints it, exit 1."""


class NonFiniteLossError(RunStopped):
    pass


class CheckpointSaveError(RunStopped):
    pass


class GRPOTrainer:
    """The loop over one output folder, which it holds (``run_dir``) until ``train`` ends or ``close``.

    ``owner``: a name the folder is marked with; a fresh run may replace an earlier run only in a folder
    carrying the same mark (the embedded default's demo folder), or with ``overwrite_output_dir``.
    """

    def __init__(self, cfg: Config, title: str | None = None, owner: str | None = None):
        self.cfg = cfg
        self.title = title or f"fastgrpo train: {cfg.model.model}"
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        # Cheap checks first: hub names, data columns and reward functions fail before any model loads.
        check_hub_sources(cfg)  # an unreachable hub: one line now, not minutes of retries
        self.dataset = load_prompt_dataset(
            cfg.dataset, cfg.dataset_split, cfg.prompt_column, cfg.answer_column, cfg.dataset_config
        )
        funcs = build_reward_functions(
            cfg.reward_funcs,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            overlong_buffer=cfg.overlong_buffer,
            overlong_penalty_factor=cfg.overlong_penalty_factor,
            device=str(self.device),
        )
        self.scorer = RewardScorer(funcs, cfg.reward_weights)
        self._preflight_rewards()
        # e.g. vllm not installed: before loading
        backend = check_backend(cfg.generation_backend, self.device, cfg.max_completion_length, cfg.model.model)
        self.run_dir = RunDir(self.out, owner=owner)  # made, writable, locked: one writer per folder
        print(f"output folder: {self.out.resolve()}", flush=True)
        try:
            self._build(cfg, dtype, backend)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: Config, dtype: torch.dtype, backend: str) -> None:
        self.prompts_per_step = cfg.generation_batch_size_total() // cfg.num_generations
        self.sampler = PromptSampler(len(self.dataset), cfg.seed, cfg.shuffle_dataset)
        self.run_dir.recover_and_clean()
        self.resume_path, state, changes = self._check_resume()  # before the model: a refusal costs no load
        self.model, self.ref_model, self.tokenizer, self.model_info = build_models(cfg, self.device, dtype,
                                                                                   self.resume_path)  # fmt: skip
        # Only once the model has loaded: a mistyped --model must not have cost the earlier run anything.
        if self.resume_path is None:
            gone = self.run_dir.start_fresh()
            if gone:
                print(f"overwrite_output_dir: removed the earlier run's {', '.join(gone)}", flush=True)
        elif self.run_dir._inside(self.resume_path):
            self.run_dir.rewind_to(int(state["step"]))
        else:
            self.run_dir.start_fresh()  # a checkpoint from elsewhere; resolve_resume allowed replacing
        # The resolved padding_free / Liger body live in model_info: config.yaml keeps what was asked
        # (auto), so a GPU run's checkpoint resumes on a CPU, where auto resolves the other way.
        self.generator = build_generator(backend, self.model, self.tokenizer, cfg)
        self.model_info = dataclasses.replace(self.model_info, generation_backend=backend)
        self.sampling = SamplingParams(
            cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k,
            cfg.repetition_penalty, cfg.generation_batch_size,
        )  # fmt: skip
        # The loss settings of the config, and the model's logit scale and softcap (Gemma 2, Cohere, Granite).
        self.params = dataclasses.replace(GRPOLossParams.from_config(cfg), **head_transform(self.model))
        self.max_steps = cfg.max_steps
        if self.max_steps == -1:
            self.max_steps = max(1, math.ceil(cfg.num_train_epochs * len(self.dataset) / self.prompts_per_step))
        kahan = resolve_kahan_summation(cfg.kahan_summation, self.model, fits=self._fits())
        self.model_info = dataclasses.replace(self.model_info, kahan_summation=kahan)
        settings = UpdateSettings.from_config(
            cfg, packed=self.model_info.padding_free, kahan=kahan, backend=backend,
            total_updates=self.max_steps * cfg.num_iterations,
        )  # fmt: skip
        self.updater = Updater(self.model, self.ref_model, self.params, settings)
        self.optimizer, self.scheduler = self.updater.optimizer, self.updater.scheduler
        self.memory_plan = memory_plan(self.model, cfg, self.model_info, self.ref_model)
        print(optimizer_line(self.model, kahan, cfg.kahan_summation), flush=True)
        if self.device.type == "cuda":
            print(format_plan(self.memory_plan, self.model_info), flush=True)
        self.step, self.num_tokens = 0, 0
        self.times = PhaseTimes(self.device)  # a fresh one per step in train()
        if self.resume_path is not None:
            self._load_state(state)
            apply_optimizer_settings(self.optimizer, self.scheduler, cfg, changes)
        save_yaml(cfg, self.out / "config.yaml")
        self.log = MetricsLog(self.out, resume_step=self.step if self.resume_path else None)

    def _check_resume(self) -> tuple[Path | None, dict[str, Any] | None, dict[str, tuple[Any, Any]]]:
        """(checkpoint, its trainer state, changed settings) for a resume, checked before any model loads:
        the state loads (weights_only), the settings can apply and the prompt position fits the dataset.
        A fresh run checks that it replaces no earlier run unless asked to."""
        cfg = self.cfg
        if not cfg.resume_from_checkpoint:
            self.run_dir.check_fresh_start(cfg.overwrite_output_dir)
            return None, None, {}
        path = self.run_dir.resolve_resume(cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        check_checkpoint_kind(path, cfg.use_peft)
        state = ckpt.load_trainer_state(path)
        changes = changed_settings(ckpt.load_saved_config(path), cfg)
        line = check_resume_settings(changes, cfg, str(path))
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ValueError(f"resume_from_checkpoint {str(path)!r}: {e}") from None
        print(f"resuming from {path} (step {int(state['step'])})", flush=True)
        if line:
            print(line, flush=True)
        return path, state, changes

    def close(self) -> None:
        """Let go of the output folder (``train`` does it when it ends)."""
        self.run_dir.close()

    def _fits(self) -> bool:
        """The memory plan with Kahan summation's buffer within the device's memory (always, off CUDA)."""
        if self.device.type != "cuda":
            return True
        plan = memory_plan(
            self.model, self.cfg, dataclasses.replace(self.model_info, kahan_summation=True), self.ref_model
        )
        return plan["peak_gb"] * 2**30 <= torch.cuda.get_device_properties(self.device).total_memory

    def _preflight_rewards(self) -> None:
        """Call every reward function once on the first prompt with a one-token placeholder completion, so one
        that raises or returns the wrong number of values fails before any model is loaded."""
        G = self.cfg.num_generations
        rows = self.dataset[:1]  # column -> list of one value
        try:
            self._score(rows, ["0"] * G, [[0] for _ in range(G)], [False] * G)
        except RuntimeError as e:
            raise ValueError(f"{e} (on a placeholder completion, before training)") from e

    def _score(self, rows: dict[str, list], completions: list[str], ids: list[list[int]], truncated: list[bool]):
        """Reward G completions per dataset row: every column repeated per completion, plus
        ``answer``, ``completion_ids`` and ``truncated``; conversational prompts get message-list
        completions, as TRL passes them."""
        cfg, G = self.cfg, self.cfg.num_generations
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in rows.items()}
        if cfg.answer_column is not None:
            columns["answer"] = columns[cfg.answer_column]
        columns["completion_ids"] = ids
        columns["truncated"] = truncated
        prompts = columns[cfg.prompt_column]
        if prompts and not isinstance(prompts[0], str):
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        return self.scorer(prompts, completions, columns)

    # ---- sample and score -------------------------------------------------------------------

    def _sample_round(self, n_prompts: int) -> dict[str, Any]:
        cfg = self.cfg
        rows = self.dataset[self.sampler.take(n_prompts)]  # column -> list
        texts = [format_prompt(self.tokenizer, p, cfg.system_prompt) for p in rows[cfg.prompt_column]]
        with self.times("sample"):
            ro = self.generator.generate(texts, self.sampling)
        with self.times("score"):
            ids, completions = completion_texts(ro, self.tokenizer, self.generator.eos_token_ids)
            scored = self._score(rows, completions, ids, ro.truncated.tolist())
            no_signal = self._no_signal(scored)
        return {"rollouts": ro, "scored": scored, "no_signal": no_signal}

    def sample_batch(self) -> Batch:
        """Sample, score and (with dynamic sampling) keep only groups whose rewards differ,
        sampling more prompts for at most ``max_resample_rounds`` extra rounds."""
        cfg, G = self.cfg, self.cfg.num_generations
        rounds, kept = [], []
        need = self.prompts_per_step
        for _ in range(1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)):
            r = self._sample_round(need)
            rounds.append(r)
            keep = ~r["no_signal"] if cfg.dynamic_sampling else torch.ones_like(r["no_signal"])
            groups = keep.nonzero().flatten().tolist()[:need]
            kept += [(len(rounds) - 1, g) for g in groups]
            need -= len(groups)
            if need == 0:
                break
        if not kept:  # nothing had signal: train on the last round anyway (only the KL term acts)
            kept = [(len(rounds) - 1, g) for g in range(len(rounds[-1]["scored"].rewards) // G)]
        parts, rewards, steps = [], [], []
        for i, r in enumerate(rounds):
            groups = [g for j, g in kept if j == i]
            if not groups:
                continue
            rows = [g * G + k for g in groups for k in range(G)]
            parts.append(r["rollouts"].select(rows))
            rewards.append(r["scored"].rewards[rows])
            if r["scored"].steps is not None:
                steps += [r["scored"].steps[k] for k in rows]
        ro = Rollouts.cat(parts, self.generator.pad_token_id)
        rewards = torch.cat(rewards)
        adv = compute_advantages(rewards, G, cfg.scale_rewards)
        if steps:
            adv = adv[:, None] + process_advantages(steps, G, ro.completion_ids.shape[1], cfg.scale_rewards)
        loss_mask = ro.completion_mask.clone()
        if cfg.mask_truncated_completions:
            loss_mask &= ~ro.truncated[:, None]
        metrics = self._sample_metrics(rounds, len(kept))
        return Batch(ro, loss_mask, adv.to(self.device), metrics)

    def _no_signal(self, scored) -> torch.Tensor:
        """(groups,) bool: neither the outcome rewards nor the step rewards differ within the group."""
        zero = zero_std_groups(scored.rewards, self.cfg.num_generations)
        if scored.steps is not None:
            totals = torch.tensor([sum(r for _, r in s) for s in scored.steps], dtype=torch.float32)
            zero &= zero_std_groups(totals, self.cfg.num_generations)
        return zero

    def _sample_metrics(self, rounds: list[dict[str, Any]], kept_groups: int) -> dict[str, float]:
        G = self.cfg.num_generations
        rewards = torch.cat([r["scored"].rewards for r in rounds])
        per_func = torch.cat([r["scored"].per_func for r in rounds])
        lengths = torch.cat([r["rollouts"].completion_mask.sum(1) for r in rounds]).float()
        truncated = torch.cat([r["rollouts"].truncated for r in rounds]).float()
        zero = torch.cat([r["no_signal"] for r in rounds])
        valid = rewards[~torch.isnan(rewards)]
        m = {
            "reward": valid.mean().item() if valid.numel() else float("nan"),
            "reward_std": rewards.view(-1, G).nan_to_num().std(1).mean().item(),
            "frac_reward_zero_std": zero.float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": truncated.mean().item(),
            "dynamic_sampling/rounds": len(rounds),
            "dynamic_sampling/dropped_groups": int(zero.sum().item()),
            "dynamic_sampling/kept_groups": kept_groups,
        }
        for i, (name, _) in enumerate(self.scorer.funcs):
            col = per_func[:, i]
            col = col[~torch.isnan(col)]
            m[f"rewards/{name}/mean"] = col.mean().item() if col.numel() else float("nan")
            m[f"rewards/{name}/std"] = col.std().item() if col.numel() > 1 else 0.0
        seq_tokens = sum(int(r["rollouts"].prompt_mask.sum() + r["rollouts"].completion_mask.sum()) for r in rounds)
        m["_tokens"] = seq_tokens
        return m

    def _stop_on(self, e: NonFiniteUpdate) -> NonFiniteLossError:
        """A non-finite loss or gradient stopped the step before the optimizer moved. In the step's first
        iteration the weights are still those of the last good step: save them, with the data order and
        RNG as they were when this step began, so a resume retries the same step."""
        where = f"step {self.step + 1} (iteration {e.iteration}{e.where})"
        if e.iteration == 0:
            path = self.save(snapshot=self._step_start)
            saved = f"saved the last good weights to {path}"
        else:
            saved = f"the weights already changed in this step, so nothing was saved; {self._last_saved()}"
        return NonFiniteLossError(f"{e.what} at {where}; stopped, {saved}")

    def _last_saved(self) -> str:
        found = ckpt.list_checkpoints(self.out)
        return f"the last checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"

    # ---- loop, checkpoints ------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(
            total=self.max_steps, initial=self.step, disable=cfg.disable_tqdm, desc="fastgrpo", dynamic_ncols=True
        )
        first_logged, no_signal = False, 0
        while self.step < self.max_steps:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            self.times = PhaseTimes(self.device)
            self._step_start = self._data_and_rng_state()
            try:
                batch = self.sample_batch()
            except RewardFunctionError as e:  # nothing of this step was saved: the last checkpoint stands
                raise RewardFunctionError(f"step {self.step + 1}: {e}; {self._last_saved()}") from e
            with self.times("sync"):
                self.generator.release()  # KV cache or engine memory back before the update needs it
            try:
                metrics = self.updater.update(batch)  # its own time/logprobs and time/update
            except NonFiniteUpdate as e:
                raise self._stop_on(e) from None
            with self.times("sync"):
                self.generator.update_weights()
            self.step += 1
            metrics |= self.times.metrics()
            dt = time.perf_counter() - t0
            tokens = batch.metrics.pop("_tokens")
            self.num_tokens += tokens
            row = {"step": self.step, **batch.metrics, **metrics, "num_tokens": self.num_tokens,
                   "tokens_per_second": tokens / dt, "step_time": dt,
                   "peak_memory_gb": peak_memory_gb(self.device)}  # fmt: skip
            if not first_logged:  # the estimate next to the measured peak of the first step
                row.update({f"memory/plan_{k}": v for k, v in self.memory_plan.items()})
                first_logged = True
            self.log.write(row)
            if self.step % cfg.logging_steps == 0 or self.step == self.max_steps:
                bar.write(log_line(row, self.max_steps))  # above the bar
            no_signal = no_signal + 1 if (row["frac_reward_zero_std"] or 0.0) > NO_SIGNAL_SHARE else 0
            if no_signal == NO_SIGNAL_STEPS:
                bar.write(f"warning: {no_signal_text(self.step - no_signal + 1, self.step)}")
            bar.set_postfix(
                reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.4f}", len=f"{row['completions/mean_length']:.0f}"
            )
            bar.update(1)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.max_steps:
                self.save()
        bar.close()
        self.save()
        rows = read_metrics(self.out)
        if cfg.plot:
            plot_run(rows, self.out / PLOT_FILE, title=self.title)
        print(summary_line(rows), flush=True)
        print(outputs_line(self.out), flush=True)
        return rows

    def save(self, snapshot: dict[str, Any] | None = None) -> Path:
        """Checkpoint the state after ``self.step`` steps; ``snapshot`` overrides the data order and
        RNG states (used when a step fails after it has started sampling)."""
        import yaml

        snapshot = snapshot or self._data_and_rng_state()
        state = {
            "step": self.step,
            "num_tokens": self.num_tokens,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kahan_summation": self.updater.settings.kahan,
            **snapshot,
        }
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        try:
            path = ckpt.save_checkpoint(self.out, self.step, self.model, self.tokenizer, state, text)
        except OSError as e:  # disk full, quota: the unpublished copy is gone, earlier checkpoints are intact
            raise CheckpointSaveError(
                f"saving {ckpt.PREFIX}{self.step} in {str(self.out)!r} failed: {e.strerror or e}; "
                f"nothing else was changed, {self._last_saved()}"
            ) from e
        ckpt.rotate_checkpoints(self.out, self.cfg.save_total_limit)
        return path

    def _data_and_rng_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "rng": ckpt.rng_state()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.step, self.num_tokens = int(state["step"]), int(state["num_tokens"])
        saved = bool(state.get("kahan_summation", False))  # checkpoints before the option: plain AdamW
        if saved != self.updater.settings.kahan:
            raise ValueError(
                f"resume_from_checkpoint {str(self.resume_path)!r} holds the state of AdamW "
                f"{'with' if saved else 'without'} Kahan summation, but this run resolves kahan_summation to "
                f"{str(self.updater.settings.kahan).lower()}; resume with --kahan_summation {str(saved).lower()}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])


def outputs_line(out: Path) -> str:
    """What a run left in its output folder, printed at its end."""
    names = [name for name in (METRICS_FILE, PLOT_FILE) if (out / name).exists()]
    found = ckpt.list_checkpoints(out)
    if found:
        names.append(f"{Path(found[-1]).name} (the last of {len(found)} kept; --resume_from_checkpoint latest)")
    return f"outputs in {out.resolve()}: {', '.join(names)}"


def optimizer_line(model, kahan: bool, asked: bool | None) -> str:
    """The run's optimizer choice, printed at start."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    weights = f"{'/'.join(dtypes)} trainable weights"
    if kahan:
        return f"optimizer: AdamW with Kahan summation ({weights}; updates below their resolution are kept)"
    low = has_16bit_trainable(model)
    if low and asked is None:
        return f"optimizer: AdamW, no Kahan summation: its buffer does not fit memory ({weights} lose small updates)"
    if low:
        return f"optimizer: AdamW, Kahan summation off ({weights} lose updates below their resolution)"
    return f"optimizer: AdamW ({weights})"
