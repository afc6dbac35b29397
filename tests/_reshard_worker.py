"""torchrun worker of ``tests/test_train_elastic.py``: ``pgdpo train`` (arguments as for the command,
with ``--resume CHECKPOINT``), which first writes the policy's and the optimiser's full state as loaded
(gathered from this run's shards; rank 0 writes ``<output_dir>/loaded.pt``), then trains on."""

import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from pgdpo.train.cli import resolve
from pgdpo.train.distributed import leave_finished_worker
from pgdpo.train.trainer import Trainer


def main():
    torch.set_num_threads(1)
    cfg, _ = resolve(sys.argv[1:])
    trainer = Trainer(cfg)
    try:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model, optim = get_state_dict(trainer.policy, trainer.optimizer, options=options)
        if trainer.is_main:
            torch.save({"model": model, "optim": optim, "start_step": trainer.start_step},
                       os.path.join(cfg.output_dir, "loaded.pt"))
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    leave_finished_worker()  # as `python -m pgdpo` does under torchrun
