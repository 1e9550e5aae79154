"""``fastgrpo bench step``: one whole GRPO step, the way each trainer runs it, on the same model, prompts,
completion lengths and seed; wall time split into sample / score / old+ref log-probs / update.

Trainers (``--trainers``, in this order):

- ``fastgrpo``: ``fastgrpo train``'s ``GRPOTrainer`` with its defaults on the device (``--backend``,
  default ``auto``; fused loss ``auto``; packing and checkpointing as ``auto`` resolves them);
- ``trl``: stock ``trl.GRPOTrainer`` (transformers ``generate``, no vLLM) with TRL's defaults;
- ``trl+fastgrpo``: the drop-in ``fastgrpo.integrations.trl.GRPOTrainer``, same config as ``trl``;
- ``vllm``: ``fastgrpo`` with ``generation_backend=vllm``. Its generator asks vLLM for G completions per
  request (``n=G``), which share one ``max_tokens``, so per-row lengths cannot be imposed on it: the row
  says so (or ``missing: vllm not installed``) rather than time a different workload.

The model is a Qwen2 of a real shape (``--model``, ``fastgrpo bench train``'s presets) built from its
config, random weights (bf16 on CUDA, fp32 on CPU), saved once per cap with its tokenizer; every trainer
loads both by path. The tokenizer has one token per printable ASCII character (pad 0, EOS 1; see
``char_tokenizer``); prompts are ``--prompt-len`` random characters, distinct. Every trainer gets the same
batch: ``--prompts`` P prompts x ``--G`` completions per step, in
micro-batches of ``--micro-batch`` rows, gradient accumulation making one optimizer step per generation
batch, ``num_iterations`` 1, ``beta`` 0, data in file order (no shuffle), reward = share of even token ids
(``even_ids``: varies within a group). fastgrpo's dynamic sampling is off (its resampling would generate
tokens the others do not); everything else is each trainer's default (e.g. ``mask_truncated_completions``
is on in fastgrpo, off in TRL).

Two steps run per (cap, trainer): a warm-up step on prompts 0..P-1, every completion ``min(cap, 32)``
tokens (kernels compile, optimizer state and caches are allocated), then the measured step on prompts
P..2P-1 with the long-tailed lengths ``bench generate`` draws (seeded log-normal, median cap/6, clipped to
[cap/32, cap]; the same draw for every trainer). How the lengths are imposed: a completion shorter than
the cap ends with EOS at its imposed length, one at the cap is cut there (truncated):

- transformers ``generate`` (fastgrpo's ``hf`` backend, TRL, the drop-in): the model's ``generate`` is
  wrapped so each call runs ``min_new_tokens = max_new_tokens`` = the longest imposed length among its
  rows (EOS suppressed until then, exactly what a real call costs when its longest row ends there), and
  each row is then cut at its own length, EOS written last. Exact: the trainers train on the very lengths.
- ``graph``: per-row limits (``row_limits``); ``continuous``: per-request limits (``bench generate``'s
  patch of transformers' request state). EOS is written over each shorter row's last token. The random
  model can sample EOS earlier by chance (about 1 in V per token); such a row ends early, and
  ``real_tokens`` counts what was generated.

Timing (the measured step, CUDA synchronized at each boundary): ``wall_s`` is the step; fastgrpo's split
is its own ``time/*`` metrics (``sample``: generation; ``score``: decoding, rewards, advantages;
``logprobs``: old/reference passes; ``update``: forward, backward, optimizer; ``sync``: sampler memory and
weight push). TRL's: ``sample`` its ``_generate``, ``score`` its ``_calculate_rewards``, ``logprobs`` its
``_get_per_token_logps_and_entropies`` calls without gradient inside ``_generate_and_score_completions``,
``update`` its ``training_step`` calls less their ``_prepare_inputs``, plus gradient clipping and the
optimizer step (from the last ``training_step``'s end to ``on_optimizer_step``). ``other_s`` = wall minus
the phases: what no phase covers (data loading, batching, logging). ``tokens_per_s`` = real completion tokens of
the step / wall. Peak memory: CUDA ``max_memory_allocated`` over the measured step (``peak_gib``); CPU the
process RSS above its value before the trainer was built, sampled every 2 ms over the whole run.

    fastgrpo bench step                                          # CUDA: qwen2.5-1.5b, caps 1K and 4K, 16 x G=8
    fastgrpo bench step --caps 4096 --trainers fastgrpo trl --time-budget 300
    fastgrpo bench step --quick                                  # CPU: tiny model, cap 48, under a minute

``--time-budget S``: a (cap, trainer) is not started once S seconds have passed, nor when predicted to
end past S (the same trainer's run at the nearest smaller cap, scaled by the cap ratio to the 1.25th
power); such rows say ``skipped: time budget``. Output (see ``_common``): one row per (cap, trainer)
appended to ``<out>/bench_step.jsonl`` and ``.csv`` as it lands; the table in
``<out>/<device>/bench_step_<model>.md`` and the stacked time split in ``.png`` (``cpu-quick/`` with
``--quick``). Out of memory is a row's status.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks._models import MODELS, qwen2_config, save_model
from fastgrpo.benchmarks.bench_generate import RssPeak, digest, imposed_lengths, per_request_lengths

from fastgrpo.integrations import trl_missing

NAME = "bench_step"
TRAINERS = ("fastgrpo", "trl", "trl+fastgrpo", "vllm")
TRL_TRAINERS = ("trl", "trl+fastgrpo")  # need TRL (an extra): without it their rows say "missing: ..."
PHASES = ("sample", "score", "logprobs", "update", "sync")
SKIPPED = "skipped: time budget"
WARM_LENGTH = 32  # tokens per completion of the warm-up step
EOS, PAD = 1, 0  # bench_trl's tokenizer
REWARD = "fastgrpo.benchmarks.bench_step:even_ids"
SPECIAL = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2
CHARS = [chr(c) for c in range(33, 127)]  # printable ASCII but space: one token each, ids 3..96
# Defaults of the options that --quick changes: (full run, --quick).
DEFAULTS = dict(
    model=("qwen2.5-1.5b", "tiny"),
    caps=([1024, 4096], [48]),
    prompts=(16, 2),
    G=(8, 4),
    prompt_len=(256, 8),
    micro_batch=(4, 4),
    time_budget=(None, None),
)
CSV_FIELDS = [
    "cap", "trainer", "status", "backend", "prompts", "G", "sequences", "micro_batch", "imposed_tokens",
    "real_tokens", "wall_s", *(f"{p}_s" for p in PHASES), "other_s", "tokens_per_s", "tokens_per_s_vs_trl",
    "update_vs_trl", "peak_gib", "peak_vs_trl", "peak_rss_extra_mib", "run_s", "loss", "predicted_s",
    "lengths_digest",
]  # fmt: skip
_clock = time.perf_counter


# ----------------------------------------------------------------------------- model, tokenizer, reward


def char_tokenizer():
    """One token per printable ASCII character (BPE without merges), pad 0, EOS 1, no chat template.

    Saved beside a Qwen2 config, transformers loads any tokenizer as its Qwen2 (byte-level BPE) class, which
    keeps single ASCII characters as they are: every trainer tokenizes the prompts to the same ids. The model's
    vocabulary is far larger; ids past the tokenizer's decode to nothing, so the reward reads the ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def even_ids(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Share of even token ids in each completion: varies within a group, so advantages are not zero."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


# ----------------------------------------------------------------------------- imposed lengths


class Lengths:
    """The G completion lengths imposed on each prompt (keyed by its token ids), handed out in order, and
    the lengths each prompt's completions really got."""

    def __init__(self, table: dict[tuple[int, ...], list[int]]):
        self.pools = {k: list(v) for k, v in table.items()}
        self.got: dict[tuple[int, ...], list[int]] = {}

    def take(self, key: tuple[int, ...]) -> int:
        pool = self.pools.get(key)
        if not pool:
            raise RuntimeError("bench step: a prompt was sampled more than G times, or is not one of the bench's")
        return pool.pop(0)

    def record(self, keys: list[tuple[int, ...]], lengths: list[int]) -> None:
        for k, n in zip(keys, lengths, strict=True):
            self.got.setdefault(k, []).append(int(n))


def row_keys(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask, strict=True)]


def cut_rows(seqs: torch.Tensor, prompt_width: int, want: list[int], cap: int) -> None:
    """In place: row r of (prompt + completion) ``seqs`` keeps ``want[r]`` completion tokens, the last one
    EOS when that is below the cap (a finished completion), padding after."""
    for r, n in enumerate(want):
        if n < cap:
            seqs[r, prompt_width + n - 1] = EOS
        seqs[r, prompt_width + n :] = PAD


def impose_on_generate(model, lengths: Lengths, cap: int) -> None:
    """Wrap ``model.generate`` (an instance attribute, so only this model): each call runs to the longest
    length imposed on its rows, EOS suppressed until then, and each row is cut at its own."""
    original = model.generate

    def generate(*args, input_ids, attention_mask, **kwargs):
        keys = row_keys(input_ids, attention_mask)
        want = [lengths.take(k) for k in keys]
        n = max(want)
        kwargs.pop("max_new_tokens", None), kwargs.pop("min_new_tokens", None)  # the imposed ones replace them
        out = original(*args, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n,
                       min_new_tokens=n, **kwargs)  # fmt: skip
        cut_rows(out if isinstance(out, torch.Tensor) else out.sequences, input_ids.shape[1], want, cap)
        lengths.record(keys, want)
        return out

    model.generate = generate


def end_with_eos(ro, cap: int):
    """Rollouts whose rows shorter than the cap end with EOS (not truncated), as a model stopping there."""
    n = ro.completion_mask.sum(1)
    ids, truncated = ro.completion_ids.clone(), ro.truncated.clone()
    for r in (n < cap).nonzero().flatten().tolist():
        ids[r, int(n[r]) - 1] = EOS
        truncated[r] = False
    return dataclasses.replace(ro, completion_ids=ids, truncated=truncated)


def impose_on_generator(gen, backend: str, lengths: Lengths, cap: int) -> None:
    """Wrap a ``graph`` or ``continuous`` generator's ``generate`` with per-row / per-request limits."""
    original = gen.generate

    def generate(prompts, params):
        ids, mask = gen.tokenize_prompts(prompts)
        keys = row_keys(ids, mask)
        G = params.num_generations
        if backend == "graph":
            ro = original(prompts, params, row_limits=[lengths.take(k) for k in keys for _ in range(G)])
        else:
            groups = {k: [lengths.take(k) for _ in range(G)] for k in keys}
            with per_request_lengths(groups, {}):
                ro = original(prompts, params)
        ro = end_with_eos(ro, cap)
        lengths.record([k for k in keys for _ in range(G)], ro.completion_mask.sum(1).tolist())
        return ro

    gen.generate = generate


# ----------------------------------------------------------------------------- trainers


@dataclasses.dataclass
class Setup:
    """What every trainer of one cap shares."""

    args: argparse.Namespace
    cap: int
    model_dir: Path
    data: Path
    prompts: list[str]
    lengths: dict[tuple[int, ...], list[int]]  # prompt ids -> G lengths (warm-up and measured prompts)
    measured: list[tuple[int, ...]]  # the measured step's prompts
    device: torch.device
    dtype: torch.dtype
    work: Path


def fastgrpo_run(s: Setup, backend: str) -> dict:
    """``fastgrpo train``'s trainer for two steps; the measured step's split from its own metrics."""
    from fastgrpo.train.config import build_config
    from fastgrpo.train.tracking import read_metrics
    from fastgrpo.train.trainer import GRPOTrainer

    a = s.args
    values = dict(
        model=str(s.model_dir), dtype=str(s.dtype).removeprefix("torch."), device=s.device.type,
        dataset=str(s.data), answer_column=None, shuffle_dataset=False, max_prompt_length=None,
        num_generations=a.G, max_completion_length=s.cap, generation_backend=backend, reward_funcs=[REWARD],
        dynamic_sampling=False, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.prompts * a.G // a.micro_batch, max_steps=2, seed=a.seed,
        output_dir=str(s.work / f"fastgrpo-{backend}-{s.cap}"), disable_tqdm=True, plot=False, save_total_limit=1,
    )  # fmt: skip
    cfg = build_config((values, "bench step"))
    lengths = Lengths(s.lengths)
    with contextlib.redirect_stdout(sys.stderr):  # its start lines would interleave with the table
        trainer = GRPOTrainer(cfg)
        try:
            resolved = trainer.model_info.generation_backend
            if resolved == "vllm":
                return dict(status="skipped: per-row lengths cannot be imposed on n=G vLLM requests", backend=resolved)
            if resolved == "hf":
                impose_on_generate(trainer.generator.model, lengths, s.cap)
            else:
                impose_on_generator(trainer.generator, resolved, lengths, s.cap)
            trainer.train()
        finally:
            trainer.close()
    row = read_metrics(Path(cfg.output_dir))[-1]
    out = {f"{p}_s": row.get(f"time/{p}", 0.0) for p in PHASES}
    out.update(backend=resolved, wall_s=row["step_time"], loss=row["loss"], got=lengths.got)
    if s.device.type == "cuda":
        out["peak_gib"] = row["peak_memory_gb"]
    return out


class TRLPhases:
    """Per optimizer step of a ``trl.GRPOTrainer``: its phases' seconds, wall time and CUDA peak."""

    def __init__(self, trainer, device: torch.device):
        from transformers import TrainerCallback

        self.device, self.steps = device, []
        self._in_prepare, self.last_micro_step_end = False, 0.0
        self._wrap(trainer, "_generate", "sample")
        self._wrap(trainer, "_calculate_rewards", "score")
        self._wrap(trainer, "_get_per_token_logps_and_entropies", "logprobs", only=self._scoring)
        self._wrap_training_step(trainer)
        phases = self

        class Callback(TrainerCallback):
            def on_step_begin(self, *a, **kw):
                phases._sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                phases.steps.append(dict.fromkeys(PHASES, 0.0) | dict(t0=_clock()))

            def on_optimizer_step(self, *a, **kw):  # gradient clipping and the optimizer, since the last micro-step
                phases._sync()
                phases.steps[-1]["update"] += _clock() - phases.last_micro_step_end

            def on_step_end(self, *a, **kw):
                phases._sync()
                step = phases.steps[-1]
                step["wall"] = _clock() - step.pop("t0")
                if device.type == "cuda":
                    step["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

        trainer.add_callback(Callback())

    def _sync(self):
        C.synchronize(self.device)

    def _scoring(self) -> bool:
        return self._in_prepare and not torch.is_grad_enabled()

    def _wrap(self, trainer, method: str, phase: str, only=None) -> None:
        original = getattr(trainer, method)

        def timed(*a, **kw):
            if only is not None and not only():
                return original(*a, **kw)
            self._sync()
            t0 = _clock()
            try:
                return original(*a, **kw)
            finally:
                self._sync()
                if self.steps:
                    self.steps[-1][phase] += _clock() - t0

        setattr(trainer, method, timed)

    def _wrap_training_step(self, trainer) -> None:
        """``update`` gets each ``training_step`` less the ``_prepare_inputs`` inside it."""
        step, prepare = trainer.training_step, trainer._prepare_inputs
        spent = [0.0]

        def timed_prepare(*a, **kw):
            self._in_prepare = True
            t0 = _clock()
            try:
                return prepare(*a, **kw)
            finally:
                self._in_prepare = False
                self._sync()
                spent[0] += _clock() - t0

        def timed_step(*a, **kw):
            spent[0] = 0.0
            self._sync()
            t0 = _clock()
            try:
                return step(*a, **kw)
            finally:
                self._sync()
                self.last_micro_step_end = _clock()
                if self.steps:
                    self.steps[-1]["update"] += self.last_micro_step_end - t0 - spent[0]

        trainer._prepare_inputs = timed_prepare
        trainer.training_step = timed_step


def trl_config(s: Setup, out_dir: Path):
    from trl import GRPOConfig

    a, cuda = s.args, s.device.type == "cuda"
    return GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=a.micro_batch, num_generations=a.G,
        gradient_accumulation_steps=a.prompts * a.G // a.micro_batch, max_completion_length=s.cap, max_steps=2,
        shuffle_dataset=False, model_init_kwargs={"dtype": str(s.dtype).removeprefix("torch.")}, use_cpu=not cuda,
        bf16=s.dtype == torch.bfloat16, logging_steps=1, report_to="none", save_strategy="no", seed=a.seed,
        data_seed=a.seed, dataloader_num_workers=0, log_completions=False, disable_tqdm=True,
    )  # fmt: skip


def trl_run(s: Setup, dropin: bool) -> dict:
    """Stock TRL (or the drop-in) for two steps; the measured step's split from ``TRLPhases``."""
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, set_seed

    from fastgrpo.integrations.trl import GRPOTrainer as DropIn

    set_seed(s.args.seed)
    cls = DropIn if dropin else trl.GRPOTrainer
    lengths = Lengths(s.lengths)
    trainer = cls(
        model=str(s.model_dir), reward_funcs=[even_ids],
        args=trl_config(s, s.work / ("trl+fastgrpo" if dropin else "trl") / str(s.cap)),
        train_dataset=Dataset.from_dict({"prompt": s.prompts}),
        processing_class=AutoTokenizer.from_pretrained(s.model_dir),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    phases = TRLPhases(trainer, s.device)
    impose_on_generate(trainer.model, lengths, s.cap)
    try:
        trainer.train()
        step = phases.steps[-1]
        logs = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
    finally:
        del trainer
        gc.collect()
    out = {f"{p}_s": step[p] for p in PHASES}
    out.update(backend="transformers generate", wall_s=step["wall"], loss=logs[-1]["loss"], got=lengths.got,
               peak_gib=step.get("peak_gib"))  # fmt: skip
    return out


def availability(trainer: str) -> str | None:
    """None when ``trainer`` can run here, else its row's status."""
    if trainer in TRL_TRAINERS and (missing := trl_missing()):
        return f"missing: {missing}"
    if trainer == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "missing: vllm not installed"
        return "skipped: per-row lengths cannot be imposed on n=G vLLM requests"
    return None


def run_one(trainer: str, s: Setup) -> dict:
    """One (cap, trainer): the measured step's fields, ``run_s`` (build, both steps, teardown) and the
    real tokens of the measured step."""
    C.free_memory(s.device)
    t0 = _clock()
    with RssPeak() as rss:
        res = fastgrpo_run(s, s.args.backend) if trainer == "fastgrpo" else trl_run(s, trainer == "trl+fastgrpo")
    res["run_s"] = _clock() - t0
    if s.device.type != "cuda":
        res["peak_rss_extra_mib"] = rss.peak / 2**20
    got = res.pop("got", None)
    if got is not None:
        res["real_tokens"] = sum(sum(got.get(k, [])) for k in s.measured)
        res["status"] = "ok"
    return res


# ----------------------------------------------------------------------------- run


class Budget(C.Budget):
    """Whether a (cap, trainer) run may start: ``record(trainer, cap, s)``; one predicted to end exactly at
    the budget still starts."""

    exact_fit = True

    def clock(self) -> float:
        return _clock()

    def predict(self, trainer: str, cap: int) -> float | None:
        """The largest measured cap at most ``cap``, scaled a little faster than the cap."""
        smaller = [(c, s) for c, s in self.measured.get(trainer, []) if c <= cap]
        if not smaller:
            return None
        c, s = max(smaller)
        return s * (cap / c) ** 1.25


def make_setup(args, cap: int, device, dtype, work: Path) -> Setup:
    """The model (saved once per cap: its positions cover prompt + cap), prompts, data file and lengths."""
    from transformers import AutoTokenizer

    model_dir = work / f"model-{cap}"
    if not model_dir.exists():
        save_model(qwen2_config(dict(MODELS[args.model]), args.prompt_len + cap + 8), model_dir, dtype, device)
        char_tokenizer().save_pretrained(model_dir)  # every trainer loads it from the model's folder
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = []  # distinct, as their token ids key the imposed lengths
    gen = torch.Generator().manual_seed(args.seed)
    while len(prompts) < 2 * args.prompts:
        text = "".join(CHARS[i] for i in torch.randint(len(CHARS), (args.prompt_len,), generator=gen).tolist())
        if text not in prompts:
            prompts.append(text)
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    keys = [tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if any(len(k) != args.prompt_len for k in keys):
        raise RuntimeError(f"bench step: the saved tokenizer does not give one token per character ({type(tok)})")
    draw = imposed_lengths(args.prompts * args.G, cap, args.seed)
    G = args.G
    table = {k: [min(cap, WARM_LENGTH)] * G for k in keys[: args.prompts]}
    table |= {k: draw[i * G : (i + 1) * G] for i, k in enumerate(keys[args.prompts :])}
    return Setup(args, cap, model_dir, data, prompts, table, keys[args.prompts :], device, dtype, work)


def vs_trl(row: dict, trl_rows: dict[int, dict]) -> None:
    """The row's ratios to the ok ``trl`` row of its cap (None while there is none): tokens/s, the update
    phase (trl's / this row's, so > 1 is faster), peak."""
    t = trl_rows.get(row["cap"], {})
    row["tokens_per_s_vs_trl"] = C.ratio(row.get("tokens_per_s"), t.get("tokens_per_s"))
    row["update_vs_trl"] = C.ratio(t.get("update_s"), row.get("update_s"))
    row["peak_vs_trl"] = C.ratio(row.get("peak_gib"), t.get("peak_gib"))


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """Stacked bars: each ok (cap, trainer)'s measured step split into its phases."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(ok)), 4.5))
    labels = [f"{r['trainer']}\ncap {r['cap']}" for r in ok]
    bottom = [0.0] * len(ok)
    for phase in (*PHASES, "other"):
        heights = [max(r[f"{phase}_s"], 0.0) for r in ok]
        ax.bar(labels, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("seconds (measured step)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv):
    p = C.parser("fastgrpo bench step", __doc__)
    default = functools.partial(C.default_help, DEFAULTS)

    p.add_argument("--model", choices=sorted(MODELS), help="shape preset (fastgrpo bench train's); " + default("model"))
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS), help="in this order")
    p.add_argument("--caps", type=int, nargs="+", help="max_completion_length values; " + default("caps"))
    p.add_argument("--prompts", type=int, help="prompts P per step; " + default("prompts"))
    p.add_argument("--G", type=int, help="completions per prompt; " + default("G"))
    p.add_argument("--prompt-len", type=int, help="prompt tokens; " + default("prompt_len"))
    p.add_argument("--micro-batch", type=int, help="rows per micro-batch (both trainers); " + default("micro_batch"))
    p.add_argument("--backend", default="auto", help="fastgrpo's generation_backend (default: auto)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--time-budget", type=float, help="seconds; (cap, trainer) runs past it are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, cap 48, 2 prompts x G=4, fp32")
    p.add_argument("--out", type=Path, help=C.OUT_HELP)
    args = p.parse_args(argv)
    args.out = args.out or C.default_out_dir()  # resolved against the working directory now
    C.fill_defaults(args, DEFAULTS)
    for name in ("prompts", "micro_batch", "prompt_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.G < 2:
        p.error("--G must be >= 2 (GRPO needs a group)")
    if min(args.caps) < 2:
        p.error("--caps must be >= 2")
    if len(set(args.trainers)) != len(args.trainers):
        p.error("--trainers: each trainer once")
    if (args.prompts * args.G) % args.micro_batch:
        p.error("--micro-batch must divide --prompts x --G (one optimizer step per generation batch)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if not args.quick and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda and not args.quick:
        print("fastgrpo bench step: no CUDA device, so the full shape runs on the CPU (slow); --quick is the CPU "
              "smoke run", file=sys.stderr)  # fmt: skip
    if (missing := trl_missing()) and (needs := [t for t in args.trainers if t in TRL_TRAINERS]):
        print(f"fastgrpo bench step: {missing}: the {' and '.join(needs)} rows will say so", file=sys.stderr)
    meta = C.environment(device) | dict(
        model=args.model, dtype=str(dtype).removeprefix("torch."), prompt_len=args.prompt_len, seed=args.seed,
        fastgrpo_backend=args.backend, time_budget=args.time_budget, quick=args.quick, args=shlex.join(argv),
    )  # fmt: skip
    out = args.out or C.default_out_dir()
    run_dir = out / ("cpu-quick" if args.quick else C.slug(meta["device"]))
    print(f"# GRPO step per trainer, {args.model} on {meta['device']}, commit {meta['git_commit']}", flush=True)
    rows: list[dict] = []
    trl_rows: dict[int, dict] = {}
    budget = Budget(args.time_budget)
    N = args.prompts * args.G
    with tempfile.TemporaryDirectory(prefix="fastgrpo-bench-step-") as work, sigterm_as_cut():
        for cap in sorted(args.caps):
            if rows and rows[-1]["status"].startswith("cut:"):
                break
            setup = None
            draw = imposed_lengths(N, cap, args.seed)
            for trainer in args.trainers:
                row = dict(cap=cap, trainer=trainer, prompts=args.prompts, G=args.G, sequences=N,
                           micro_batch=args.micro_batch, imposed_tokens=sum(draw),
                           lengths_digest=digest(draw))  # fmt: skip
                status, predicted = availability(trainer), budget.predict(trainer, cap)
                if status is None and not budget.allows(predicted):
                    status = SKIPPED
                if status is not None:
                    rows.append(emit(out, row | dict(status=status, predicted_s=predicted), meta, trl_rows))
                    continue
                print(f"{trainer} cap={cap} ...", file=sys.stderr, flush=True)
                started = _clock()
                try:
                    setup = setup or make_setup(args, cap, device, dtype, Path(work))
                    res = run_one(trainer, setup)
                except Cut:  # a hard limit's SIGTERM: the row says how long it ran, then the run ends
                    res = dict(status=f"cut: stopped after {_clock() - started:.0f} s (SIGTERM)", predicted_s=predicted)
                    rows.append(emit(out, row | res, meta, trl_rows))
                    break
                except Exception as e:
                    if not C.is_oom(e):
                        raise
                    res = dict(status=C.failure(e))
                finally:
                    C.free_memory(device)
                row |= res
                if row["status"] == "ok":
                    row["other_s"] = row["wall_s"] - sum(row[f"{p}_s"] for p in PHASES)
                    row["tokens_per_s"] = row["real_tokens"] / row["wall_s"]
                    budget.record(trainer, cap, row["run_s"])
                rows.append(emit(out, row, meta, trl_rows))
    for row in rows:  # again for rows that landed before their cap's trl row
        vs_trl(row, trl_rows)
    write_outputs(rows, args, meta, run_dir, cuda)
    return 128 + signal.SIGTERM if rows and rows[-1]["status"].startswith("cut:") else 0


class Cut(BaseException):
    """SIGTERM arrived (``timeout`` cutting the run at a hard limit). A BaseException, so that no
    library's ``except Exception`` swallows it."""


@contextlib.contextmanager
def sigterm_as_cut():
    """SIGTERM raises ``Cut`` in the main thread while the runs go on: the run in progress lands as a
    ``cut`` row (how long it ran is a lower bound on its time) and the tables are still written."""

    def handler(signum, frame):
        raise Cut

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def emit(out: Path, row: dict, meta: dict, trl_rows: dict[int, dict]) -> dict:
    """Append ``row`` as it lands (a killed run keeps its rows) and say so on stderr."""
    if row["trainer"] == "trl" and row["status"] == "ok":
        trl_rows[row["cap"]] = row
    vs_trl(row, trl_rows)
    C.append_rows(out, NAME, [row], meta, CSV_FIELDS)
    timing = f", step {row['wall_s']:.2f} s, {row['tokens_per_s']:.0f} tokens/s" if row.get("wall_s") else ""
    print(f"{row['trainer']} cap={row['cap']}: {row['status']}{timing}", file=sys.stderr, flush=True)
    return row


def write_outputs(rows: list[dict], args, meta: dict, run_dir: Path, cuda: bool) -> None:
    columns = [
        ("cap", "cap", "{}"), ("trainer", "trainer", "{}"), ("status", "status", "{}"),
        ("backend", "sampler", "{}"), ("real_tokens", "real tokens", "{}"), ("wall_s", "step s", "{:.2f}"),
        *((f"{p}_s", p, "{:.2f}") for p in PHASES), ("other_s", "other", "{:.2f}"),
        ("tokens_per_s", "tokens/s", "{:.0f}"), ("tokens_per_s_vs_trl", "tokens/s vs trl", "{:.2f}"),
        ("update_vs_trl", "update speed vs trl", "{:.2f}"),
        ("peak_gib" if cuda else "peak_rss_extra_mib", "peak GiB" if cuda else "peak RSS+ MiB", "{:.2f}"),
        ("loss", "loss", "{:.4g}"), ("predicted_s", "predicted s", "{:.0f}"),
    ]  # fmt: skip
    table = C.markdown_table(rows, columns)
    print(table)
    notes = [
        f"{args.prompts} prompts x G={args.G} = {args.prompts * args.G} completions per step, prompts of "
        f"{args.prompt_len} tokens, micro-batches of {args.micro_batch} rows, one optimizer step per generation "
        f"batch; the measured step is the second (the first: every completion {WARM_LENGTH} tokens or the cap).",
        "Lengths: seeded log-normal, median cap/6, clipped to [cap/32, cap], the same for every trainer "
        "(`lengths_digest`); real tokens = what the measured step generated.",
        "Split: fastgrpo's own time/* metrics; TRL's _generate, _calculate_rewards, no-grad log-prob passes, "
        "training_step less _prepare_inputs plus the optimizer step; other = step - phases. update speed vs trl "
        "= trl's update s / this row's.",
        "Peak: " + ("cuda max_memory_allocated over the measured step." if cuda else
                    "process RSS above its value before the trainer was built, over its whole run."),
    ]  # fmt: skip
    title = f"GRPO step per trainer: {args.model}, {meta['dtype']}, {meta['device']} ({meta['git_commit'][:10]})"
    path = C.write_run(run_dir, f"{NAME}_{args.model}", title, meta, table + "\n\n" + "\n\n".join(notes))
    png = plot(rows, run_dir / f"{NAME}_{args.model}.png", title)
    where = f"appended {len(rows)} rows to {run_dir.parent / NAME}.jsonl/.csv; wrote {path}"
    print(where + (f" and {png}" if png else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
