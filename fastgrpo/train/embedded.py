"""Embedded, offline default for ``fastgrpo train``: a tiny base model on a verifiable task.

Everything is generated in code, so the default run needs no download:

* The tokenizer and the task (the addition of two digits) are in :mod:`.embedded_task`.
* :func:`build_base_model` builds a tiny Qwen2 and gives it a short supervised warm-up on *noisy*
  completions (right answer 35% of the time, ``<think>`` block half the time). Like a real pretrained
  LLM it then knows the output format roughly and is right only some of the time (sampled accuracy
  about 0.25-0.3, format about 0.5), but the right answer is the most likely one for nearly every
  prompt, so GRPO has a signal to sharpen.
* :func:`prepare_embedded` writes the model, tokenizer and a jsonl dataset to disk, because the trainer
  loads them through its normal ``from_pretrained`` / ``datasets`` paths.
* "No model named" is decided here and nowhere else: :func:`preset_layer` is the lowest layer of the
  command line's config, and :func:`resolve` turns such a config into an ordinary one (model and data
  on disk) before any trainer exists, so the trainer never knows the embedded default.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .config import Config, DataConfig
from .data import format_prompt as chat_prompt
from .embedded_task import (
    P_CORRECT,
    P_NEAR,
    P_THINK,
    addition_completion,
    addition_prompt,
    answer_distribution,
    build_tokenizer,
    write_dataset,
)

if TYPE_CHECKING:
    import transformers

MARKER_FILE = "fastgrpo_toy.json"
# Bump when the model, tokenizer or warm-up changes, so a cached base model from an older version
# is rebuilt rather than silently reused.
TOY_VERSION = 1
DEFAULT_TRAIN_ROWS = 1000

# Placeholder GRPO settings for the embedded default; the trainer owns and finalizes them. Checked
# with a plain on-policy GRPO loop (one update per batch, no KL, reward = accuracy + format): at these
# settings accuracy goes from about 0.3 to 0.8 and format from 0.5 to 0.99 in 100 steps, about 6 s
# of training on 2 CPU cores.
EMBEDDED_PRESET: dict[str, Any] = {
    # Group size: with base accuracy ~0.3, P(all 8 wrong) = 0.7**8 ~ 6%, so most groups carry signal.
    "num_generations": 8,
    # 64 completions (8 prompts x 8) per step, in two micro-batches of 32 (exercises accumulation).
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 2,
    # The longest right completion, `<think>9+9</think><answer>18</answer>` plus EOS, is 10 tokens.
    "max_completion_length": 16,
    "max_prompt_length": 64,
    # The base model learned its noise as a distribution at T=1; other temperatures change accuracy.
    "temperature": 1.0,
    "top_p": 1.0,
    # Measured: 3e-4 sharpens steadily; 1e-3 is faster for 30 steps, then erodes the sum (accuracy
    # stalls near 0.7); 3e-3 learns the format within 10 steps but wipes the sum (accuracy 0.3 -> 0.1).
    "learning_rate": 3e-4,
    "lr_scheduler_type": "constant_with_warmup",
    "max_steps": 100,
    "beta": 0.0,
    "seed": 0,
    # Reward on a 0-1 scale: accuracy is the goal; format rewards keeping the <think> block.
    "reward_funcs": ["accuracy", "format"],
    "reward_weights": [0.75, 0.25],
    # A demo: running it again replaces its own earlier run here (the trainer marks this folder as the
    # embedded default's), never a folder the user named.
    "output_dir": "fastgrpo-output",
}


def _prompt_text(tokenizer: Any, prompt: str) -> str:
    """The chat-templated generation prompt for one user message, rendered by the trainer's own code."""
    return chat_prompt(tokenizer, prompt, None)


# --------------------------------------------------------------------------------------- base model


def _expected_nll_rows(
    completions: dict[tuple[int, ...], float],
    min_reach: float = 0.1,
) -> list[tuple[tuple[int, ...], list[dict[int, float]], list[float]]]:
    """Teacher-forcing rows whose soft-target loss equals the expected NLL of a completion distribution.

    ``completions`` maps token sequences to probabilities summing to 1. The expected NLL is a sum over
    the nodes of their prefix tree: each prefix, weighted by the probability of reaching it, scores the
    model's next-token distribution against the data's. So each returned row is one sequence with, per
    position, the data's next-token distribution given that prefix and the prefix's reach probability
    as weight (0 where an earlier row already covers the prefix, so no node counts twice).

    A row is kept only if it covers a prefix that branches or that is reached with probability at least
    ``min_reach``, so a handful of rows (here at most 6 per prompt) replaces one per completion (about
    40). What that drops is the deterministic tail of the improbable completions (``</answer>`` and
    EOS after an unlikely wrong digit), which the kept rows teach in every other context anyway.
    """
    children: dict[tuple[int, ...], dict[int, float]] = {}
    for seq, prob in completions.items():
        for t in range(len(seq)):
            mass = children.setdefault(seq[:t], {})
            mass[seq[t]] = mass.get(seq[t], 0.0) + prob
    covered: set[tuple[int, ...]] = set()
    rows = []
    for seq, _ in sorted(completions.items(), key=lambda kv: -kv[1]):
        prefixes = [seq[:t] for t in range(len(seq))]
        needed = [
            p for p in prefixes if p not in covered and (len(children[p]) > 1 or sum(children[p].values()) >= min_reach)
        ]
        if not needed:
            continue
        targets, weights = [], []
        for prefix in prefixes:
            mass = children[prefix]
            reach = sum(mass.values())
            targets.append({token: m / reach for token, m in mass.items()})
            weights.append(0.0 if prefix in covered else reach)
            covered.add(prefix)
        rows.append((seq, targets, weights))
    return rows


def build_base_model(
    tokenizer: Any,
    seed: int = 0,
    *,
    steps: int = 300,
    prompts_per_step: int = 25,
    learning_rate: float = 1e-2,
    anneal: tuple[float, float] = (0.3, 0.9),
    p_correct: float = P_CORRECT,
    p_think: float = P_THINK,
    p_near: float = P_NEAR,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    verbose: bool = False,
    progress: bool = False,
) -> transformers.Qwen2ForCausalLM:
    """A tiny float32 Qwen2 after a short supervised warm-up on noisy completions of the addition task.

    The data is :func:`answer_distribution` (``<think>`` with probability ``p_think``), which mixes the
    right answer (probability ``p_correct``) with wrong ones. Its expected NLL is linear in the mix:
    ``c * loss(right answers) + (1 - c) * loss(wrong answers)``. The warm-up starts at ``c = 1`` (clean
    data teaches the sum fastest) and lowers ``c`` linearly to ``p_correct`` between the fractions
    ``anneal`` of the run, then holds it. Lowering it gradually matters: a sharp model switched to
    noisy data at once sees wrong answers it gives ~1e-10 probability, and the huge gradients that
    follow erase the sum rather than flatten the output.

    Both losses are fed exactly (:func:`_expected_nll_rows`), not as sampled labels: with sampled
    labels, Adam turns the label noise into a random walk of the small weights that also erases the
    sum, and the model ends up guessing near it with the right answer no longer the mode.

    AdamW with linear warm-up and cosine decay; loss on completion tokens and EOS only.
    Deterministic for a given ``seed`` and thread count; the global torch RNG state is left as it was.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    data = _warmup_rows(tokenizer, p_think, p_near)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(_tiny_config(tokenizer, hidden_size, num_hidden_layers)).float()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = None
        model.train()

        def right_share(step: int) -> float:
            lo, hi = int(anneal[0] * steps), int(anneal[1] * steps)
            frac = min(1.0, max(0.0, (step - lo) / max(1, hi - lo)))
            return 1.0 + frac * (p_correct - 1.0)

        _warm_up(model, data, right_share, random.Random(seed), steps, prompts_per_step, learning_rate,
                 verbose, progress)  # fmt: skip
    model.eval()
    return model


def _tiny_config(tokenizer: Any, hidden_size: int, num_hidden_layers: int) -> transformers.Qwen2Config:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def _warmup_rows(tokenizer: Any, p_think: float, p_near: float) -> dict[str, Any]:
    """The warm-up's teacher-forcing tensors for all 100 prompts and both parts of the mix (right answers,
    wrong ones): right-padded ``ids``/``mask`` (R, W), soft targets ``soft`` (R, W-1, V) with their reach
    weights ``weight`` (R, W-1), and per row its ``prompt_index`` and ``is_right``."""
    import torch

    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = []  # (prompt index, is-right-part, prompt, row)
    for index, (a, b) in enumerate((a, b) for a in range(10) for b in range(10)):
        prompt = encode(_prompt_text(tokenizer, addition_prompt(a, b)))
        wrong = answer_distribution(a, b, 0.0, p_near)
        for right, dist in ((True, {a + b: 1.0}), (False, wrong)):
            completions: dict[tuple[int, ...], float] = {}
            for value, prob in dist.items():
                for think, p_t in ((True, p_think), (False, 1.0 - p_think)):
                    if prob * p_t > 0:
                        completions[encode(addition_completion(a, b, value, think)) + (eos,)] = prob * p_t
            rows += [(index, right, prompt, row) for row in _expected_nll_rows(completions)]
    # Right padding: positions start at 0 in every row, as in unpadded generation.
    width = max(len(prompt) + len(row[0]) for _, _, prompt, row in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    soft = torch.zeros(len(rows), width - 1, vocab)
    weight = torch.zeros(len(rows), width - 1)
    for r, (_, _, prompt, (seq, targets, weights)) in enumerate(rows):
        full = prompt + seq
        ids[r, : len(full)] = torch.tensor(full)
        mask[r, : len(full)] = 1
        for t, (target, w) in enumerate(zip(targets, weights, strict=True)):
            # Logits at position i predict token i + 1, so completion token t is predicted at
            # position len(prompt) + t - 1.
            pos = len(prompt) + t - 1
            weight[r, pos] = w
            for token, p in target.items():
                soft[r, pos, token] = p
    prompt_index = torch.tensor([index for index, *_ in rows])
    is_right = torch.tensor([right for _, right, *_ in rows])
    return dict(ids=ids, mask=mask, soft=soft, weight=weight, prompt_index=prompt_index, is_right=is_right)


def _warm_up(model, data, right_share, rng: random.Random, steps: int, prompts_per_step: int,
             learning_rate: float, verbose: bool, progress: bool) -> None:  # fmt: skip
    """The warm-up's optimizer loop over ``data`` (``_warmup_rows``), the right answers' share of the mix at
    each step from ``right_share(step)``: AdamW, linear warm-up then cosine decay, clipped gradients."""
    import torch

    ids, mask, soft, weight = data["ids"], data["mask"], data["soft"], data["weight"]
    prompt_index, is_right = data["prompt_index"], data["is_right"]
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        # Linear warm-up, then cosine decay to 0, so the model settles instead of ending on a big step.
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    order: list[int] = []
    prompts = int(prompt_index.max()) + 1
    for step in tqdm(range(steps), desc="embedded base model", unit="step", disable=not progress):
        # Epochs over the 100 prompts in shuffled order: every prompt is seen equally often.
        if len(order) < prompts_per_step:
            order += rng.sample(range(prompts), prompts)
        chosen, order = order[:prompts_per_step], order[prompts_per_step:]
        c = right_share(step)
        take = torch.isin(prompt_index, torch.tensor(chosen))
        if c == 1.0:
            # The wrong-answer rows have weight 0 until the anneal starts: skip their compute.
            take &= is_right
        logprobs = model(input_ids=ids[take], attention_mask=mask[take]).logits[:, :-1].log_softmax(-1)
        # Reach-weighted cross-entropy against the data's next-token distributions, mixed c : 1 - c.
        node_loss = -(weight[take] * (soft[take] * logprobs).sum(-1)).sum(-1)
        mix = torch.where(is_right[take], c, 1.0 - c)
        # Normalized by the expected number of completion tokens, so the scale is per token.
        loss = (mix * node_loss).sum() / (mix[:, None] * weight[take]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  right {c:.2f}  loss {loss.item():.4f}  {time.perf_counter() - start:.1f}s")


# ---------------------------------------------------------------------------------------- on disk


def _marker(seed: int) -> dict[str, Any]:
    """Contents of the marker file that certifies a complete base model for ``seed``."""
    return {"toy_version": TOY_VERSION, "seed": seed}


def _base_model_complete(model_dir: Path, seed: int) -> bool:
    """Whether ``model_dir`` holds a finished base model for ``seed`` from this :data:`TOY_VERSION`."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(seed) and (model_dir / "config.json").is_file()


def prepare_embedded(
    workdir: str | Path, seed: int = 0, train_rows: int = DEFAULT_TRAIN_ROWS, progress: bool = False
) -> tuple[Path, Path]:
    """Write the embedded base model + tokenizer and its training set under ``workdir``.
    Building the base model (the first run) is announced in a line; ``progress`` adds a progress bar.

    Returns ``(workdir/base_model, workdir/data/train.jsonl)``. A base model already there with a
    marker for the same seed and :data:`TOY_VERSION` is reused; otherwise it is built in a temporary
    directory and renamed into place, so an interrupted build never leaves a half-written model that
    a later call would trust. The dataset is cheap and is always rewritten.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "base_model"
    if not _base_model_complete(model_dir, seed):
        print(f"embedded default: building its base model once (a short supervised warm-up), cached in "
              f"{model_dir}", flush=True)  # fmt: skip
        tokenizer = build_tokenizer()
        model = build_base_model(tokenizer, seed=seed, progress=progress)
        # Per-process name, so concurrent builds do not write into each other; a plain mkdir (not
        # mkdtemp, which makes it 0700) keeps the usual permissions for a shared cache.
        tmp = workdir / f".base_model.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # Written last: its presence certifies that everything before it was saved.
            (tmp / MARKER_FILE).write_text(json.dumps(_marker(seed)))
            if model_dir.exists():
                # os.replace cannot replace a non-empty directory; the stale model is unusable anyway.
                shutil.rmtree(model_dir, ignore_errors=True)
            try:
                os.replace(tmp, model_dir)
            except OSError:
                # A concurrent call may have put its own model there between the rmtree and here;
                # the same seed gives the same model, so a complete one is as good as ours.
                if not _base_model_complete(model_dir, seed):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dataset_path = write_dataset(workdir / "data" / "train.jsonl", train_rows, seed)
    return model_dir, dataset_path


# ---------------------------------------------------------------------------------------- as an input

TITLE = "fastgrpo train: embedded default (81k-parameter Qwen2, single-digit addition)"
OWNER = "fastgrpo embedded default"  # the mark of the demo's own output folder
# The data section's source fields: the embedded default brings its own data, so any of these set without
# a model would be silently replaced by it.
DATA_SOURCE_FIELDS = ("dataset", "dataset_config", "dataset_split", "prompt_column", "answer_column")


def cache_dir() -> Path:
    """Where the embedded default's base model and data live: built once, reused by later runs."""
    root = os.environ.get("FASTGRPO_CACHE") or Path.home() / ".cache" / "fastgrpo"
    return Path(root) / "embedded"


def preset_layer(*given: dict[str, Any]) -> dict[str, Any] | None:
    """The preset as the lowest config layer when no layer in ``given`` (flat key -> value, e.g. the YAML
    file's and the command line's) names a model; None when one does. The preset's reward weights are for
    its own reward functions, so they are left out when the user names others without weights."""
    merged = {k: v for layer in given for k, v in layer.items()}
    if merged.get("model") not in (None, "none", "None"):
        return None
    preset = dict(EMBEDDED_PRESET)
    if "reward_funcs" in merged and "reward_weights" not in merged:
        preset.pop("reward_weights")
    return preset


def check_no_data_without_model(cfg: Config) -> None:
    """No model named means the embedded default, model and data both: a data source the user set would be
    replaced, so it is refused, naming the flags, instead."""
    default = DataConfig()
    given = [f for f in DATA_SOURCE_FIELDS if getattr(cfg.data, f) != getattr(default, f)]
    if given:
        flags = ", ".join(f"--{f}" for f in given)
        raise ValueError(
            f"{flags} given without --model: the embedded default (no --model) trains its own tiny model on its "
            "own data, so yours would be ignored; name the model to train on it, e.g. --model Qwen/Qwen2.5-0.5B"
        )


@dataclass(frozen=True)
class Job:
    """A run ready for the trainer: a config naming its model and data, the plot's title and the mark
    of an output folder the run may replace (None: only with ``overwrite_output_dir``)."""

    cfg: Config
    title: str | None = None
    owner: str | None = None


def resolve(cfg: Config) -> Job:
    """The run ``cfg`` asks for, complete. With no model named, the embedded base model and data are built
    (or found in :func:`cache_dir`) and named in a copy of ``cfg``; ``cfg`` itself is not changed."""
    if cfg.model.model is not None:
        if cfg.dataset is None:
            raise ValueError("dataset is required when model is given")
        return Job(cfg)
    check_no_data_without_model(cfg)
    model_dir, data_path = prepare_embedded(cache_dir(), seed=0, progress=not cfg.disable_tqdm)
    resolved = copy.deepcopy(cfg)
    resolved.model.model, resolved.data.dataset = str(model_dir), str(data_path)
    # The demo replaces its own earlier run in its own folder, never a folder the user named.
    own = Path(cfg.output_dir) == Path(EMBEDDED_PRESET["output_dir"])
    return Job(resolved, title=TITLE, owner=OWNER if own else None)
