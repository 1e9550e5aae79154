"""fastgrpo's TRL trainer across 2 CPU processes under FSDP2 (gloo): the first step's logged loss and the gathered
FSDP2 gradient equal one process's on the same global batch, as tests/test_trl_ddp.py checks for DDP.

The launch is ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2`` with ``use_cpu=True`` in the TRL
config. accelerate 1.16 turns ``--use_fsdp`` into ``DistributedType.FSDP`` only for accelerator processes
(``AcceleratorState.__init__`` sets it inside its ``MULTI_GPU`` / ``MULTI_XPU`` / ... branch): in CPU processes the
state is ``MULTI_CPU``, the flag is dropped without a word and the model is wrapped in DDP. The per-rank script
(tests/trl_fsdp2_script.py, ``allow_fsdp_on_cpu``) makes the assignment accelerate makes for GPUs; from there on
the sharding (``fsdp2_prepare_model``: torch's ``fully_shard`` on a CPU mesh), TRL's ``prepare_fsdp`` of the
reference model, generation, clipping and the optimizer step are the libraries' own FSDP2 code. Each test checks
that the worker really ran sharded (every parameter a ``Shard(0)`` DTensor, the rows split over the ranks), so it
cannot pass with FSDP off.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")
import trl_support as S  # noqa: E402
from test_trl_ddp import replay  # noqa: E402
from trl_fsdp2_script import FROZEN_HEAD_CONFIG, FSDP2_CONFIG  # noqa: E402

HERE = Path(__file__).parent
FSDP2_FLAGS = ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1"]
FSDP2_FLAGS += ["--mixed_precision", "no", "--dynamo_backend", "no"]
FSDP2_FLAGS += ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
EXPECTED = dict(world=2, backend="gloo", route="torch", distributed_type="DistributedType.FSDP", fsdp_version=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, model_path, wrap: str, *flags: str) -> dict:
    """Runs the per-rank script on 2 processes; ``wrap``: the module classes accelerate gives their own FSDP2 unit
    (the root model is one too). Returns rank 0's result.json."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *FSDP2_FLAGS]
    cmd += ["--fsdp_transformer_layer_cls_to_wrap", wrap, "--main_process_port", str(_free_port())]
    cmd += [str(HERE / "trl_fsdp2_script.py"), str(tmp_path), model_path, *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == dict(result, **EXPECTED, is_fsdp_enabled=True) and len(result["loss"]) == 1
    return result


def _seen(tmp_path, rank) -> dict:
    return json.loads((tmp_path / f"seen{rank}.json").read_text())


def _replay(tmp_path, model_path, result, frozen_head: bool = False) -> list[str]:
    """One process, the ranks' micro-batches concatenated: the loss must be the logged one; returns the names of the
    parameters whose gathered FSDP2 gradient differs from this process's, after checking the sharding."""
    config = FROZEN_HEAD_CONFIG if frozen_head else FSDP2_CONFIG
    tr = replay(tmp_path, model_path, config, result["loss"][0], frozen_head)

    params = dict(tr.model.named_parameters())
    for r in range(2):  # every parameter was a DTensor sharded on dim 0 over the 2 ranks, in the optimizer's hands
        layout = json.loads((tmp_path / f"params{r}.json").read_text())
        assert sorted(layout["placements"]) == sorted(params)
        assert set(layout["placements"].values()) == {"(Shard(dim=0),)"}, layout["placements"]
    shapes = [json.loads((tmp_path / f"params{r}.json").read_text())["local_shapes"] for r in range(2)]
    for name, p in params.items():
        rows = [s[name][0] for s in shapes]
        assert rows == [(p.shape[0] + 1) // 2, p.shape[0] // 2], name  # torch.chunk's split: each rank holds part
        assert all(s[name][1:] == list(p.shape[1:]) for s in shapes), name

    fsdp_grads = torch.load(tmp_path / "grads.pt")
    assert sorted(fsdp_grads) == sorted(params)
    mismatched = []
    for name, p in params.items():
        try:
            torch.testing.assert_close(fsdp_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
        except AssertionError:
            mismatched.append(name)
    return mismatched


def test_two_fsdp2_processes_match_one_process_on_the_global_batch(tmp_path):
    """Decoder layers in their own units; the tied embedding / lm_head in the root unit, which FSDP2 gathers before
    the forward: fastgrpo's head reads the gathered weight."""
    model_path = S.save_model(tmp_path / "model")
    result = _launch(tmp_path, model_path, "Qwen2DecoderLayer")
    for r in range(2):
        seen = _seen(tmp_path, r)
        # accelerate re-classes the model in place (no DDP wrapper); fastgrpo's head passes (reference, loss) had the
        # full (63, 32) weight.
        assert [c["type"] for c in seen["compute_loss"]] == ["FSDPQwen2ForCausalLM"]
        assert len(seen["head_calls"]) == 2 and all(c["shape"] == [63, 32] for c in seen["head_calls"])
    assert _replay(tmp_path, model_path, result) == []


def test_lm_head_in_its_own_fsdp2_unit(tmp_path):
    """An untied lm_head in its own unit (``Linear`` wrapped too): fastgrpo never calls the lm_head module, so FSDP2
    never gathers it and the patched forward meets a ``Shard(0)`` DTensor. It gathers it with the unit's own
    ``unshard``, so FSDP2 reduce-scatters its gradient across the ranks (``full_tensor()`` did not: its backward
    kept each rank's rows of that rank's own gradient, twice the rank's share instead of the average)."""
    model_path = S.save_model(tmp_path / "model", tie=False)
    result = _launch(tmp_path, model_path, "Qwen2DecoderLayer,Linear")
    for r in range(2):
        seen = _seen(tmp_path, r)
        assert seen["compute_loss"] == [dict(type="FSDPQwen2ForCausalLM", lm_head="(Shard(dim=0),)")]
        assert len(seen["head_calls"]) == 2 and all(c["shape"] == [63, 32] for c in seen["head_calls"])
    assert _replay(tmp_path, model_path, result) == []


def test_frozen_lm_head_in_its_own_fsdp2_unit(tmp_path):
    """The lm_head frozen (as under LoRA) in its own unit, on GSPO's 4-pass route, whose backward reads the weight
    again: the unit stays gathered until FSDP2's end of backward (resharding it right after the head pass freed the
    storage the backward had saved); the other gradients match one process and the head has none."""
    model_path = S.save_model(tmp_path / "model", tie=False)
    result = _launch(tmp_path, model_path, "Qwen2DecoderLayer,Linear", "--frozen-head")
    assert result["route"] == "torch"
    assert _replay(tmp_path, model_path, result, frozen_head=True) == []
    assert torch.load(tmp_path / "grads.pt")["lm_head.weight"] is None
