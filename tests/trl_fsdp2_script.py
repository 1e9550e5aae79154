"""One GRPO step of fastgrpo's TRL trainer under ``accelerate launch`` with FSDP2 (tests/test_trl_fsdp2.py).

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
        --fsdp_transformer_layer_cls_to_wrap Qwen2DecoderLayer tests/trl_fsdp2_script.py OUT MODEL_DIR

On CPU (``use_cpu=True``) the processes join over gloo, and ``allow_fsdp_on_cpu`` lets accelerate's FSDP plugin take
effect (see there). Every rank saves the inputs its ``_compute_loss`` saw, the lm_head weight's placement at that
point and the weight each head pass was handed. Before the optimizer step every rank gathers the sharded gradients
(``full_tensor`` is a collective) and records its parameters' placements and local shapes; rank 0 saves the gradients
and the logged loss, so one process can replay the global batch. ``--no-cpu-shim`` after the two paths runs without
the shim (accelerate then falls back to DDP on CPU: ``distributed_type`` is ``MULTI_CPU`` in result.json).
"""

import json
import sys
from pathlib import Path

import torch
import trl.trainer.utils as trl_utils
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
import trl_support as S  # noqa: E402

import fastgrpo.integrations.trl as fastgrpo_trl  # noqa: E402
from fastgrpo.integrations.trl import GRPOTrainer  # noqa: E402

# As tests/trl_ddp_script.py: prompts of one length (TRL passes no position ids, so extra left padding in the
# replayed global batch would shift positions).
FSDP2_CONFIG = dict(per_device_train_batch_size=4, beta=0.04, max_steps=1, max_grad_norm=0.0)
# ``--frozen-head``: the lm_head frozen (as under LoRA) on a route whose backward reads the weight again (GSPO).
FROZEN_HEAD_CONFIG = dict(FSDP2_CONFIG, importance_sampling_level="sequence", loss_type="grpo")

SHIM_APPLIED: list = []  # non-empty once allow_fsdp_on_cpu turned a MULTI_CPU state into FSDP


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin take effect in CPU processes.

    accelerate 1.16 (``AcceleratorState.__init__``, accelerate/state.py) sets ``DistributedType.FSDP`` and
    ``fsdp_plugin`` only inside its branch for ``MULTI_GPU`` / ``MULTI_XPU`` / ``MULTI_NPU`` / ... processes. With
    ``use_cpu=True`` the state is ``MULTI_CPU``, and ``--use_fsdp`` (``ACCELERATE_USE_FSDP=true``) or an explicit
    ``fsdp_plugin`` is dropped without a word: ``prepare_model`` wraps the model in DDP. torch's ``fully_shard``
    itself supports a CPU mesh over gloo. This makes the assignments accelerate makes for GPUs when the state came out
    ``MULTI_CPU`` with a plugin, including the copy into ``PartialState``'s shared state (every later
    ``AcceleratorState()`` re-reads ``distributed_type`` from it). Everything after (``fsdp2_prepare_model``,
    TRL's ``prepare_fsdp`` of the reference model, generation, clipping, the optimizer) is the libraries' own
    FSDP2 code. A no-op if accelerate ever enables FSDP on CPU itself.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            SHIM_APPLIED.append(True)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = __init__


def _placements(t) -> str:
    return str(tuple(t.placements)) if isinstance(t, DTensor) else type(t).__name__


def main(out: Path, model_path: str, shim: bool = True, frozen_head: bool = False) -> None:
    def refuse(*a, **k):
        raise AssertionError("TRL's chunked log-prob head ran")

    trl_utils._ChunkedLogProbFunction.apply = refuse
    if shim:
        allow_fsdp_on_cpu()

    # The weight fastgrpo's head ops are handed (after the patched forward's DTensor gather): it goes through
    # maybe_gather_lm_head_ctx, looked up in fastgrpo's module on every call.
    head_calls = []
    gather_lm_head_ctx = fastgrpo_trl.maybe_gather_lm_head_ctx

    def recording_ctx(weight, bias):
        head_calls.append(dict(type=type(weight).__name__, shape=list(weight.shape)))
        return gather_lm_head_ctx(weight, bias)

    fastgrpo_trl.maybe_gather_lm_head_ctx = recording_ctx

    config = FROZEN_HEAD_CONFIG if frozen_head else FSDP2_CONFIG
    tr = S.trainer(GRPOTrainer, out / "run", model_path, train_dataset=S.dataset(16, fixed_length=True), **config)
    if frozen_head:
        tr.model.get_output_embeddings().requires_grad_(False)
    rank = tr.accelerator.process_index
    compute = tr._compute_loss
    seen = []

    def recording(model, inputs):
        torch.save({k: v.detach().cpu() for k, v in inputs.items() if torch.is_tensor(v)}, out / f"inputs{rank}.pt")
        head = tr.accelerator.unwrap_model(model).get_output_embeddings()
        seen.append(dict(type=type(model).__name__, lm_head=_placements(head.weight)))
        return compute(model, inputs)

    tr._compute_loss = recording

    class SaveGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            params = list(tr.accelerator.unwrap_model(model).named_parameters())
            local = {n: list((p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in params}
            layout = dict(placements={n: _placements(p) for n, p in params}, local_shapes=local)
            (out / f"params{rank}.json").write_text(json.dumps(layout))
            # full_tensor is a collective: every rank gathers, in the same order.
            grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in params}
            if rank == 0:
                torch.save({n: None if g is None else g.detach().cpu() for n, g in grads.items()}, out / "grads.pt")

    tr.add_callback(SaveGrads())
    tr.train()
    (out / f"seen{rank}.json").write_text(json.dumps(dict(compute_loss=seen, head_calls=head_calls)))
    if rank == 0:
        loss = [row["loss"] for row in tr.state.log_history if "loss" in row and "train_loss" not in row]
        plugin = getattr(tr.accelerator.state, "fsdp_plugin", None)  # absent where accelerate dropped --use_fsdp
        result = dict(
            loss=loss,
            world=tr.accelerator.num_processes,
            backend=torch.distributed.get_backend(),
            route=tr.fastgrpo_last_route,
            distributed_type=str(tr.accelerator.distributed_type),
            fsdp_version=None if plugin is None else plugin.fsdp_version,
            is_fsdp_enabled=bool(tr.is_fsdp_enabled),
            cpu_shim_applied=bool(SHIM_APPLIED),
        )
        (out / "result.json").write_text(json.dumps(result))
    # An orderly teardown, as in tests/trl_ddp_script.py: gloo's threads can abort a rank that exits without it.
    tr.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    flags = sys.argv[3:]
    main(Path(sys.argv[1]), sys.argv[2], shim="--no-cpu-shim" not in flags, frozen_head="--frozen-head" in flags)
