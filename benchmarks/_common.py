"""What every benchmark shares: run metadata, timing, and the output conventions.

Each benchmark run prints a Markdown table, appends its rows (each carrying device, package
versions and git commit) to ``<out>/<name>.jsonl`` and ``<out>/<name>.csv``, and writes the
run's table and plots under ``<out>/<slug>/``, where ``slug`` names the device. ``<out>`` is
``--out``, by default ``./fastgrpo-bench`` (``default_out_dir``); the committed tables in
``benchmarks/results`` change only where ``--out`` names them. Each run ends with a line saying
where its results went.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PACKAGES = ("torch", "triton", "transformers", "peft", "liger-kernel", "trl")
QUANTILES = (0.5, 0.2, 0.8)


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """HEAD, or the COMMIT file a copied tree carries.

    A GPU machine's copy of the tree may hold a ``.git`` of another, older state (seen: HEAD named a
    commit weeks behind the tree), so COMMIT wins wherever git does not know that commit; in the
    checkout that wrote it, git knows it and HEAD is asked. Only a source checkout asks git: an
    installed package may sit inside someone else's repository.
    """
    if not (REPO / "pyproject.toml").is_file():
        return f"fastgrpo {version('fastgrpo')}"
    commit_file = REPO / "COMMIT"
    carried = commit_file.read_text().strip() if commit_file.is_file() else None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if carried and git("cat-file", "-e", f"{carried}^{{commit}}") is None:
        return carried
    return git("rev-parse", "HEAD") or carried or "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


# The command line a row records, as its user typed it: set by ``fastgrpo bench`` (``set_command``).
_COMMAND: list[str] | None = None


def set_command(words: Sequence[str] | None) -> None:
    """What ``environment`` records as the command, e.g. ``["fastgrpo", "bench", "ops", "--quick"]``;
    None: the script's own ``sys.argv`` again."""
    global _COMMAND
    _COMMAND = None if words is None else [str(w) for w in words]


def typed_command(words: Sequence[str] | None = None) -> str:
    """The command as typed, with no machine's paths: ``fastgrpo bench ...`` where the CLI ran it
    (``set_command``), else the script and its arguments; every absolute path inside the repository
    becomes relative to it, and one under the home folder starts with ``~``. Never the interpreter."""
    if words is None:
        words = _COMMAND if _COMMAND is not None else sys.argv
    return shlex.join(_unplaced(str(w)) for w in words)


def _unplaced(word: str) -> str:
    if not word.startswith("/"):
        return word
    path = Path(word)
    for base, shown in ((REPO, None), (Path.home(), "~")):
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        text = rel.as_posix() or "."
        return text if shown is None else f"{shown}/{text}"
    return word


def environment(device: torch.device) -> dict:
    """Metadata every result row carries."""
    return dict(
        device=device_name(device),
        **{pkg: version(pkg) for pkg in PACKAGES},
        python=sys.version.split()[0],
        git_commit=git_commit(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=typed_command(),
    )


def default_out_dir() -> Path:
    """``./fastgrpo-bench`` of the working directory, in a checkout too: a run leaves the committed tables
    in ``benchmarks/results`` alone unless its ``--out`` names them."""
    return Path.cwd() / "fastgrpo-bench"


# Every benchmark's --out help.
OUT_HELP = "results folder (default: ./fastgrpo-bench; --out benchmarks/results adds to the committed tables)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def failure(e: BaseException) -> str:
    """A row's status for an exception: "OOM", or the error's type and first line."""
    if is_oom(e):
        return "OOM"
    lines = str(e).strip().splitlines()
    return f"error: {type(e).__name__}: {lines[0] if lines else ''}"[:200]


# ----------------------------------------------------------------------------- command line


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A bench's parser: ``--help`` shows its module docstring laid out as written."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def default_help(defaults: dict, name: str) -> str:
    """The help text naming both defaults of an option that ``--quick`` changes; ``defaults[name]`` is
    (full run, --quick)."""
    full, quick = defaults[name]
    return f"default: {full} ({quick} with --quick)"


def fill_defaults(args: argparse.Namespace, defaults: dict) -> None:
    """Each option of ``defaults`` left unset takes its full-run or its ``--quick`` value: ``--quick``
    changes the defaults only, never what the command line names."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def ratio(a, b):
    """``a / b``, None where either is missing (or ``b`` is 0): a row's ratio to a row that may not be
    there, e.g. one that went OOM."""
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms=100, rep_ms=500, cpu_repeats=5):
    """(median, p20, p80) wall time of ``fn`` in ms.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, warm-up first).
    CPU: ``time.perf_counter`` over ``cpu_repeats`` calls after one warm-up call.
    """
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))
    fn()
    times = []
    for _ in range(cpu_repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(q.tolist())


class Budget:
    """``--time-budget``: whether the next run may start, from the time spent and the runs measured so far.

    ``record`` keeps each run's measurement, a tuple ending in its seconds, under its key (a backend, a
    trainer, a packing mode); a bench's subclass says in ``predict`` how the next run's seconds scale from
    them, since what a run's time grows with differs from bench to bench, and in ``clock`` which clock
    it reads (its module's ``_clock``, which its tests replace). ``exact_fit``: a run predicted to end
    exactly at the budget still starts.
    """

    exact_fit = False

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, self.clock()
        self.measured: dict[str, list[tuple]] = {}

    def clock(self) -> float:
        return time.perf_counter()

    def record(self, key: str, *measurement: float) -> None:
        self.measured.setdefault(key, []).append(measurement)

    def allows(self, predicted_s: float | None = None) -> bool:
        if self.seconds is None:
            return True
        spent = self.clock() - self.start
        end = spent + (predicted_s or 0.0)
        return (spent < self.seconds and end <= self.seconds) if self.exact_fit else end < self.seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def peak_extra_mib(fn: Callable[[], object], device: torch.device, base: int | None = None):
    """Call ``fn`` once: (its result, peak allocated MiB above ``base`` bytes), None on CPU.

    ``base`` defaults to what is allocated just before the call. The result is kept alive
    until the peak is read, so returned tensors (gradients) count.
    """
    if device.type != "cuda":
        return fn(), None
    free_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if base is None else base
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------- outputs


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Columns are (key, header, format); a missing value prints as '-'."""
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def append_rows(out: Path, name: str, rows: Iterable[dict], meta: dict, csv_fields: Sequence[str]) -> None:
    """Append rows, each with ``meta`` merged in, to ``out/name.jsonl`` and ``out/name.csv``.

    The CSV keeps a fixed column set (``csv_fields`` then the metadata keys) so runs from
    different machines stay one table; the JSON lines keep every field. An older CSV keeps its
    columns and rows; the columns it lacks are added at its end (its rows' cells there empty).
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**r, **meta} for r in rows]
    with open(out / f"{name}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    fields = [*csv_fields, *(k for k in meta if k not in csv_fields)]
    path = out / f"{name}.csv"
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        fields = widen_csv(path, fields)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def widen_csv(path: Path, fields: Sequence[str]) -> list[str]:
    """The CSV's header, with the ``fields`` it lacks appended; the file is rewritten (atomically, the
    old rows unchanged) only when some were lacking."""
    with open(path, newline="") as f:
        old = list(csv.reader(f))
    header = old[0] if old else []
    lacking = [k for k in fields if k not in header]
    if not lacking:
        return header
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, *lacking])
        writer.writerows(row + [""] * (len(header) + len(lacking) - len(row)) for row in old[1:])
    os.replace(tmp, path)
    return [*header, *lacking]


def write_run(run_dir: Path, name: str, title: str, meta: dict, table: str) -> Path:
    """The run's own Markdown file: title, command, environment line, table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    versions = ", ".join(f"{p} {meta[p]}" for p in PACKAGES if meta.get(p))
    path = run_dir / f"{name}.md"
    path.write_text(
        f"# {title}\n\n`{meta['command']}`\n\n{meta['device']}; {versions}; commit {meta['git_commit']}; "
        f"{meta['utc']}\n\n{table}\n"
    )
    return path


def line_plots(path: Path, panels: Sequence[dict], title: str) -> Path:
    """One PNG with a row of log-log panels; each panel is
    ``dict(title=, xlabel=, ylabel=, series={label: [(x, y), ...]})``; empty series are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, points in panel["series"].items():
            points = sorted(p for p in points if p[1] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(title=panel["title"], xlabel=panel["xlabel"], ylabel=panel["ylabel"], xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
