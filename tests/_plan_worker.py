"""torchrun worker of ``tests/test_train_parallel.py`` and ``tests/test_plan.py``: set up ``pgdpo train``
(arguments as for the command), take one optimiser step and one more backward, then write rank 0's bytes
of policy weights, gradients, AdamW states and reference (local shards, as they sit in memory) to
``<output_dir>/static.json``, and the collectives rank 0 issued during one whole optimiser step (the
second: after FSDP2's lazy initialisation) to ``<output_dir>/collectives.json``: one record per call,
``{"op", "tensors"}`` with the bytes of each tensor argument in call order (for an all-gather: output,
input; a reduce-scatter: output, input; an all-reduce: the tensors; an all-to-all: output, input or, for
the functional one, input). On gloo FSDP2 all-gathers with pgdpo's ``InPlaceAllGather`` (one broadcast
per rank): recorded as one ``pgdpo.in_place_all_gather`` call (output, input), its broadcasts not."""

import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pgdpo.train.cli import resolve
from pgdpo.train.distributed import InPlaceAllGather, leave_finished_worker
from pgdpo.train.trainer import Trainer, step_seed


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class RecordCollectives(TorchDispatchMode):
    """Every c10d / functional-collective op dispatched on this rank, with the bytes of its tensors."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self._inside_all_gather = False
        self._all_gather = InPlaceAllGather.__call__

    def __enter__(self):
        recorder, original = self, self._all_gather

        def recorded(comm, output_tensor, input_tensor, group, async_op=False):
            recorder.calls.append({"op": "pgdpo.in_place_all_gather",
                                   "tensors": [output_tensor.numel() * output_tensor.element_size(),
                                               input_tensor.numel() * input_tensor.element_size()]})
            recorder._inside_all_gather = True
            try:
                return original(comm, output_tensor, input_tensor, group, async_op)
            finally:
                recorder._inside_all_gather = False
        InPlaceAllGather.__call__ = recorded
        return super().__enter__()

    def __exit__(self, *exc):
        InPlaceAllGather.__call__ = self._all_gather
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.namespace
        if namespace in ("c10d", "_c10d_functional") and not self._inside_all_gather:
            tensors = [t.untyped_storage().nbytes() if t.dim() == 0 else t.numel() * t.element_size()
                       for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
            self.calls.append({"op": f"{namespace}.{func._opname}", "tensors": tensors})
        return func(*args, **(kwargs or {}))


def main():
    torch.set_num_threads(1)
    cfg, _ = resolve(sys.argv[1:])
    trainer = Trainer(cfg)
    try:
        stream = trainer.dataset.stream()
        trainer.train_step(1, stream)  # creates the optimiser states (and clears the gradients)
        with RecordCollectives() as recorder:
            trainer.train_step(2, stream)
        batch = trainer._to_device(next(stream))
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, 3, trainer.dist.dp_rank, 0))
        trainer.step_fn(batch, gen).loss.backward()
        params = [p for p in trainer.model.parameters()]
        states = [v for st in trainer.optimizer.state.values() for k, v in st.items()
                  if k in ("exp_avg", "exp_avg_sq")]
        measured = {
            "policy weights": sum(local(p).nbytes for p in params),
            "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
            "optimizer states": sum(local(v).nbytes for v in states),
            "reference": sum(local(p).nbytes for p in trainer.reference.parameters())
            if trainer.reference is not None else 0,
        }
        if trainer.is_main:
            with open(os.path.join(cfg.output_dir, "static.json"), "w") as f:
                json.dump(measured, f)
            with open(os.path.join(cfg.output_dir, "collectives.json"), "w") as f:
                json.dump(recorder.calls, f)
        trainer.finished = True  # a normal end: close() waits for rank 0's write
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    leave_finished_worker()  # as `python -m pgdpo` does under torchrun
