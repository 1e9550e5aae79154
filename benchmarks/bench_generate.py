"""``fastgrpo bench generate``: tokens/s and peak memory of each sampling backend (``hf``, ``continuous``,
``vllm``), in one process, on the same model, prompts and completion lengths.

A Qwen2 of a real shape (``--model``, ``fastgrpo bench train``'s presets) is built from its config with
random weights. Such a model never stops by itself, so the completion lengths are imposed, drawn the way
long-CoT rollouts are distributed: for each ``--caps`` value, the P x G lengths (``--prompts`` P prompts,
``--G`` completions each) are a seeded log-normal, median ``--length-median`` x cap, log-sd
``--length-sigma``, rounded and clipped to [cap/32, cap] (defaults 1/6 and 1.0: mean ~0.26 cap, ~4 % of
completions cut at the cap). One draw per (seed, cap), made before any backend runs, so every backend
gets the very same lengths, rows i*G..i*G+G-1 the lengths of prompt i.

How the lengths are imposed. The EOS id of the tokenizer and of the generation config is ``V``, one past
the model's vocabulary: no backend can ever sample it, so every completion runs until its own limit:

- ``hf`` (public ``HFGenerator.generate``): one call per ``--in-flight`` rows (B / G prompts, groups
  contiguous), ``max_completion_length`` = the longest imposed length among those rows. Every row of a
  call is computed to that length, exactly as a real call runs until its last row's EOS: that padding
  is the cost being measured. Only each row's imposed length counts as real tokens; ``computed_tokens``
  is rows x the call's length, summed over calls, and ``padding_waste`` = computed / real.
- ``continuous`` (public ``ContinuousGenerator.generate``, ``batch_size`` = B requests in flight,
  ``max_completion_length`` = cap), with one transformers internal patched for the call:
  ``RequestState.update_and_check_completion`` first sets the request's ``_new_tokens_limit`` (the
  field ``max_new_tokens`` fills) to a length taken from its prompt's G imposed lengths, so forks and
  separate requests of one prompt alike finish at their own lengths. The real tokens are the ones the
  finished requests hold; their lengths, per prompt, are checked equal to the imposed ones.
- ``vllm`` (CUDA, vLLM installed; the model saved and loaded by vLLM, its own copy): one ``LLM.generate``
  over P x G token-id prompts, each ``SamplingParams(max_tokens=L_i, ignore_eos=True)``. Untested here
  (no CUDA, no vLLM on the dev machine), so an error is its row's status rather than a crash. Without
  vLLM the row says ``missing: vllm not installed``, on CPU ``skipped: needs CUDA``.

A token is a real completion token: the imposed lengths, summed (prefill and padding excluded).
``wall_s`` is one timed call of the backend's whole sampling (hf: all its calls), CUDA synchronized,
after one small untimed warm-up call per backend; ``tokens_per_s`` = real tokens / wall s. Ratios
``*_vs_hf`` are against the hf row of the same cap in the same run.

``first_token_s``: seconds from the timed call's start to the first logits the model's output layer
returns (a forward hook on it, removed after that first call; CUDA synchronized there), i.e. the
prefill of the first batch of prompts, one sampling step short of the first completion token. vLLM
runs its own copy of the model, so its rows leave it empty.

Peak memory: CUDA ``max_memory_allocated`` over the timed call (reset before it; ``peak_extra_mib``
above what was allocated when it started, i.e. above the weights; ``peak_gib`` absolute; vLLM's
pre-allocated cache counts there). CPU: the process RSS above its value at the call's start, sampled
every 2 ms in a thread (the continuous backend samples in its own thread, which a tensor tracker in the
caller's thread would not see); allocator caching and earlier backends' freed memory blur it.

    fastgrpo bench generate                                  # CUDA: qwen2.5-1.5b, caps 1K/4K/16K, 4 prompts x G=8
    fastgrpo bench generate --caps 16384 --backends continuous hf --time-budget 420
    fastgrpo bench generate --quick                          # CPU: tiny model, cap 64

``--time-budget S`` (default 360 s on CUDA): a (backend, cap) is not started once S seconds have
passed, nor when its predicted time would end past S; the prediction scales the same backend's
largest measured smaller cap by the ratio of tokens it computes times (cap ratio)^0.25 (per-token
decode cost grows with the context it reads). Such rows say ``skipped: time budget`` with
``predicted_s``. A call already running is not stopped.

Output (see ``_common``): one row per (cap, backend) appended to ``<out>/bench_generate.jsonl`` and
``.csv`` as it lands (the JSON line also holds the imposed ``lengths``); the run's table in
``<out>/<device>/bench_generate_<model>.md`` (``cpu-quick/`` with ``--quick``). Out of memory is a row's
status, not a crash.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.util
import math
import os
import shlex
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch
from fastgrpo.benchmarks import _common as C
from fastgrpo.benchmarks._models import MODELS

NAME = "bench_generate"
BACKENDS = ("hf", "continuous", "graph", "vllm")
SKIPPED = "skipped: time budget"
SPECIAL = ["<pad>", "<unk>"]  # ids 0 and 1; words follow; <eos> is id V, outside the model's vocabulary
# Defaults of the options that --quick changes: (full run, --quick).
DEFAULTS = dict(
    model=("qwen2.5-1.5b", "tiny"),
    caps=([1024, 4096, 16384], [64]),
    prompts=(4, 2),
    in_flight=(16, 8),
    prompt_len=(256, 16),
    time_budget=(360.0, None),
)
CSV_FIELDS = [
    "backend", "cap", "status", "prompts", "G", "in_flight", "sequences", "real_tokens", "computed_tokens",
    "padding_waste", "mean_length", "max_length", "truncated_share", "wall_s", "tokens_per_s", "tokens_per_s_vs_hf",
    "first_token_s", "peak_extra_mib", "peak_gib", "peak_vs_hf", "predicted_s", "calls", "lengths_digest",
    "peak_memory", "driven",
]  # fmt: skip
DRIVEN = {
    "hf": "HFGenerator.generate per B rows, max_completion_length = their longest imposed length",
    "continuous": "ContinuousGenerator.generate, batch_size = B, per-request limits via RequestState patch",
    "graph": "GraphGenerator.generate, all P x G rows in one call, per-row limits (row_limits)",
    "vllm": "vllm.LLM.generate, per-request SamplingParams(max_tokens=L_i, ignore_eos=True)",
}
_clock = time.perf_counter  # wall times and the time budget (tests replace it)


# ----------------------------------------------------------------------------- lengths


def imposed_lengths(n: int, cap: int, seed: int, median: float = 1 / 6, sigma: float = 1.0) -> list[int]:
    """``n`` completion lengths: log-normal (median ``median * cap``, log-sd ``sigma``), rounded and clipped
    to [cap // 32, cap] (at least 1). A function of (n, cap, seed, median, sigma) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + cap)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    raw = (math.log(median * cap) + sigma * z).exp().round()
    return raw.clamp(max(1, cap // 32), cap).long().tolist()


def digest(lengths: list[int]) -> str:
    return hashlib.sha1(",".join(map(str, lengths)).encode()).hexdigest()[:12]


def expected_waste(G: int, in_flight: int, cap: int, median: float, sigma: float, draws: int = 2000) -> float:
    """Expected hf computed / real tokens for calls of ``in_flight`` rows, by simulation (NOTES.md)."""
    lengths = torch.tensor(imposed_lengths(draws * in_flight, cap, 12345, median, sigma), dtype=torch.float64)
    calls = lengths.view(draws, in_flight)
    return float(calls.max(1).values.sum() * in_flight / calls.sum())


# ----------------------------------------------------------------------------- model, tokenizer, prompts


def model_config(name: str, max_positions: int):
    import transformers

    # No EOS in the model config (it must lie inside the vocabulary there); the generation config's is V.
    return transformers.Qwen2Config(
        **MODELS[name], max_position_embeddings=max_positions, rope_theta=1e6, pad_token_id=0, eos_token_id=None,
        bos_token_id=None,
    )  # fmt: skip


def build_model(name: str, dtype: torch.dtype, device: torch.device, max_positions: int):
    import transformers

    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(
            model_config(name, max_positions), dtype=dtype, attn_implementation="sdpa"
        )
    V = MODELS[name]["vocab_size"]
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, V
    model.generation_config.bos_token_id = None
    return model.eval()


def tokenizer(vocab_size: int):
    """Word-level: ids 0/1 pad/unk, ``w{i}`` is id i + 2 for i < V - 2, and ``<eos>`` is id V, which a model
    of vocabulary V can never sample."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *words, "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def make_prompts(n: int, prompt_len: int, vocab_size: int, seed: int) -> list[str]:
    """``n`` distinct prompts of ``prompt_len`` words (the first word is the prompt's index)."""
    g = torch.Generator().manual_seed(seed)
    words = vocab_size - len(SPECIAL)
    ids = torch.randint(0, words, (n, prompt_len), generator=g)
    ids[:, 0] = torch.arange(n) % words
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


# ----------------------------------------------------------------------------- memory


class RssPeak:
    """CPU: peak process RSS above its value at entry, sampled every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


class FirstLogits:
    """While active, the clock time at which ``head`` (the model's output embeddings) first returned: the
    first logits of the call exist then, so the first completion token is one sampling step away. Every
    backend driving the bench's model calls it (hf and continuous through the model's forward, graph in its
    prefill); on CUDA the hook synchronizes once, on that first call, so the time is the GPU's."""

    def __init__(self, head: torch.nn.Module | None):
        self.head, self.at, self._handle = head, None, None

    def _hook(self, module, args, output):
        if self.at is None:
            if output.is_cuda:
                torch.cuda.synchronize(output.device)
            self.at = _clock()
            self._handle.remove()

    def __enter__(self):
        if self.head is not None:
            self._handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


def measured(fn, device: torch.device, head: torch.nn.Module | None = None):
    """Call ``fn`` once: (result, wall s, peak GiB or None, peak extra MiB, s to the first logits or None).
    ``head``: the module whose first output marks the first token (None: not measured)."""
    C.free_memory(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with contextlib.ExitStack() as stack:
        mem = None if cuda else stack.enter_context(RssPeak())
        first = stack.enter_context(FirstLogits(head))
        t0 = _clock()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall = _clock() - t0
    ttft = None if first.at is None else first.at - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        return out, wall, peak / 2**30, (peak - base) / 2**20, ttft
    return out, wall, None, mem.peak / 2**20, ttft


# ----------------------------------------------------------------------------- backends


@contextlib.contextmanager
def per_request_lengths(groups: dict[tuple[int, ...], list[int]], finished: dict[str, int]):
    """While active, every continuous-batching request stops after a length taken from ``groups[prompt
    token ids]`` (one per request id, first come first served), instead of the call's ``max_new_tokens``.
    ``finished`` collects request id -> generated tokens when each request finishes.

    The patched method is where transformers compares the generated count with ``_new_tokens_limit`` (the
    only use of ``max_new_tokens`` in its scheduler); a request that was soft-reset (its generated tokens
    moved into its prompt when the cache was full) keeps its id and its length."""
    from transformers.generation.continuous_batching.requests import RequestState

    original = RequestState.update_and_check_completion
    pools = {k: list(v) for k, v in groups.items()}
    limits: dict[str, int] = {}
    lock = threading.Lock()

    def update_and_check_completion(self, token_id, logprob):
        prompt_len = self._true_initial_tokens or len(self.initial_tokens)
        limit = limits.get(self.request_id)
        if limit is None:
            with lock:
                limit = limits[self.request_id] = pools[tuple(self.initial_tokens[:prompt_len])].pop()
        self._new_tokens_limit = limit - (len(self.initial_tokens) - prompt_len)
        done = original(self, token_id, logprob)
        if done:
            finished[self.request_id] = len(self.initial_tokens) - prompt_len + len(self.generated_tokens)
        return done

    RequestState.update_and_check_completion = update_and_check_completion
    try:
        yield
    finally:
        RequestState.update_and_check_completion = original


def sampling_params(G: int, length: int, in_flight: int, temperature: float):
    from fastgrpo.train.sampling import SamplingParams

    return SamplingParams(num_generations=G, max_completion_length=length, temperature=temperature,
                          batch_size=in_flight)  # fmt: skip


def check_lengths(got: list[list[int]], want: list[list[int]], backend: str) -> None:
    """Per prompt, the completion lengths a backend produced must be the imposed ones (in any order)."""
    if [sorted(g) for g in got] != [sorted(w) for w in want]:
        raise RuntimeError(f"{backend}: completion lengths differ from the imposed ones: {got} != {want}")


class HFRun:
    """``hf``: ``HFGenerator.generate`` once per B rows, to the longest imposed length among them."""

    def __init__(self, model, tok, args):
        from fastgrpo.train.sampling import build_generator

        self.gen = build_generator("hf", model, tok, types.SimpleNamespace(max_prompt_length=None))
        self.args = args

    def __call__(self, prompts: list[str], lengths: list[list[int]], cap: int) -> dict:
        a = self.args
        per_call = a.in_flight // a.G
        computed, calls, got = 0, 0, []
        for start in range(0, len(prompts), per_call):
            group_lengths = lengths[start : start + per_call]
            width = max(max(g) for g in group_lengths)
            ro = self.gen.generate(prompts[start : start + per_call], sampling_params(a.G, width, a.in_flight,
                                                                                      a.temperature))  # fmt: skip
            if ro.completion_ids.shape[1] != width or bool((~ro.completion_mask).any()):
                raise RuntimeError(f"hf: expected every row to run {width} tokens (no EOS can be sampled)")
            computed += ro.completion_ids.shape[0] * width
            calls += 1
            got += [list(g) for g in group_lengths]  # real tokens: each row up to its own imposed length
        self.gen.release()
        return dict(computed_tokens=computed, calls=calls, got=got)

    def close(self):
        del self.gen


class ContinuousRun:
    """``continuous``: ``ContinuousGenerator.generate`` with per-request limits (``per_request_lengths``)."""

    def __init__(self, model, tok, args):
        from fastgrpo.train.sampling import build_generator

        self.gen = build_generator("continuous", model, tok, types.SimpleNamespace(max_prompt_length=None))
        self.tok, self.args = tok, args

    def __call__(self, prompts: list[str], lengths: list[list[int]], cap: int) -> dict:
        a = self.args
        ids, mask = self.gen.tokenize_prompts(prompts)
        keys = [tuple(row[m].tolist()) for row, m in zip(ids, mask, strict=True)]
        if len(set(keys)) != len(keys):
            raise ValueError("prompts must be distinct: their token ids key the imposed lengths")
        finished: dict[str, int] = {}
        with per_request_lengths(dict(zip(keys, lengths, strict=True)), finished):
            ro = self.gen.generate(prompts, sampling_params(a.G, cap, a.in_flight, a.temperature))
        self.gen.release()
        if len(finished) != len(ro):
            raise RuntimeError(f"continuous: {len(finished)} requests finished, {len(ro)} rows returned")
        # Rows are grouped by prompt; the finished counts are per request id, so regroup by sorted id order.
        order = sorted(finished, key=request_order)
        got = [[finished[r] for r in order[i * a.G : (i + 1) * a.G]] for i in range(len(prompts))]
        return dict(computed_tokens=sum(finished.values()), calls=1, got=got)

    def close(self):
        del self.gen


def request_order(request_id: str) -> tuple[int, int]:
    """Sort key of transformers' request ids: ``req_<n>`` and its forks ``req_<n>__child#<k>``."""
    parent, _, child = request_id.partition("__child#")
    return int(parent.rsplit("_", 1)[-1]), int(child) + 1 if child else 0


class GraphRun:
    """``graph``: ``GraphGenerator.generate``, every row in flight, each stopped at its imposed length."""

    def __init__(self, model, tok, args):
        from fastgrpo.train.sampling import build_generator

        self.gen = build_generator("graph", model, tok, types.SimpleNamespace(max_prompt_length=None))
        self.args = args

    def __call__(self, prompts: list[str], lengths: list[list[int]], cap: int) -> dict:
        a = self.args
        params = sampling_params(a.G, cap, None, a.temperature)
        ro = self.gen.generate(prompts, params, row_limits=[n for group in lengths for n in group])
        self.gen.release()
        flat = ro.completion_mask.sum(1).tolist()
        got = [flat[i * a.G : (i + 1) * a.G] for i in range(len(prompts))]
        return dict(computed_tokens=self.gen.computed_tokens, calls=1, got=got)

    def close(self):
        del self.gen


class VLLMRun:
    """``vllm``: the model saved, loaded by ``vllm.LLM``; per-request ``max_tokens``, EOS ignored. Untested."""

    def __init__(self, model, tok, args, work: Path):
        # In this process (not vLLM's engine-core subprocess), so torch.cuda's peak statistics see its memory.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        model.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
        self.vllm, self.args = vllm, args
        self.llm = vllm.LLM(
            model=str(work / "model"), dtype=str(model.dtype).removeprefix("torch."), skip_tokenizer_init=True,
            gpu_memory_utilization=args.vllm_memory, max_num_seqs=args.in_flight, seed=args.seed,
            max_model_len=args.prompt_len + max(args.caps) + 8,
        )  # fmt: skip
        self.tok = tok

    def __call__(self, prompts: list[str], lengths: list[list[int]], cap: int) -> dict:
        a = self.args
        ids = self.tok(prompts, add_special_tokens=False)["input_ids"]
        requests, params = [], []
        for p, group in zip(ids, lengths, strict=True):
            for n in group:
                requests.append({"prompt_token_ids": list(p)})
                params.append(self.vllm.SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False,
                                                       temperature=a.temperature))  # fmt: skip
        outs = self.llm.generate(requests, params, use_tqdm=False)
        flat = [len(o.outputs[0].token_ids) for o in outs]
        got = [flat[i * a.G : (i + 1) * a.G] for i in range(len(prompts))]
        return dict(computed_tokens=sum(flat), calls=1, got=got)

    def close(self):
        del self.llm


def availability(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run here, else the row's status."""
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            return "missing: vllm not installed"
        if device.type != "cuda":
            return "skipped: needs CUDA"
    if backend == "continuous":
        try:
            import fastgrpo.train.sampling.continuous  # noqa: F401
        except ImportError as e:
            return f"missing: fastgrpo.train.sampling.continuous ({type(e).__name__}: {e})"[:200]
    return None


class Budget(C.Budget):
    """Whether a (backend, cap) may start: ``record(backend, cap, computed tokens, s)``."""

    def clock(self) -> float:
        return _clock()

    def predict(self, backend: str, cap: int, tokens: int) -> float | None:
        """The largest measured cap at most ``cap`` scaled by the computed tokens, and a little by the cap
        (longer rows attend over more)."""
        below = [m for m in self.measured.get(backend, []) if m[0] <= cap]
        if not below:
            return None
        c, t, s = max(below)
        return s * tokens / t * (cap / c) ** 0.25


# ----------------------------------------------------------------------------- run


def computed_tokens(backend: str, lengths: list[list[int]], args) -> int:
    """Completion tokens ``backend`` computes for ``lengths`` (hf: every row of a call to its longest)."""
    if backend != "hf":
        return sum(map(sum, lengths))
    per_call = args.in_flight // args.G
    calls = [lengths[i : i + per_call] for i in range(0, len(lengths), per_call)]
    return sum(len(c) * args.G * max(map(max, c)) for c in calls)


def vs_hf(row: dict, hf_rows: dict[int, dict]) -> None:
    """The row's ratios to the ok hf row of its cap (None while there is none)."""
    hf = hf_rows.get(row["cap"], {})
    row["tokens_per_s_vs_hf"] = C.ratio(row.get("tokens_per_s"), hf.get("tokens_per_s"))
    row["peak_vs_hf"] = C.ratio(row.get("peak_extra_mib"), hf.get("peak_extra_mib"))


def parse_args(argv):
    p = C.parser("fastgrpo bench generate", __doc__)
    default = functools.partial(C.default_help, DEFAULTS)

    p.add_argument("--model", choices=sorted(MODELS), help="shape preset (fastgrpo bench train's); " + default("model"))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="in this order")
    p.add_argument("--caps", type=int, nargs="+", help="max_completion_length values; " + default("caps"))
    p.add_argument("--prompts", type=int, help="prompts P (P x G completions per cap); " + default("prompts"))
    p.add_argument("--G", type=int, default=8, help="completions per prompt (default: 8)")
    p.add_argument("--in-flight", type=int, help="B: rows per hf call = requests in flight (continuous, vllm); "
                   "a multiple of G; " + default("in_flight"))  # fmt: skip
    p.add_argument("--prompt-len", type=int, help="prompt words = tokens; " + default("prompt_len"))
    p.add_argument("--length-median", type=float, default=1 / 6, help="median length / cap (default: 1/6)")
    p.add_argument("--length-sigma", type=float, default=1.0, help="log-normal sigma of the lengths (default: 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--vllm-memory", type=float, default=0.35, help="vLLM gpu_memory_utilization (default: 0.35)")
    p.add_argument("--time-budget", type=float, help="seconds; (backend, cap) runs past it are skipped; "
                   + default("time_budget"))  # fmt: skip
    p.add_argument("--no-time-budget", action="store_true", help="run everything")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, cap 64, 2 prompts x G=8, B=8, fp32")
    p.add_argument("--out", type=Path, help=C.OUT_HELP)
    args = p.parse_args(argv)
    args.out = args.out or C.default_out_dir()  # resolved against the working directory now
    C.fill_defaults(args, DEFAULTS)
    if args.no_time_budget:
        args.time_budget = None
    for name in ("G", "prompts", "in_flight", "prompt_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prompt_len < 2:
        p.error("--prompt-len must be >= 2 (continuous batching forks need two prompt tokens)")
    if min(args.caps) < 1:
        p.error("--caps must be >= 1")
    if args.in_flight % args.G:
        p.error("--in-flight must be a multiple of --G (an hf call holds whole groups)")
    if not 0 < args.length_median <= 1 or args.length_sigma < 0:
        p.error("--length-median must be in (0, 1] and --length-sigma >= 0")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if not args.quick and torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda and not args.quick:
        print("fastgrpo bench generate: no CUDA device, so the full shape runs on the CPU (slow); --quick is the "
              "CPU smoke run", file=sys.stderr)  # fmt: skip
    meta = C.environment(device) | dict(
        model=args.model, dtype=str(dtype).removeprefix("torch."), prompt_len=args.prompt_len,
        length_dist=f"lognormal(median={args.length_median:.4g} cap, sigma={args.length_sigma:g}) clipped to "
        "[cap/32, cap]", length_median=args.length_median, length_sigma=args.length_sigma,
        temperature=args.temperature, seed=args.seed, time_budget=args.time_budget, quick=args.quick,
        backends=",".join(args.backends), args=shlex.join(argv),
    )  # fmt: skip
    out = args.out or C.default_out_dir()
    run_dir = out / ("cpu-quick" if args.quick else C.slug(meta["device"]))
    peak_what = (
        "cuda max_memory_allocated over the timed call (extra: above allocated at its start)"
        if cuda
        else "cpu: process RSS above its value at the call's start, sampled every 2 ms"
    )
    V = MODELS[args.model]["vocab_size"]
    N = args.prompts * args.G
    prompts = make_prompts(args.prompts, args.prompt_len, V, args.seed)
    draws = {
        cap: imposed_lengths(N, cap, args.seed, args.length_median, args.length_sigma) for cap in sorted(args.caps)
    }
    print(f"# sampling backends, {args.model} on {meta['device']}, commit {meta['git_commit']}", flush=True)

    rows: list[dict] = []
    hf_rows: dict[int, dict] = {}

    def emit(row: dict) -> dict:  # as each row lands: a killed run keeps its rows
        if row["backend"] == "hf" and row["status"] == "ok":
            hf_rows[row["cap"]] = row
        vs_hf(row, hf_rows)
        rows.append(row)
        C.append_rows(out, NAME, [row], meta, CSV_FIELDS)
        timing = f", {row['wall_s']:.2f} s, {row['tokens_per_s']:.0f} tokens/s" if row.get("wall_s") else ""
        print(f"{row['backend']} cap={row['cap']}: {row['status']}{timing}", file=sys.stderr, flush=True)
        return row

    budget = Budget(args.time_budget)
    runners: dict[str, object] = {}
    status: dict[str, str | None] = {b: availability(b, device) for b in args.backends}
    model = tok = None
    with tempfile.TemporaryDirectory(prefix="fastgrpo-bench-generate-") as work:
        try:
            for cap in sorted(args.caps):
                flat = draws[cap]
                lengths = [flat[i * args.G : (i + 1) * args.G] for i in range(args.prompts)]
                for backend in args.backends:
                    row = dict(backend=backend, cap=cap, prompts=args.prompts, G=args.G, in_flight=args.in_flight,
                               sequences=N, real_tokens=sum(flat), mean_length=sum(flat) / N, max_length=max(flat),
                               truncated_share=sum(n == cap for n in flat) / N, lengths_digest=digest(flat),
                               lengths=flat, driven=DRIVEN[backend])  # fmt: skip
                    work_tokens = computed_tokens(backend, lengths, args)
                    row["computed_tokens"] = work_tokens
                    row["padding_waste"] = work_tokens / row["real_tokens"]
                    if status[backend] is not None:
                        emit(row | dict(status=status[backend]))
                        continue
                    predicted = budget.predict(backend, cap, work_tokens)
                    if not budget.allows(predicted):
                        emit(row | dict(status=SKIPPED, predicted_s=predicted))
                        continue
                    if model is None:
                        print(f"building {args.model} ({meta['dtype']}) ...", file=sys.stderr, flush=True)
                        model = build_model(args.model, dtype, device, args.prompt_len + max(args.caps) + 8)
                        tok = tokenizer(V)
                    try:
                        run = runners.get(backend)
                        if run is None:
                            cls = {"hf": HFRun, "continuous": ContinuousRun, "graph": GraphRun}.get(backend)
                            run = cls(model, tok, args) if cls else VLLMRun(model, tok, args, Path(work))
                            warm = min(8, cap)
                            run(prompts[:1], [[warm] * args.G], warm)  # untimed: lazy initialization, kernels
                            runners[backend] = run
                        head = None if backend == "vllm" else model.get_output_embeddings()  # vLLM: its own copy
                        call = lambda: run(prompts, lengths, cap)  # noqa: B023, E731 (called at once)
                        res, wall, peak_gib, peak_extra, ttft = measured(call, device, head)
                        check_lengths(res["got"], lengths, backend)
                        row.update(status="ok", wall_s=wall, tokens_per_s=row["real_tokens"] / wall, calls=res["calls"],
                                   first_token_s=ttft,
                                   computed_tokens=res["computed_tokens"], peak_gib=peak_gib, peak_extra_mib=peak_extra,
                                   peak_memory=peak_what)  # fmt: skip
                        row["padding_waste"] = res["computed_tokens"] / row["real_tokens"]
                        budget.record(backend, cap, res["computed_tokens"], wall)
                    except Exception as e:
                        if not (C.is_oom(e) or backend == "vllm"):
                            raise
                        row["status"] = C.failure(e)
                    finally:
                        C.free_memory(device)
                    emit(row)
        finally:
            for run in runners.values():
                run.close()
            del runners, model
            gc.collect()
            C.free_memory(device)

    columns = [
        ("cap", "cap", "{}"), ("backend", "backend", "{}"), ("status", "status", "{}"),
        ("real_tokens", "real tokens", "{}"), ("computed_tokens", "computed", "{}"),
        ("padding_waste", "computed / real", "{:.2f}"), ("wall_s", "wall s", "{:.2f}"),
        ("tokens_per_s", "tokens/s", "{:.0f}"), ("tokens_per_s_vs_hf", "tokens/s vs hf", "{:.2f}"),
        ("first_token_s", "first token s", "{:.3f}"),
        ("peak_extra_mib", "peak extra MiB" if cuda else "peak RSS+ MiB", "{:.1f}"),
        ("peak_gib", "peak GiB", "{:.2f}"), ("peak_vs_hf", "peak vs hf", "{:.2f}"),
        ("predicted_s", "predicted s", "{:.0f}"),
    ]  # fmt: skip
    for row in rows:  # again for rows that landed before their cap's hf row (with hf last in --backends)
        vs_hf(row, hf_rows)
    table = C.markdown_table(rows, columns)
    print(table)
    notes = [
        f"{args.prompts} prompts x G={args.G} = {N} completions per cap, prompts of {args.prompt_len} tokens, "
        f"B = {args.in_flight} rows per hf call / requests in flight; lengths {meta['length_dist']}, seed "
        f"{args.seed}, the same for every backend (`lengths_digest` per cap).",
        "Tokens: real completion tokens only (the imposed lengths, summed); `computed` = completion tokens the "
        "backend computed (hf: every row of a call to its longest).",
        "Driven: " + "; ".join(f"{b}: {DRIVEN[b]}" for b in args.backends) + ".",
        f"Peak memory: {peak_what}.",
    ]
    title = f"Sampling backends: {args.model}, {meta['dtype']}, G={args.G}"
    path = C.write_run(run_dir, f"{NAME}_{args.model}", title, meta, table + "\n\n" + "\n\n".join(notes))
    print(f"appended {len(rows)} rows to {out / NAME}.jsonl/.csv; wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
