"""One ``fastgrpo train`` update step at long completion lengths: peak memory and tokens per second.

A model of a real architecture's shape is built from its config with random weights (no download:
memory and speed do not depend on the values), G synthetic rollouts per step with completion lengths
spread over [L/4, L] (one of them L), and ``fastgrpo.update.Updater`` runs the same micro-batching,
packing, checkpointing, LoRA and fused loss as ``fastgrpo train``. Each length is run twice and the
second step is measured (the first compiles kernels and allocates optimizer state).

    python benchmarks/bench_train.py --model qwen2.5-1.5b --lengths 1024 4096 16384 32768 --find-max
    python benchmarks/bench_train.py --model qwen2.5-7b --use-peft --lengths 16384 65536 --find-max
    python benchmarks/bench_train.py --quick          # CPU: tiny model, proves the script works

Peak memory is ``torch.cuda.max_memory_allocated`` over the measured step (CUDA) or the process's
peak RSS (CPU, monotone over the whole run, so only the CUDA figures compare modes). Out of memory
is a result ("OOM"), not a crash. ``--find-max`` doubles the length past the last one that fits,
then bisects to ``--granularity`` tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from fastgrpo.benchmarks._common import environment

from fastgrpo.config import build_config
from fastgrpo.generation import Rollouts
from fastgrpo.loss import GRPOLossParams
from fastgrpo.memory import memory_plan
from fastgrpo.modeling import prepare_model
from fastgrpo.tracking import peak_memory_gb
from fastgrpo.update import Batch, Updater

# Shapes of public checkpoints' config.json files (the weights are never needed).
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}  # fmt: skip


def build_model(name: str, dtype: torch.dtype, device: torch.device, attn: str):
    import transformers

    from fastgrpo.attention import register

    register()
    cfg = transformers.Qwen2Config(**MODELS[name], max_position_embeddings=262144, rope_theta=1e6)
    torch.manual_seed(0)
    with device:
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)


def synthetic_batch(G: int, prompt_len: int, length: int, vocab: int, device, seed: int) -> Batch:
    """G rollouts: prompts of ``prompt_len`` tokens, completion lengths uniform in [L/4, L], the first L."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (G,), generator=g)
    lengths[0] = length
    completion_mask = torch.arange(length)[None] < lengths[:, None]
    rollouts = Rollouts(
        torch.randint(0, vocab, (G, prompt_len), generator=g),
        torch.ones(G, prompt_len, dtype=torch.bool),
        torch.randint(0, vocab, (G, length), generator=g),
        completion_mask,
        lengths == length,
    )
    rollouts = Rollouts(*(t.to(device) for t in vars(rollouts).values()))
    advantages = torch.randn(G, generator=g).to(device)
    return Batch(rollouts, completion_mask.to(device), advantages, {})


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_length(updater: Updater, model, args, length: int, device) -> dict:
    """Two update steps at one length; the second is measured."""
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = synthetic_batch(args.G, args.prompt_len, length, vocab, device, args.seed)
    tokens = int(batch.rollouts.prompt_mask.sum() + batch.rollouts.completion_mask.sum())
    row = {"completion_length": length, "tokens": tokens}
    try:
        for _ in range(2):  # the second step is measured
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            metrics = updater.update(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        row.update(status="ok", step_s=dt, tokens_per_s=tokens / dt, micro_batches=int(metrics["micro_batches"]))
        row["peak_gib"] = peak_memory_gb(device)
    except Exception as e:
        if not is_oom(e):
            raise
        row["status"] = "OOM"
    finally:
        updater.optimizer.zero_grad(set_to_none=True)
        del batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def find_max(updater, model, args, device, fits: int | None) -> int | None:
    """Longest completion length that fits, to ``args.granularity`` tokens."""
    lo, hi = fits or 0, None
    length = max(args.granularity, 2 * lo) if lo else args.granularity
    while hi is None and length <= args.max_length:
        if run_length(updater, model, args, length, device)["status"] == "ok":
            lo, length = length, 2 * length
        else:
            hi = length
    hi = hi or args.max_length + args.granularity
    while hi - lo > args.granularity:
        mid = (lo + hi) // 2 // args.granularity * args.granularity
        if mid in (lo, hi):
            break
        if run_length(updater, model, args, mid, device)["status"] == "ok":
            lo = mid
        else:
            hi = mid
    return lo or None


def bench_mode(args, device, dtype, packed: bool) -> dict:
    cfg = build_config((dict(
        model="bench", padding_free=packed, gradient_checkpointing=not args.no_checkpointing,
        offload_activations=args.offload, use_liger_body=args.liger, use_peft=args.use_peft, lora_r=args.lora_r,
        per_device_train_batch_size=args.rows, gradient_accumulation_steps=max(1, args.G // args.rows),
        max_tokens_per_microbatch=args.max_tokens, num_generations=args.G, max_completion_length=max(args.lengths),
        max_prompt_length=args.prompt_len, beta=args.beta, learning_rate=1e-6, loss_impl=args.loss_impl,
    ), "bench"))  # fmt: skip
    model = build_model(args.model, dtype, device, args.attn)
    model, info = prepare_model(model, cfg, device)
    params = GRPOLossParams(loss_type="dapo", beta=args.beta, epsilon=0.2, epsilon_high=0.28)

    def fail(what, *_):
        raise RuntimeError(what)

    updater = Updater(model, None, params, cfg, fail)
    rows = [run_length(updater, model, args, n, device) for n in args.lengths]
    fits = max((r["completion_length"] for r in rows if r["status"] == "ok"), default=None)
    out = {"packed": packed, "info": info, "rows": rows, "plan_at_max_length": memory_plan(model, cfg, info)}
    if args.find_max:
        out["max_completion_length"] = find_max(updater, model, args, device, fits)
    del updater, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| packing | completion L | tokens | micro-batches | peak GiB | step s | tokens/s |", "|---" * 7 + "|"]
    for res in results:
        for r in res["rows"]:
            ok = r["status"] == "ok"
            cells = [
                "on" if res["packed"] else "off", r["completion_length"], r["tokens"],
                r.get("micro_batches", "-"), f"{r['peak_gib']:.2f}" if ok else r["status"],
                f"{r['step_s']:.3f}" if ok else "-", f"{r['tokens_per_s']:.0f}" if ok else "-",
            ]  # fmt: skip
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        if "max_completion_length" in res:
            lines.append(f"| {'on' if res['packed'] else 'off'} | longest that fits: {res['max_completion_length']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-1.5b")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    p.add_argument("--G", type=int, default=8, help="completions per step (one group)")
    p.add_argument("--prompt-len", type=int, default=256)
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
    p.add_argument("--max-length", type=int, default=262144, help="--find-max stops here")
    p.add_argument("--granularity", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, lengths 64 and 160, G=4")
    p.add_argument("--out", type=Path, help="write bench_train.json and bench_train.md here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.lengths, args.G, args.prompt_len, args.granularity = "tiny", [64, 160], 4, 16, 64
        args.max_length = min(args.max_length, 256)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.beta > 0 and not args.use_peft:
        p.error("--beta > 0 needs --use-peft here (a full-parameter reference copy is not built)")
    meta = environment(device)
    meta.update(
        model=args.model, dtype=str(dtype).removeprefix("torch."), args={k: str(v) for k, v in vars(args).items()}
    )
    print(f"# update step, {args.model} on {meta['device']}, commit {meta['git_commit']}", flush=True)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.packing]
    results = [bench_mode(args, device, dtype, packed) for packed in modes]
    table = markdown(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"bench_train_{args.model}{'_lora' if args.use_peft else ''}"
        (args.out / f"{stem}.json").write_text(json.dumps({"metadata": meta, "results": results}, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(f"# {stem}\n\n`{meta['command']}`\n\n{meta['device']}, torch "
                                             f"{meta['torch']}, commit {meta['git_commit']}\n\n{table}\n")  # fmt: skip
        print(f"wrote {args.out / stem}.json/.md", file=sys.stderr)


if __name__ == "__main__":
    main()
