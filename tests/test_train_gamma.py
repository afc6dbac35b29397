"""Gamma (Eq. 10) on the training batch under 2-process FSDP2 and DDP equals the single-process value.

Each torchrun launch (gloo, 2 CPU processes) builds the trainer on the demo config's tiny Wan, measures
Gamma through the trainer's code (:mod:`pgdpo.train.gamma`) on its rank's first micro-batch of step 1
and saves that rank's inputs (``tests/_gamma_worker.py``). This process then builds the same run at
world size 1 (same seed: the random init is the same at any world size) and computes Gamma on the two
ranks' inputs put together -- through the trainer's code, and independently through
:func:`pgdpo.train.diagnostics.gamma_from_pred` (plain ``torch.autograd.grad`` on one graph) -- and the three
agree. The FSDP2 launch then trains a few steps with diagnostics on: metrics.jsonl and the plot.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgdpo.train.diffusion import NoisyPairs

from ._launch import DEMO, ROOT, run, tiny_pairs, torchrun

pytestmark = pytest.mark.distributed

#: float32 model and gradients (the dot products in float64). The two sides sum the same per-sample
#: gradients in different orders (FSDP2's reduce-scatter / DDP's all-reduce of two rank-local gradients vs
#: one backward over the [2B] batch): each gradient entry differs by a few float32 ulps (~1e-7
#: relative), which the dot product averages down; on this machine the distributed values differ from
#: the single-process one by ~5e-9 relative. 1e-6 leaves room for other CPUs / thread counts and is far
#: below a real error (a missing rank average or one rank's batch alone changes Gamma by >1e-2, checked).
RTOL = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def run_args(out, data, *extra):
    return ["--config", DEMO, "--output-dir", str(out), "--data.path", data, "--max-steps", "3",
            "--model.path", "null",  # the random-init tiny model (the demo's default is models/demo-base)
            "--logging.progress", "false", "--logging.trackers", "[]", "--validation.every", "0",
            "--train.batch_size", "4", "--train.micro_batch_size", "2", "--optim.warmup_steps", "0",
            "--logging.diagnostics_every", "1", *extra]


def launch(out, data, *extra):
    run(torchrun(2, str(ROOT / "tests" / "_gamma_worker.py"), *run_args(out, data, *extra)))
    return [load_file(str(Path(out) / f"gamma-rank{r}.safetensors")) for r in (0, 1)]


def joined(ranks: list[dict]):
    """The two ranks' micro-batches as one batch: [2B] tensors are all chosen halves, then all rejected."""
    b = ranks[0]["chosen"].shape[0]
    batch = {k: torch.cat([r[k] for r in ranks]) for k in ("chosen", "rejected", "encoder_hidden_states")}
    paired = {k: torch.cat([r[k][:b] for r in ranks] + [r[k][b:] for r in ranks])
              for k in ("noisy", "target", "model_timesteps")}
    pairs = NoisyPairs(**paired, **{k: torch.cat([r[k] for r in ranks]) for k in ("timesteps", "sigmas", "noise")})
    return batch, pairs


def single_process_gammas(tmp_path, data, ranks):
    """Gamma on the joined batch at world size 1: (through the trainer's code, through gamma_from_pred)."""
    from pgdpo.train.cli import resolve
    from pgdpo.train.diagnostics import gamma_from_pred
    from pgdpo.train.gamma import gamma_on_pairs
    from pgdpo.train.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg, _ = resolve(run_args(tmp_path / "single", data))
    trainer = Trainer(cfg)
    try:
        assert trainer.dist.world_size == 1
        lr = float(ranks[0]["lr"])
        assert lr == trainer.optimizer.param_groups[0]["lr"]
        batch, pairs = joined(ranks)
        step = trainer.step_fn
        via_trainer = gamma_on_pairs(step, trainer.params, pairs, batch, lr=lr, dist=trainer.dist)

        a = step.adapter
        with torch.no_grad():
            ref_pred = a.predict(step.reference, pairs.noisy, pairs.model_timesteps, batch)
        pred = a.predict(step.policy, pairs.noisy, pairs.model_timesteps, batch)
        options = dataclasses.asdict(step.loss.options)
        method = options.pop("method")
        independent = gamma_from_pred(pred, ref_pred, pairs.target, trainer.params, lr=lr, method=method,
                                      loss_kwargs={**options, "backend": "torch"}, retain_graph=False).gamma
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    return via_trainer, independent


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_gamma_two_processes_equals_single_process(tmp_path, data, strategy):
    extra = ("--distributed.strategy", strategy) + (("--then-train",) if strategy == "fsdp" else ())
    ranks = launch(tmp_path / strategy, data, *extra)
    assert [int(r["world_size"]) for r in ranks] == [2, 2]
    distributed = [float(r["gamma"]) for r in ranks]
    assert distributed[0] == distributed[1]  # one value on every rank (fully reduced)
    assert not torch.equal(ranks[0]["noisy"], ranks[1]["noisy"])  # two different micro-batches
    via_trainer, independent = single_process_gammas(tmp_path, data, ranks)
    assert distributed[0] != 0.0
    assert via_trainer == pytest.approx(independent, rel=RTOL)
    assert distributed[0] == pytest.approx(via_trainer, rel=RTOL)
    # one rank's micro-batch alone gives another value: the test would see a missing rank average
    half = {k: v for k, v in ranks[0].items()}
    alone, _ = single_process_gammas(tmp_path / "alone", data, [half, half])
    assert alone != pytest.approx(distributed[0], rel=1e-2)

    if strategy == "fsdp":  # the training launch that followed: diagnostics in metrics.jsonl and a plot
        out = tmp_path / strategy
        with open(out / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == [1, 2, 3]
        values = [r["Gamma"] for r in records]
        assert all(isinstance(v, float) and v != 0.0 for v in values)
        running = [sum(v > 0 for v in values[:i + 1]) / (i + 1) for i in range(len(values))]
        assert [r["Gamma_positive_fraction"] for r in records] == running
        assert (out / "gamma_statistic.png").stat().st_size > 0
