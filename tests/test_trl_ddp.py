"""fastgrpo's TRL trainer across 2 CPU processes (DDP over gloo): the first step's logged loss and
DDP-synchronized gradient equal one process's on the same global batch.

The launch is ``accelerate launch --multi_gpu --num_processes 2`` with ``use_cpu=True`` in the
config: accelerate 1.16's ``--cpu`` flag sends more than one process through MPI (it needs an
``--mpirun_hostfile``), while ``--multi_gpu`` starts torch's elastic launcher, and a CPU-only
``TrainingArguments`` then joins the processes over gloo.
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
from trl_ddp_script import DDP_CONFIG  # noqa: E402

from fastgrpo.integrations.trl import GRPOTrainer  # noqa: E402

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(parts):
    """Concatenate the ranks' micro-batches; completions are right-padded to one width."""
    width = max(p["completion_ids"].shape[1] for p in parts)
    assert len({p["prompt_ids"].shape[1] for p in parts}) == 1  # no extra left padding (positions)
    out = {}
    for key in parts[0]:
        if key == "num_items_in_batch":
            assert all(torch.equal(p[key], parts[0][key]) for p in parts)  # already global in TRL
            out[key] = parts[0][key]
            continue
        per_token = parts[0][key].dim() == 2 and not key.startswith("prompt")
        pad = [width - p["completion_ids"].shape[1] if per_token else 0 for p in parts]
        out[key] = torch.cat([torch.nn.functional.pad(p[key], (0, n)) for p, n in zip(parts, pad, strict=True)])
    return out


def replay(tmp_path, model_path, config: dict, logged_loss: float, frozen_head: bool = False):
    """One process on the ranks' micro-batches (inputs{rank}.pt) concatenated, as 2 x the per-device batch: its
    loss must be the one the ranks logged; returns the trainer, its gradients formed."""
    batch = _global_batch([torch.load(tmp_path / f"inputs{r}.pt") for r in range(2)])
    config = {**config, "per_device_train_batch_size": 2 * config["per_device_train_batch_size"]}
    tr = S.trainer(GRPOTrainer, tmp_path / "single", model_path, **config)
    if frozen_head:
        tr.model.get_output_embeddings().requires_grad_(False)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    loss = tr._compute_loss(tr.model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(logged_loss, rel=1e-5, abs=1e-7)
    return tr


def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    model_path = S.save_model(tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--main_process_port", str(_free_port()), str(HERE / "trl_ddp_script.py"), str(tmp_path), model_path]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == dict(result, world=2, backend="gloo", route="torch") and len(result["loss"]) == 1

    tr = replay(tmp_path, model_path, DDP_CONFIG, result["loss"][0])
    ddp_grads = torch.load(tmp_path / "grads.pt")
    for name, p in tr.model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
