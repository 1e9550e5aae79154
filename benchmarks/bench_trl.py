"""``fastgrpo bench trl-dropin``: one TRL GRPO training step, stock ``trl.GRPOTrainer`` against the drop-in
``fastgrpo.integrations.trl.GRPOTrainer``, in the same process and run, on the same model and config.

A Qwen2 is built from a config (``--model`` preset, any shape flag overrides it; random weights, no
download) and saved once; both trainers load it by path from the same seed. Prompts are ``--prompt-len``
words of a word-level tokenizer covering the whole vocabulary; ``min_new_tokens`` (GRPOConfig
``generation_kwargs``) suppresses EOS, so every completion is ``--completion-length`` tokens and the loss
sees G x L completion tokens. Everything else is GRPOConfig's default (dapo, beta=0, activation
checkpointing on), unless a flag says otherwise.

    fastgrpo bench trl-dropin                                   # CUDA: qwen2.5-0.5b shape, G=8, L=2048, bf16
    fastgrpo bench trl-dropin --model qwen2.5-1.5b --completion-length 4096 --workspace-bytes 268435456
    fastgrpo bench trl-dropin --quick                           # CPU: tiny model, proves the script works

What is timed, per trainer: ``--steps`` optimizer steps, the last one reported (the first compiles
kernels and allocates optimizer state). Within that step ``prepare_s`` is TRL's ``_prepare_inputs``
(generation, rewards, advantages, old/reference log-probs when the config needs them), ``generate_s``
its ``_generate`` share, and ``loss_bwd_s`` the rest of ``training_step``: the loss forward and its
backward, which is all the drop-in changes when beta = 0. The optimizer step is not timed.
CUDA is synchronized at each boundary.

Peak memory of the loss + backward window: on CUDA ``torch.cuda.max_memory_allocated`` (reset when
the window opens; ``peak_gib`` absolute, ``peak_extra_mib`` above what was allocated then); on CPU one
more step runs under a ``TorchDispatchMode`` that adds the bytes of every tensor storage an op
allocates and subtracts them when the storage dies, so ``peak_extra_mib`` is the peak of live tensor bytes
allocated in the window (autograd backward and checkpoint recomputation included; allocator caching
and non-tensor memory not). ``prepare_peak_extra_mib`` is the same for the prepare window and
``start_mib`` what was allocated before the trainer was built (CUDA only: what the last one left).

Output (see ``_common``): one row per run with both trainers' numbers (``stock_*``, ``ours_*``) and
their ratios ``ours / stock`` (``*_ratio``), appended to ``<out>/bench_trl.jsonl`` and ``.csv``; the
run's table in ``<out>/<device>/bench_trl_<model>.md`` (``cpu-quick/`` with ``--quick``). Out of
memory is a trainer's status, not a crash; any other error is raised. Both trainers are TRL's: without
TRL installed the command says, in one line and before building anything, to ``pip install 'fastgrpo[trl]'``
(exit status 1).
"""

from __future__ import annotations

import argparse
import functools
import gc
import shlex
import sys
import tempfile
import time
import types
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks._models import MODELS, dataset, qwen2_config, reward_even_words, save_model, tokenizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastgrpo.integrations import trl_missing

NAME = "bench_trl"
TRAINERS = ("stock", "ours")
SHAPE_FLAGS = {  # flag -> Qwen2Config field
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
}
# Defaults of the options that --quick changes: (full run, --quick).
DEFAULTS = dict(model=("qwen2.5-0.5b", "tiny"), G=(8, 4), prompt_len=(128, 8), completion_length=(2048, 32))
PER_TRAINER = ("status", "loss_bwd_s", "prepare_s", "generate_s", "step_s", "generate_share", "train_s",
               "peak_extra_mib", "peak_gib", "prepare_peak_extra_mib", "start_mib", "loss", "grad_norm")  # fmt: skip
CSV_FIELDS = [
    "model", "parameters", "vocab_size", "hidden_size", "layers", "G", "prompt_len", "completion_length",
    "loss_tokens", "loss_bwd_s_ratio", "peak_extra_mib_ratio", "step_s_ratio",
    *(f"{t}_{k}" for t in TRAINERS for k in PER_TRAINER), "ours_route", "timed", "peak_memory",
]  # fmt: skip
_clock = time.perf_counter


def _storage(t):
    """A tensor's storage; None for what is no tensor or holds no memory (meta, sparse, wrappers)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages ops allocate while active, each counted until it dies.

    Outputs that alias an input (views, in-place and ``out=`` ops) allocate nothing and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {s._cdata for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        for storage in map(_storage, tree_leaves(out)):
            if storage is None or storage._cdata in inputs or storage in self._seen:
                continue
            self._seen[storage] = True
            weakref.finalize(storage, self._free, storage.nbytes())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out


def model_config(args):
    shape = dict(MODELS[args.model])
    for flag, field in SHAPE_FLAGS.items():
        if getattr(args, flag) is not None:
            shape[field] = getattr(args, flag)
    if args.tie is not None:
        shape["tie_word_embeddings"] = args.tie
    return qwen2_config(shape, args.prompt_len + args.completion_length)


def grpo_config(args, out_dir: Path, device: torch.device, dtype: torch.dtype):
    from trl import GRPOConfig

    cuda = device.type == "cuda"
    return GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=args.G, num_generations=args.G,
        max_completion_length=args.completion_length, generation_kwargs={"min_new_tokens": args.completion_length},
        max_steps=args.steps + (0 if cuda else 1), learning_rate=1e-6, beta=args.beta, loss_type=args.loss_type,
        gradient_checkpointing=not args.no_checkpointing, model_init_kwargs={"dtype": str(dtype).split(".")[-1]},
        use_cpu=not cuda, bf16=dtype == torch.bfloat16, logging_steps=1, report_to="none", save_strategy="no",
        seed=args.seed, data_seed=args.seed, dataloader_num_workers=0, log_completions=False, disable_tqdm=True,
    )  # fmt: skip


def instrument(trainer, device: torch.device, track_last: int | None) -> list[dict]:
    """Time (and on CUDA, peak-measure) each ``training_step``'s prepare and loss + backward windows;
    step number ``track_last`` (1-based, CPU) runs its loss + backward under ``LiveTensorBytes``."""
    records: list[dict] = []
    prepare, step, generate = trainer._prepare_inputs, trainer.training_step, trainer._generate
    cuda = device.type == "cuda"
    gen_s = [0.0]

    def timed_generate(self, *a, **kw):
        C.synchronize(device)
        t0 = _clock()
        try:
            return generate(*a, **kw)
        finally:
            C.synchronize(device)
            gen_s[0] += _clock() - t0

    def training_step(self, model, inputs, num_items_in_batch=None):
        rec, gen_s[0] = {}, 0.0
        C.synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = _clock()
        prepared = prepare(inputs)
        C.synchronize(device)
        t1 = _clock()
        if cuda:
            rec["prepare_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        rec["loss_tokens"] = int(prepared["completion_mask"].sum())
        tracker = LiveTensorBytes() if len(records) + 1 == track_last else nullcontext()
        self._prepare_inputs = lambda x: x  # already prepared: training_step runs the loss and backward only
        try:
            with tracker:
                loss = step(model, prepared, num_items_in_batch)
            C.synchronize(device)
        finally:
            del self._prepare_inputs
        t2 = _clock()
        rec.update(prepare_s=t1 - t0, generate_s=gen_s[0], loss_bwd_s=t2 - t1, step_s=t2 - t0)
        if cuda:
            rec["peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        elif isinstance(tracker, LiveTensorBytes):
            rec["peak_extra_mib"] = tracker.peak / 2**20
        records.append(rec)
        return loss

    trainer._generate = types.MethodType(timed_generate, trainer)
    trainer.training_step = types.MethodType(training_step, trainer)
    return records


def run_trainer(name: str, args, model_dir: Path, work: Path, device, dtype, vocab_size: int) -> dict:
    """One trainer's ``--steps`` steps: its ``PER_TRAINER`` fields (the reported step's) and facts."""
    import trl
    from transformers import PrinterCallback, set_seed

    from fastgrpo.integrations.trl import GRPOTrainer

    cfg = grpo_config(args, work / name, device, dtype)
    set_seed(args.seed)
    extra = dict(fastgrpo_impl=args.impl, workspace_bytes=args.workspace_bytes) if name == "ours" else {}
    cls = GRPOTrainer if name == "ours" else trl.GRPOTrainer
    trainer = None
    start = dict(start_mib=torch.cuda.memory_allocated(device) / 2**20) if device.type == "cuda" else {}
    try:
        data = dataset(args, vocab_size, 4 * cfg.max_steps)
        trainer = cls(
            model=str(model_dir),
            reward_funcs=[reward_even_words],
            args=cfg,
            train_dataset=data,
            processing_class=tokenizer(vocab_size),
            **extra,
        )
        trainer.remove_callback(PrinterCallback)  # its log lines would interleave with the table on stdout
        records = instrument(trainer, device, None if device.type == "cuda" else cfg.max_steps)
        C.synchronize(device)
        t0 = _clock()
        trainer.train()
        C.synchronize(device)
        train_s = _clock() - t0
        logs = [r for r in trainer.state.log_history if "loss" in r and "train_loss" not in r]
        rec = records[args.steps - 1]
        out = {k: rec.get(k) for k in PER_TRAINER} | dict(status="ok", train_s=train_s, **start)
        out.update(
            generate_share=rec["generate_s"] / rec["step_s"],
            loss=logs[args.steps - 1]["loss"],
            grad_norm=logs[args.steps - 1].get("grad_norm"),
            loss_tokens=rec["loss_tokens"],
        )
        if device.type != "cuda":
            out["peak_extra_mib"] = records[-1]["peak_extra_mib"]
        if name == "ours":
            out["route"] = trainer.fastgrpo_last_route
        return out
    except Exception as e:
        if not C.is_oom(e):
            raise
        return dict(status="OOM", **start)
    finally:
        del trainer
        gc.collect()
        C.free_memory(device)


def parse_args(argv):
    p = C.parser("fastgrpo bench trl-dropin", __doc__)
    default = functools.partial(C.default_help, DEFAULTS)

    p.add_argument("--model", choices=sorted(MODELS), help="shape preset (fastgrpo bench train's); " + default("model"))
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help="overrides the preset")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, help="tie_word_embeddings (default: the preset's)")
    p.add_argument("--G", type=int, help="num_generations = per_device_train_batch_size; " + default("G"))
    p.add_argument("--prompt-len", type=int, help="prompt tokens; " + default("prompt_len"))
    p.add_argument("--completion-length", type=int, help="max_completion_length; " + default("completion_length"))
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per trainer; the last one is reported")
    p.add_argument("--beta", type=float, default=0.0, help="GRPOConfig beta (> 0 loads a reference model)")
    p.add_argument("--loss-type", default="dapo", help="GRPOConfig loss_type")
    p.add_argument("--no-checkpointing", action="store_true", help="gradient_checkpointing=False")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], help="weights (and bf16 autocast); default: bf16 on CUDA"
    )
    p.add_argument("--impl", default="auto", help="fastgrpo_impl of ours")
    p.add_argument("--workspace-bytes", type=int, help="workspace_bytes of ours (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, G=4, L=32, fp32")
    p.add_argument("--out", type=Path, help=C.OUT_HELP)
    args = p.parse_args(argv)
    args.out = args.out or C.default_out_dir()  # resolved against the working directory now
    C.fill_defaults(args, DEFAULTS)
    for name in ("G", "prompt_len", "completion_length", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.G < 2:
        p.error("--G must be >= 2 (GRPO needs a group)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if missing := trl_missing():  # both trainers are TRL's: say so before building anything
        raise SystemExit(f"fastgrpo bench trl-dropin: error: {missing}")
    device = torch.device("cuda" if not args.quick and torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = model_config(args)
    cuda = device.type == "cuda"
    if not cuda and not args.quick:
        print("fastgrpo bench trl-dropin: no CUDA device, so the full shape runs on the CPU (slow); --quick is the "
              "CPU smoke run", file=sys.stderr)  # fmt: skip
    meta = C.environment(device) | dict(
        dtype=str(dtype).removeprefix("torch."), beta=args.beta, loss_type=args.loss_type,
        checkpointing=not args.no_checkpointing, impl=args.impl, workspace_bytes=args.workspace_bytes,
        steps=args.steps, seed=args.seed, quick=args.quick, order="stock,ours", args=shlex.join(argv),
    )  # fmt: skip
    out = args.out or C.default_out_dir()
    run_dir = out / ("cpu-quick" if args.quick else C.slug(meta["device"]))
    row = dict(
        model=args.model,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        tie=config.tie_word_embeddings,
        G=args.G,
        prompt_len=args.prompt_len,
        completion_length=args.completion_length,
    )
    row["timed"] = (
        f"step {args.steps} of {args.steps}: loss_bwd_s = training_step minus _prepare_inputs (loss forward + "
        "backward, no optimizer step); prepare_s = _prepare_inputs (generate_s of it: _generate)"
    )
    row["peak_memory"] = (
        "cuda max_memory_allocated over loss+backward (peak_extra_mib: above allocated at its start)"
        if cuda
        else f"live tensor bytes allocated in loss+backward of step {args.steps + 1} (TorchDispatchMode tracker)"
    )
    print(
        f"# TRL GRPO step, stock vs fastgrpo drop-in: {args.model} on {meta['device']}, commit {meta['git_commit']}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fastgrpo-bench-trl-") as work:
        work = Path(work)
        row["parameters"] = save_model(config, work / "model", dtype, device)
        for name in TRAINERS:
            print(f"{name}: {args.steps} step(s) ...", file=sys.stderr, flush=True)
            res = run_trainer(name, args, work / "model", work, device, dtype, config.vocab_size)
            row["loss_tokens"] = res.get("loss_tokens", row.get("loss_tokens"))
            if name == "ours":
                row["ours_route"] = res.get("route")
            row |= {f"{name}_{k}": res.get(k) for k in PER_TRAINER}  # every key, None where not measured
    for k in ("loss_bwd_s", "peak_extra_mib", "step_s", "peak_gib"):
        row[f"{k}_ratio"] = C.ratio(row.get(f"ours_{k}"), row.get(f"stock_{k}"))
    C.append_rows(out, NAME, [row], meta, CSV_FIELDS)

    peak = "peak extra MiB" if cuda else "peak live tensor MiB"
    columns = [
        ("trainer", "trainer", "{}"),
        ("status", "status", "{}"),
        ("loss_bwd_s", "loss+bwd s", "{:.4f}"),
        ("prepare_s", "prepare s", "{:.3f}"),
        ("generate_s", "generate s", "{:.3f}"),
        ("step_s", "step s", "{:.3f}"),
        ("peak_extra_mib", peak, "{:.1f}"),
        ("peak_gib", "peak GiB", "{:.2f}"),
        ("loss", "loss", "{:.6g}"),
    ]
    lines = [dict(trainer=t, **{k: row.get(f"{t}_{k}") for k in PER_TRAINER}) for t in TRAINERS]
    lines.append(dict(trainer="ours / stock", **{k: row.get(f"{k}_ratio") for k in PER_TRAINER}))
    table = C.markdown_table(lines, columns)
    print(table)
    shape = (
        f"{row['parameters']:,} parameters (V={row['vocab_size']}, H={row['hidden_size']}, {row['layers']} layers); "
        f"G={args.G}, prompt {args.prompt_len} + completion {args.completion_length} tokens, {row['loss_tokens']} "
        f"completion tokens in the loss; ours routed {row.get('ours_route')}"
    )
    notes = f"{shape}.\n\nTimed: {row['timed']}.\n\nPeak memory: {row['peak_memory']}."
    title = f"TRL GRPO step, stock vs fastgrpo drop-in: {args.model}, {meta['dtype']}"
    path = C.write_run(run_dir, f"{NAME}_{args.model}", title, meta, table + "\n\n" + notes)
    print(f"appended 1 row to {out / NAME}.jsonl/.csv; wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
