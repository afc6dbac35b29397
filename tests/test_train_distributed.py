"""``pgdpo train`` under ``torchrun`` with 2 CPU processes (gloo): FSDP2, DDP, SIGKILL and exact resume.

Each test launches real processes (``torchrun --standalone``: a free port, so concurrent runs on one
machine do not meet) on the demo config with the tiny Wan-shaped model, a few steps each.
"""

import math
import os
import time

import pytest
import torch

from pgdpo.train.data.synth import synth_dataset

from ._launch import DEMO, kill_when, records, run, tiny_pairs, torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def command(out, data, steps, *extra):
    return torchrun(2, "-m", "pgdpo", "train", "--config", DEMO, "--output-dir", str(out), "--data.path", data,
            "--max-steps", str(steps), "--logging.progress", "false", "--logging.plots", "false",
            "--logging.trackers", "[]", "--train.batch_size", "4", "--train.micro_batch_size", "1",
            "--validation.every", "0", *extra)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The demo's tiny Wan saved by diffusers: runs load it sharded (meta init + per-rank sliced reads)."""
    from pgdpo.train.models import build_model

    folder = tmp_path_factory.mktemp("wan") / "transformer"
    build_model("tiny-wan-t2v", seed=0).save_pretrained(folder, max_shard_size="30KB")
    return str(folder)


def test_fsdp_kill_and_resume_matches_uninterrupted_run(tmp_path, data, pretrained):
    """Two-process FSDP2 run from a saved diffusers folder; the same run killed (SIGKILL, every process)
    after a checkpoint and resumed with --resume latest gives the uninterrupted run's losses bitwise,
    each step once."""
    steps = 12
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run(command(full, data, steps, "--save-every", "3", "--model.path", pretrained))
    assert "2 process(es), strategy fsdp" in proc.stderr and "pgdpo train: done" in proc.stdout
    reference = records(full)
    assert [r["step"] for r in reference] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in reference)
    ck = full / f"checkpoint-{steps}"
    assert {"rank-0.pt", "rank-1.pt", ".metadata"} <= set(os.listdir(ck))
    assert sum(name.endswith(".distcp") for name in os.listdir(ck)) == 2  # one shard file per rank

    # After checkpoint-3 is complete, kill as soon as checkpoint-6 is being written (or, if that moment
    # is missed, written): the kill lands mid-save or just after it.
    kill_when(command(killed, data, steps, "--save-every", "3", "--model.path", pretrained),
              lambda: (killed / "checkpoint-3").is_dir() and any(killed.glob("checkpoint-6*")),
              what="its second checkpoint")
    size = (killed / "metrics.jsonl").stat().st_size
    time.sleep(1.0)
    assert (killed / "metrics.jsonl").stat().st_size == size, "a worker outlived its launcher"
    assert not (killed / f"checkpoint-{steps}").exists(), "killed too late: the run had finished"

    proc = run(command(killed, data, steps, "--save-every", "3", "--model.path", pretrained, "--resume",
                       "latest"))
    assert "resumed from" in proc.stderr
    resumed = records(killed)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
    assert not [n for n in os.listdir(killed) if n.endswith(".tmp")]
    # the model users load (<output_dir>/final, diffusers layout) is the uninterrupted run's, bitwise
    from safetensors.torch import load_file

    a, b = (load_file(run_dir / "final" / "diffusion_pytorch_model.safetensors") for run_dir in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_and_sft_two_processes(tmp_path, data):
    out = tmp_path / "ddp"
    proc = run(command(out, data, 2, "--distributed.strategy", "ddp", "--method.name", "sft"))
    assert "strategy ddp" in proc.stderr
    rs = records(out)
    assert [r["step"] for r in rs] == [1, 2] and all(math.isfinite(r["loss"]) for r in rs)


def test_fsdp_validation_samples_and_a_damaged_shard(tmp_path):
    """Two-process FSDP2: every rank samples (the sharded forwards are collective), rank 0 writes the GIFs
    and the grid; a shard with flipped payload bytes stops both ranks, naming it, before any checkpoint."""
    import shutil

    import numpy as np
    from PIL import Image

    motion = tmp_path / "motion"
    synth_dataset(motion, pairs=8, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, kind="motion",
                  progress=False)
    out = tmp_path / "fsdp"
    proc = run(command(out, str(motion), 2, "--validation.every", "1", "--validation.num_prompts", "2",
                       "--validation.steps", "2", "--validation.scale", "2"))
    assert "strategy fsdp" in proc.stderr
    for step in (0, 1, 2):
        for i in (0, 1):
            img = Image.open(out / "samples" / f"step-{step:06d}" / f"prompt-0{i}.gif")
            frames = []
            for k in range(img.n_frames):
                img.seek(k)
                frames.append(np.asarray(img.convert("RGB")).astype(float))
            assert len(frames) == 3 and np.stack(frames).reshape(-1, 3).std(0).max() > 5
    assert (out / "samples" / "before_after.png").stat().st_size > 0

    bad = tmp_path / "bad"
    shutil.copytree(motion, bad)
    shard = bad / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # inside the payload, the header intact
    shard.write_bytes(bytes(data))
    proc = run(command(tmp_path / "badrun", str(bad), 2, "--save-every", "1"), check=False)
    assert proc.returncode != 0
    assert "shard-00000.safetensors: shard is corrupt" in proc.stderr
    assert not list((tmp_path / "badrun").glob("checkpoint-*"))
