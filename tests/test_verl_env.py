"""tests/test_verl.py against the real verl 0.9.1, in a side environment built on first use.

verl 0.9.1 pins ``transformers<5.11`` while fastgrpo's own environment carries a newer transformers,
so verl cannot be installed next to it. This test installs verl and exactly the packages that the
verl modules tests/test_verl.py imports need (found by experiment; each is needed: ``import verl``
imports ray, for one) with ``pip install --no-deps --target`` into a directory of its own, and runs
tests/test_verl.py in a subprocess with that directory first on ``PYTHONPATH``, where its pinned
transformers, tokenizers, huggingface_hub and kernels shadow the environment's newer ones. Nothing
is installed into the running environment.

The directory is cached under ``~/.cache/fastgrpo/verl-<key>`` (``XDG_CACHE_HOME`` honoured), the
key hashing the pins, the Python version and the platform. It is built in a temporary directory
beside it and renamed into place, so a killed run never leaves a half-installed cache. With no
registry to install from, the test fails: it never skips.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import side_env

ROOT = Path(__file__).resolve().parents[1]
PINNED = (
    "verl==0.9.1",  # the package under test
    "transformers==5.10.4",  # verl: transformers>=5.5.3,!=5.6.0,<5.11
    "tokenizers==0.22.2",  # transformers 5.10.4's import-time check: tokenizers<=0.23.0,>=0.22.0
    "huggingface_hub==1.33.0",  # transformers 5.10.4: huggingface-hub>=1.5.0,<2.0
    "kernels==0.12.3",  # transformers 5.10.4 wants kernels<0.13; the environment's newer one breaks its import
    "httpx==0.29.0",  # huggingface_hub 1.x
    "httpcore==1.0.9",  # httpx
    "ray==2.60.0",  # verl/protocol.py, imported by verl/__init__.py
    "msgpack==1.2.4",  # ray
    "protobuf==7.36.2",  # ray (generated *_pb2 modules)
    "requests==2.34.2",  # ray
    "urllib3==2.8.0",  # requests
    "certifi==2026.10.19.post1",  # requests
    "jsonschema==4.26.0",  # ray
    "jsonschema-specifications==2025.9.1",  # jsonschema
    "referencing==0.37.0",  # jsonschema
    "rpds-py==2026.9.1",  # referencing
    "attrs==26.1.0",  # jsonschema, referencing
    "tensordict==0.10.0",  # verl/protocol.py; verl: tensordict>=0.8.0,!=0.9.0,<=0.10.0
    "pyvers==0.1.0",  # tensordict
    "cloudpickle==3.1.3",  # tensordict
    "omegaconf==2.4.0",  # verl's configs (verl.workers.config)
    "codetiming==1.4.0",  # verl.workers.config.model
    "orjson==3.13.0",  # verl.workers.config.model
)
CUDA_ONLY = "verl's Triton kernel needs CUDA"  # the one skip reason allowed in tests/test_verl.py


def _verl_env() -> Path:
    def build(folder: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-input", "--disable-pip-version-check"]
        cmd += ["--no-deps", "--only-binary=:all:", "--target", str(folder), *PINNED]
        side_env.run(cmd, "installing verl's side environment", timeout=1800)

    return side_env.cached("verl", PINNED, build)


@pytest.mark.slow
def test_adapter_against_real_verl(tmp_path):
    target = _verl_env()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")])))
    report = tmp_path / "verl.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_verl.py", "-rs"]
    out = subprocess.run(
        [*cmd, f"--junitxml={report}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]

    outcomes = {}  # test name -> "passed" or the skip reason
    for case in ET.parse(report).iter("testcase"):
        skipped = case.find("skipped")
        outcomes[case.get("name")] = "passed" if skipped is None else skipped.get("message", "")
    not_cuda = {name: why for name, why in outcomes.items() if why not in ("passed", CUDA_ONLY)}
    reasons = sorted(set(not_cuda.values()))
    assert not not_cuda, f"{len(not_cuda)} tests skipped with verl on PYTHONPATH={target}: {reasons}"
    for name in ("test_signature_matches_verls", "test_hf_model_config_external_lib_installs"):
        assert outcomes.get(name) == "passed", (name, out.stdout[-3000:])
