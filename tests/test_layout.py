"""The package layout: one wing per use, imports only downward, no import circle, and a
micro-batch's path from the update to the fused loss that never returns to sampling.

The import graph is read from the source (every ``import``, also those inside functions), so a
lazy import cannot hide a circle. Implicit parent-package imports are not edges.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The package each source folder is installed as (pyproject's package-dir).
PACKAGES = {
    "fastgrpo": ROOT / "fastgrpo",
    "fastgrpo.kernels": ROOT / "kernels",
    "fastgrpo.benchmarks": ROOT / "benchmarks",
}
WINGS = ("fastgrpo.ops", "fastgrpo.train", "fastgrpo.integrations")
# Who may import whom, by prefix: a module under the key imports nothing under the values.
FORBIDDEN = {
    "fastgrpo.ops": ("fastgrpo.train", "fastgrpo.integrations", "fastgrpo.benchmarks", "fastgrpo.cli", "fastgrpo.demo"),
    "fastgrpo.kernels": ("fastgrpo.ops", "fastgrpo.train", "fastgrpo.integrations", "fastgrpo.benchmarks"),
    "fastgrpo.train": ("fastgrpo.integrations", "fastgrpo.benchmarks", "fastgrpo.cli", "fastgrpo.demo"),
    "fastgrpo.integrations": ("fastgrpo.train", "fastgrpo.benchmarks", "fastgrpo.cli", "fastgrpo.demo"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "fastgrpo" and parts and parts[0] in ("kernels", "benchmarks"):
                continue
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """fastgrpo module -> the fastgrpo modules it imports (anywhere in its body)."""
    known = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        package = module if is_package else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for target in targets:
                if target.startswith("fastgrpo") and (hit := _resolve(target, known)) and hit != module:
                    edges.add(hit)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_wings_exist_and_every_module_sits_in_one():
    modules = set(_modules())
    assert set(WINGS) <= modules
    top = {m for m in modules if m.count(".") == 1 and m not in (*WINGS, "fastgrpo.kernels", "fastgrpo.benchmarks")}
    # Only the entry points stay at the top; everything else belongs to a wing.
    assert top == {"fastgrpo.cli", "fastgrpo.demo"}


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "fastgrpo.ops.loss" in graph["fastgrpo.ops.api"]  # from .loss import ...
    assert "fastgrpo.kernels" in graph["fastgrpo.ops.api"]  # from ..kernels import ..., inside a function
    assert "fastgrpo.ops" in graph["fastgrpo.train.policy"]  # from ..ops import ...
    assert "fastgrpo.train.trainer" in graph["fastgrpo.cli"]  # lazy, in main()


def test_no_import_circle():
    assert _cycles(import_graph()) == []
    # The check itself finds a circle when there is one.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_trainer_never_knows_the_embedded_default():
    """No model named is resolved into an ordinary config before the trainer exists (embedded.resolve):
    nothing the trainer imports, directly or not, is the embedded task."""
    graph = import_graph()
    assert "fastgrpo.train.embedded" in _reachable(graph, "fastgrpo.train.run")  # the check can see it
    assert sorted(m for m in _reachable(graph, "fastgrpo.train.trainer") if ".embedded" in m) == []


def test_wings_import_only_downward():
    bad = [
        (module, target)
        for module, targets in import_graph().items()
        for wing, forbidden in FORBIDDEN.items()
        if module == wing or module.startswith(wing + ".")
        for target in targets
        if target.startswith(forbidden)
    ]
    assert bad == []


def micro_batch_walk(trainer, batch) -> list[tuple[str, list[str]]]:
    """fastgrpo modules entered, in order (consecutive calls in one module merged), while the
    update's first micro-batch goes from ``accumulate_gradients`` to the loss value."""
    updater = trainer.updater
    micro = updater.micro_batches(batch)[:1]
    walk: list[tuple[str, list[str]]] = []
    done = []

    def profile(frame, event, arg):
        if event != "call" or done:
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("fastgrpo"):
            return
        name = frame.f_code.co_name
        if walk and walk[-1][0] == module:
            if name not in walk[-1][1]:
                walk[-1][1].append(name)
        else:
            walk.append((module, [name]))
        if name == "grpo_loss_from_logprobs":
            done.append(True)

    sys.setprofile(profile)
    try:
        updater.accumulate_gradients(batch, micro)
    finally:
        sys.setprofile(None)
    trainer.optimizer.zero_grad(set_to_none=True)
    return walk


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_a_micro_batch_reads_top_to_bottom(embedded, tmp_path, padding_free, capsys):
    from fastgrpo.train.trainer import GRPOTrainer

    from helpers import train_config

    trainer = GRPOTrainer(train_config(embedded, tmp_path, max_steps=1, padding_free=padding_free))
    walk = micro_batch_walk(trainer, trainer.sample_batch())
    with capsys.disabled():
        print(f"\nmicro-batch walk ({'packed' if padding_free else 'padded'}):")
        for i, (module, funcs) in enumerate(walk, 1):
            print(f"  {i:2}. {module}: {', '.join(funcs)}")
    modules = [m for m, _ in walk]
    assert modules[0] == "fastgrpo.train.update" and modules[-1] == "fastgrpo.ops.loss"
    assert "fastgrpo.train.sampling" not in modules  # no return trip to the sampling module
    # Once in the fused op, the path stays there (or goes further down, into the kernels' helpers): nothing calls
    # back into the trainer's wing.
    first_op = modules.index("fastgrpo.ops.api")
    assert all(m.startswith(("fastgrpo.ops", "fastgrpo.kernels")) for m in modules[first_op:])
    assert modules.index("fastgrpo.train.policy") < first_op


def calls_into(module: str, run) -> list[tuple[str, str]]:
    """(calling module, function) for every call that enters ``module`` from another fastgrpo module
    while ``run()`` runs."""
    seen: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call" or frame.f_globals.get("__name__") != module or frame.f_back is None:
            return
        caller = frame.f_back.f_globals.get("__name__", "")
        if caller.startswith("fastgrpo") and caller != module:
            seen.append((caller, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def test_nothing_below_the_trainer_calls_back_into_it(embedded, tmp_path, monkeypatch):
    """Control flows one way: what the trainer uses (updater, sampling, rewards, checkpoints, ...) never
    calls the trainer, through construction (bf16 weights: the Kahan choice reads the memory plan), a
    good step and a step whose loss is NaN (the trainer saves on the updater's exception)."""
    import fastgrpo.train.update as update
    from fastgrpo.train.trainer import GRPOTrainer, NonFiniteLossError

    from helpers import train_config

    below = _reachable(import_graph(), "fastgrpo.train.trainer")
    assert {"fastgrpo.train.update", "fastgrpo.train.sampling.hf", "fastgrpo.train.rewards"} <= below
    made: list = []
    cfg = train_config(embedded, tmp_path, max_steps=2, dtype="bfloat16", kahan_summation=None)
    calls = calls_into("fastgrpo.train.trainer", lambda: made.append(GRPOTrainer(cfg)))
    trainer = made[0]
    real = update.policy_loss

    def nan_in_step_2(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if trainer.step == 1 else out

    monkeypatch.setattr(update, "policy_loss", nan_in_step_2)

    def two_steps():
        with pytest.raises(NonFiniteLossError, match="at step 2"):
            trainer.train()

    calls += calls_into("fastgrpo.train.trainer", two_steps)
    assert [c for c in calls if c[0] in below] == []


def test_every_package_is_installed():
    """A subpackage missing from pyproject's explicit list works in a source checkout and is
    missing from a wheel; compare the list with the folders."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, path in _modules().items() if path.name == "__init__.py"}
    assert listed == folders


def test_the_kernels_folder_does_not_shadow_hugging_face_kernels():
    """From the checkout's root (``python -m pytest``, ``python -c``), ``import kernels`` must reach
    the installed Hugging Face package that transformers imports, never our ``kernels/`` folder;
    where none is installed (transformers before 5.25 does not need it), it gets an empty module
    with no version, which transformers reads as unavailable, and neither import fails."""
    import importlib.metadata
    import subprocess

    # Hides an installed Hugging Face ``kernels`` from the path search, as on an image without it.
    hide = (
        "import importlib.machinery as m, os\n"
        "find = m.PathFinder.find_spec\n"
        "def find_spec(name, path=None, target=None):\n"
        "    spec = find(name, path, target)\n"
        f"    ours = spec is not None and os.path.dirname(spec.origin or '') == {str(ROOT / 'kernels')!r}\n"
        "    return None if name == 'kernels' and spec is not None and not ours else spec\n"
        "m.PathFinder.find_spec = find_spec\n"
    )
    # Hidden, only the import itself is probed: the installed distribution's metadata stays visible, and
    # transformers 5.25 would take it for a real install.
    probe = (
        "import kernels\n"
        "names = [n for n in dir(kernels) if n[0] != '_']\n"
        "print(kernels.__file__, getattr(kernels, '__version__', 'N/A'), len(names))\n"
        "import fastgrpo.kernels\nprint(fastgrpo.kernels.linear_logprobs_triton.__module__)\n"
    )
    for hidden in (False, True):
        code = hide + probe if hidden else "import transformers.models.qwen2.modeling_qwen2\n" + probe
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        found, version, names, ours = out.stdout.split()
        try:
            installed = not hidden and bool(importlib.metadata.version("kernels"))
        except importlib.metadata.PackageNotFoundError:
            installed = False
        if installed:
            assert Path(found).resolve().parent != ROOT / "kernels" and version != "N/A"
        else:
            assert Path(found).resolve().parent == ROOT / "kernels" and (version, names) == ("N/A", "0")
        assert ours == "fastgrpo.kernels.linear_logprobs"
