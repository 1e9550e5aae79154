"""One GRPO step of fastgrpo's TRL trainer under ``accelerate launch`` (tests/test_trl_ddp.py).

    accelerate launch --multi_gpu --num_processes 2 tests/trl_ddp_script.py OUT MODEL_DIR  (CPU: gloo)

Every rank saves the inputs its ``_compute_loss`` saw; rank 0 saves the synchronized gradient
before the optimizer step and the logged loss, so one process can replay the global batch.
"""

import json
import sys
from pathlib import Path

import torch
import trl.trainer.utils as trl_utils
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
import trl_support as S  # noqa: E402

from fastgrpo.integrations.trl import GRPOTrainer  # noqa: E402

# Prompts of one length: TRL passes no position ids, so extra left padding in the replayed global
# batch would shift positions.
DDP_CONFIG = dict(per_device_train_batch_size=4, beta=0.04, max_steps=1, max_grad_norm=0.0)


def main(out: Path, model_path: str) -> None:
    def refuse(*a, **k):
        raise AssertionError("TRL's chunked log-prob head ran")

    trl_utils._ChunkedLogProbFunction.apply = refuse
    tr = S.trainer(GRPOTrainer, out / "run", model_path, train_dataset=S.dataset(16, fixed_length=True), **DDP_CONFIG)
    rank = tr.accelerator.process_index
    compute = tr._compute_loss

    def recording(model, inputs):
        torch.save({k: v.detach().cpu() for k, v in inputs.items() if torch.is_tensor(v)}, out / f"inputs{rank}.pt")
        return compute(model, inputs)

    tr._compute_loss = recording

    class SaveGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if rank == 0:
                grads = {n: p.grad.detach().cpu() for n, p in tr.accelerator.unwrap_model(model).named_parameters()}
                torch.save(grads, out / "grads.pt")

    tr.add_callback(SaveGrads())
    tr.train()
    if rank == 0:
        loss = [row["loss"] for row in tr.state.log_history if "loss" in row and "train_loss" not in row]
        world, backend = tr.accelerator.num_processes, torch.distributed.get_backend()
        result = dict(loss=loss, world=world, backend=backend, route=tr.fastgrpo_last_route)
        (out / "result.json").write_text(json.dumps(result))
    # An orderly teardown: a rank that exits with gloo's threads still up can abort in their destructor
    # ("terminate called without an active exception", SIGABRT; seen once in CI after a finished step).
    tr.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
