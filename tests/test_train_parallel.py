"""Sequence parallelism (``distributed.sp_degree``, Ulysses) and the memory options, in real 2-process runs.

``sp_degree 2`` over 2 processes is one data-parallel group: the two ranks run the same pairs, each on
half of every video's tokens. It must train as one process does: the same losses and gradient norms
step for step, and the same weights at the end (which also checks the gradient direction, which Adam's
normalised first steps would hide from the weights alone), for text-to-video and image-to-video, with
a frozen copy and with the LoRA adapters-off reference.

AdamW runs with ``eps = 1`` here: its update is then about ``lr * g`` (the gradient's direction and size)
instead of ``lr * sign(g)``, which would turn float-rounding differences of near-zero gradient entries
(the LoRA B matrices start at zero) into differences of ``lr`` in the weights.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgdpo.train.data.synth import synth_dataset

from ._launch import DEMO, ROOT, kill_when, records, run, torchrun

pytestmark = pytest.mark.distributed

STEPS = 3


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synth_dataset(root / "t2v", pairs=8, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    synth_dataset(root / "i2v", pairs=8, task="i2v", latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32,
                  image_len=8, image_dim=24, progress=False)
    return {"t2v": str(root / "t2v"), "i2v": str(root / "i2v")}


def train_args(out, data, model, steps=STEPS, *extra):
    return ["-m", "pgdpo", "train", "--config", DEMO, "--output-dir", str(out), "--data.path", data,
            "--model.name", model, "--model.path", "null", "--max-steps", str(steps), "--logging.progress", "false",
            "--logging.plots", "false", "--logging.trackers", "[]", "--train.batch_size", "2",
            "--train.micro_batch_size", "1", "--optim.warmup_steps", "0", "--optim.scheduler", "constant",
            "--optim.lr", "0.1", "--optim.eps", "1.0", *extra]


def launch(nproc, args):
    return torchrun(nproc, *args)


def final_weights(out):
    folder = Path(out) / "final"
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    assert weights, f"no weights in {folder}"
    return weights


def assert_same_training(a, b):
    """Same losses and gradient norms step for step: step 1 (same weights) to float rounding; later
    steps to 3e-4, since the loss reads the small policy-minus-reference difference (after one LoRA
    step it is of the size of B, ~1e-3), whose relative rounding is ~1e-5, and the signed margin's
    1/(d_l + eps) amplifies it further (measured up to 1e-4 on the merged tree). A wrong gradient count
    is off by a factor of 2."""
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, len(ra) + 1))
    for x, y in zip(ra, rb):
        rtol = 1e-6 if x["step"] == 1 else 3e-4
        assert x["loss"] == pytest.approx(y["loss"], rel=rtol, abs=1e-7), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=rtol), (x["step"], x["grad_norm"],
                                                                              y["grad_norm"])
        assert x["reward_margin"] == pytest.approx(y["reward_margin"], rel=1e-3, abs=1e-6)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)


REFERENCES = {"copy": [], "lora": ["--model.lora_rank", "4", "--method.reference", "lora"]}


@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_sp2_over_two_processes_trains_as_one_process(tmp_path, datasets, task, reference):
    model = f"tiny-wan-{task}"
    extra = REFERENCES[reference]
    one, sp = tmp_path / "one", tmp_path / "sp2"
    run(launch(1, train_args(one, datasets[task], model, STEPS, *extra)))
    proc = run(launch(2, train_args(sp, datasets[task], model, STEPS, "--distributed.sp_degree", "2", *extra)))
    assert "sequence parallel 2 (Ulysses; 1 data-parallel group(s))" in proc.stderr
    assert_same_training(one, sp)


def test_sp_degree_must_divide_heads_and_processes(tmp_path, datasets):
    from pgdpo.train.config import ConfigError, load_config
    from pgdpo.train.distributed import init_distributed

    cfg = load_config(DEMO, [("distributed.sp_degree", 2)])
    with pytest.raises(ConfigError, match="sp_degree .2. must divide the number of processes .1."):
        init_distributed(cfg.distributed, "cpu")
    from pgdpo.train.models import adapter_for
    from pgdpo.train.parallel import check_divisible

    with pytest.raises(ConfigError, match="must divide the model's attention heads .2."):
        check_divisible(adapter_for("tiny-wan-t2v"), (16, 3, 8, 8), 4)
    with pytest.raises(ConfigError, match="tokens per video .48"):
        check_divisible(adapter_for({**adapter_for("tiny-wan-t2v").config, "num_attention_heads": 10}),
                        (16, 3, 8, 8), 5)


def test_sp_kill_and_resume_matches_uninterrupted_run(tmp_path, datasets):
    """SIGKILL of a 2-process sp_degree 2 run after a checkpoint; --resume latest reproduces the
    uninterrupted run bitwise (losses and gradient norms), each step once."""
    steps, data = 8, datasets["i2v"]
    args = lambda out, *extra: train_args(out, data, "tiny-wan-i2v", steps, "--distributed.sp_degree", "2",
                                          "--save-every", "2", *extra)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(launch(2, args(full)))
    kill_when(launch(2, args(killed)),
              lambda: (killed / "checkpoint-2").is_dir() and any(killed.glob("checkpoint-4*")),
              what="its second checkpoint")
    time.sleep(1.0)
    assert not (killed / f"checkpoint-{steps}").exists(), "killed too late: the run had finished"
    proc = run(launch(2, args(killed, "--resume", "latest")))
    assert "resumed from" in proc.stderr
    reference, resumed = records(full), records(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]


def test_cpu_offload_and_replicated_reference_match_the_default(tmp_path, datasets):
    """FSDP2 CPUOffloadPolicy and a replicated (unsharded) frozen reference change where the tensors live,
    not what is computed: 2-process runs give the default run's losses and weights."""
    data = datasets["i2v"]
    runs = {"default": [], "offload": ["--distributed.cpu_offload", "true"],
            "replicated": ["--distributed.reference_sharded", "false"]}
    for name, extra in runs.items():
        proc = run(launch(2, train_args(tmp_path / name, data, "tiny-wan-i2v", STEPS, *extra)))
        assert "strategy fsdp" in proc.stderr
    for name in ("offload", "replicated"):
        assert_same_training(tmp_path / "default", tmp_path / name)


def test_async_save_killed_mid_write_never_leaves_a_loadable_partial_checkpoint(tmp_path, datasets):
    """checkpoint.async_save: kill -9 while a background write is in flight (a checkpoint-*.tmp exists);
    every checkpoint `latest` can pick is complete, and resuming from it reproduces the run bitwise."""
    from pgdpo.train.checkpoint import list_checkpoints

    steps, data = 8, datasets["t2v"]
    args = lambda out, *extra: train_args(out, data, "tiny-wan-t2v", steps, "--save-every", "1",
                                          "--checkpoint.async_save", "true", "--checkpoint.keep_last", "0",
                                          *extra)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(launch(2, args(full)))
    assert [s for s, _ in list_checkpoints(full)] == list(range(1, steps + 1))
    kill_when(launch(2, args(killed)),
              lambda: (killed / "checkpoint-2").is_dir() and bool(list(killed.glob("checkpoint-*.tmp"))),
              what="an async save in flight", poll_s=0.002)
    time.sleep(1.0)
    assert not (killed / f"checkpoint-{steps}").exists(), "killed too late: the run had finished"
    for _, path in list_checkpoints(killed):  # what `latest` may load: every part present
        names = set(os.listdir(path))
        assert {"rank-0.pt", "rank-1.pt", ".metadata", "trainer.pt", "trainer_state.json"} <= names, names
        assert sum(n.endswith(".distcp") for n in names) == 2
    proc = run(launch(2, args(killed, "--resume", "latest")))
    assert "resumed from" in proc.stderr
    reference, resumed = records(full), records(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]


@pytest.mark.parametrize("extra", [
    [],
    ["--distributed.sp_degree", "2", "--distributed.reference_sharded", "false"],
    ["--distributed.sp_degree", "2", "--model.lora_rank", "4"],
], ids=["full-sharded", "sp2-full-replicated-ref", "sp2-lora-copy-ref"])
def test_planner_static_figures_are_the_trainers(tmp_path, datasets, extra):
    """`pgdpo plan`'s per-rank parameters, gradients, optimizer states and reference bytes equal what a
    real 2-process run holds on rank 0 (FSDP2 rows rounded up, fp32-kept parameters replicated)."""
    from pgdpo.tools.plan import plan
    from pgdpo.train.cli import resolve

    out = tmp_path / "run"
    args = train_args(out, datasets["i2v"], "tiny-wan-i2v", STEPS, *extra)[3:]  # after "-m pgdpo train"
    run(torchrun(2, str(ROOT / "tests" / "_plan_worker.py"), *args))
    measured = json.loads((out / "static.json").read_text())
    cfg, _ = resolve(args)
    planned = plan(cfg, gpus=2, suggest=False)["static_bytes_per_rank"]
    assert planned == measured
    assert measured["reference"] > 0 and measured["optimizer states"] > 0
