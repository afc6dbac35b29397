"""torchrun worker of ``tests/test_train_gamma.py``: builds the :class:`Trainer` (arguments as for
``pgdpo train``), measures Gamma through the trainer's code on its rank's first micro-batch of step 1,
and writes that rank's inputs (batch, noised inputs, timesteps, target) and the Gamma it got to
``<output_dir>/gamma-rank<r>.safetensors``; with ``--then-train`` it then trains (metrics.jsonl, plots)."""

import os
import sys

import torch
from safetensors.torch import save_file

from pgdpo.train.cli import resolve
from pgdpo.train.distributed import leave_finished_worker
from pgdpo.train.trainer import Trainer, step_seed


def main():
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    then_train = "--then-train" in argv
    argv = [a for a in argv if a != "--then-train"]
    cfg, _ = resolve(argv)
    trainer = Trainer(cfg)
    try:
        batch = trainer._to_device(next(trainer.dataset.stream()))
        lr = trainer.optimizer.param_groups[0]["lr"]
        gamma = trainer._measure_gamma(1, batch, lr)
        assert all(p.grad is None for p in trainer.params), "the Gamma pass left gradients behind"
        seed = step_seed(cfg.seed, 1, trainer.dist.dp_rank, 0)
        pairs = trainer.step_fn.noise_inputs(batch, torch.Generator().manual_seed(seed))
        tensors = {k: v.contiguous() for k, v in batch.items()}
        tensors.update({"noisy": pairs.noisy, "target": pairs.target, "model_timesteps": pairs.model_timesteps,
                        "timesteps": pairs.timesteps, "sigmas": pairs.sigmas, "noise": pairs.noise,
                        "gamma": torch.tensor(gamma, dtype=torch.float64),
                        "lr": torch.tensor(lr, dtype=torch.float64),
                        "world_size": torch.tensor(trainer.dist.world_size)})
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(cfg.output_dir, f"gamma-rank{trainer.dist.rank}.safetensors"))
        if then_train:
            trainer.gamma_meter.load_state_dict({"steps": [], "values": [], "delta_method": [],
                                                 "delta_baseline": []})  # the measurement above was a test
            trainer.train()
        trainer.finished = True  # a normal end: close() waits for every rank
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    leave_finished_worker()  # as `python -m pgdpo` does under torchrun
