"""torchrun worker of ``tests/test_train_parallel.py``: set up ``pgdpo train`` (arguments as for the
command), take one optimiser step and one more backward, then write rank 0's bytes of policy weights,
gradients, AdamW states and reference (local shards, as they sit in memory) to
``<output_dir>/static.json``."""

import json
import os
import sys

import torch

from pgdpo.train.cli import resolve
from pgdpo.train.trainer import Trainer, step_seed


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def main():
    torch.set_num_threads(1)
    cfg, _ = resolve(sys.argv[1:])
    trainer = Trainer(cfg)
    try:
        stream = trainer.dataset.stream()
        trainer.train_step(1, stream)  # creates the optimiser states (and clears the gradients)
        batch = trainer._to_device(next(stream))
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, 2, trainer.dist.dp_rank, 0))
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
        trainer.finished = True  # a normal end: close() waits for rank 0's write
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    # as `python -m pgdpo` does under torchrun: a finished worker skips the interpreter's teardown, where
    # gloo's threads occasionally aborted it (pgdpo/__main__.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
