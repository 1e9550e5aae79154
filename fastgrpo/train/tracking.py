"""Run records: ``metrics.jsonl`` (one object per step), the progress line, and ``reward.png``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "reward.png"


def peak_memory_gb(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if sys.platform == "win32":
        return float("nan")
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class PhaseTimes:
    """Seconds per phase of a step (``with times("sample"): ...``; a phase entered twice adds up), logged as
    ``time/<phase>``. On CUDA each phase ends with a device synchronization, so the kernels a phase queued
    count in it rather than in whichever later phase first waits for them."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class MetricsLog:
    """Append-only JSON lines; on resume, rows after the checkpoint's step are dropped so the
    file reads as one uninterrupted run."""

    def __init__(self, output_dir: str | Path, resume_step: int | None = None):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null reads as "no value"
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a last line cut short (a run killed while writing it: no newline
    after it) is left out, any other unreadable line raises."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines = lines[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def summary_line(rows: list[dict[str, Any]]) -> str:
    """Mean reward of the first and last 10% of steps, the time taken, and a long run of steps without
    learning signal if there was one."""
    if not rows:
        return "no steps were run"
    k = max(1, len(rows) // 10)
    first = _mean([r.get("reward") for r in rows[:k]])
    last = _mean([r.get("reward") for r in rows[-k:]])
    seconds = sum(r.get("step_time") or 0.0 for r in rows)
    steps = "step" if k == 1 else f"{k} steps"
    line = (
        f"{len(rows)} {'step' if len(rows) == 1 else 'steps'} in {seconds:.0f}s: reward {first:.3f} (first {steps}) "
        f"-> {last:.3f} (last {steps}), gain {last - first:+.3f}"
    )
    streak = no_signal_streak(rows)
    if streak:
        line += f"; {no_signal_text(*streak)}"
    return line


# A step "without signal": most of its groups scored every completion alike (zero reward spread), so
# their advantages, and their share of the gradient, are zero. Warned about after this many in a row.
NO_SIGNAL_SHARE = 0.5
NO_SIGNAL_STEPS = 5


def no_signal_streak(rows: list[dict[str, Any]], patience: int = NO_SIGNAL_STEPS) -> tuple[int, int] | None:
    """(first step, last step) of the longest run of steps without signal, if it is at least ``patience``
    steps long (or covers every row, when there are fewer)."""
    best, start, prev = None, None, None
    for r in rows:
        if (r.get("frac_reward_zero_std") or 0.0) > NO_SIGNAL_SHARE:
            start = r["step"] if start is None else start
            if best is None or r["step"] - start > best[1] - best[0]:
                best = (start, r["step"])
        else:
            start = None
        prev = r
    if best is None or prev is None:
        return None
    return best if best[1] - best[0] + 1 >= min(patience, len(rows)) else None


def no_signal_text(first: int, last: int) -> str:
    span = f"step {first}" if first == last else f"steps {first}-{last}"
    return (
        f"{span}: most groups had the same reward for every completion (frac_reward_zero_std > "
        f"{NO_SIGNAL_SHARE}), so they gave no gradient; check that the rewards can vary within a group "
        "(a reward that never varies trains nothing), or raise num_generations or temperature"
    )


# The metrics line printed every logging_steps steps: (metric, label, format).
LOG_FIELDS = (
    ("reward", "reward", "{:.3f}"), ("loss", "loss", "{:.4f}"), ("kl", "kl", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"), ("completions/mean_length", "length", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:.0f}"), ("step_time", "step", "{:.2f}s"),
)  # fmt: skip


def log_line(row: dict[str, Any], max_steps: int) -> str:
    """``step 5/100  reward 0.412  loss 0.0123 ...``: the fields the row has."""
    parts = [f"step {row['step']}/{max_steps}"]
    parts += [f"{label} {fmt.format(row[k])}" for k, label, fmt in LOG_FIELDS if row.get(k) is not None]
    return "  ".join(parts)


def _mean(values: list[Any]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def plot_run(rows: list[dict[str, Any]], path: str | Path, title: str = "fastgrpo train") -> Path | None:
    """Reward (with its moving average), completion length and KL against step."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("reward", "reward"), ("completions/mean_length", "completion length (tokens)")]
    if any(r.get("kl") is not None for r in rows):
        panels.append(("kl", "KL to reference"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        ys = [r.get(key) for r in rows]
        xs = [s for s, y in zip(steps, ys, strict=True) if y is not None]
        ys = [y for y in ys if y is not None]
        ax.plot(xs, ys, lw=1, alpha=0.45 if key == "reward" else 1.0)
        if key == "reward" and len(ys) >= 5:
            w = max(2, len(ys) // 10)
            smooth = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2, label=f"moving mean ({w} steps)")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
