"""The example scripts run as users run them (tiny, offline settings)."""

import importlib.util
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_loop_runs():
    runpy.run_path(str(EXAMPLES / "custom_loop.py"), run_name="__main__")


def test_trl_example_trains_the_tiny_model_through_fastgrpo(embedded, tmp_path):
    pytest.importorskip("trl")
    trainer = _load("trl_grpo").main(["--tiny", "--max_steps", "2", "--output_dir", str(tmp_path)])
    rows = [row for row in trainer.state.log_history if "reward" in row]
    assert len(rows) == 2 and trainer.fastgrpo_last_route == "torch"
    assert all(row["loss"] == row["loss"] for row in rows)  # finite, logged under TRL's names
