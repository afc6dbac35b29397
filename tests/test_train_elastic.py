"""Elastic restart and resume on another number of processes, with real ``torchrun`` launches (CPU, gloo)
of the demo config with the tiny random Wan (``--model.path null``), a few steps each:

- a worker killed with SIGKILL under ``torchrun --max-restarts 1``: torchrun restarts the workers, the
  trainer finds its own latest checkpoint (no ``--resume`` given) and the run ends with the uninterrupted
  run's losses, bitwise;
- a checkpoint written by 4 processes resumes on 2, and one of those on 4 again: DCP reshards the model
  and optimiser (the state as loaded equals the checkpoint's, bitwise), the steps continue, the losses
  follow the uninterrupted 4-process run's to rounding, and the log says what changed (docs/resume.md);
- a checkpoint written by 4 processes resumes on 8 (ranks without a file of their own in it), checked the
  same way (twelve gloo processes in all: 40-50 s on a shared 2-core machine).
"""

import math
import os
import sys

import pytest
import torch

from ._launch import DEMO, ROOT, kill_worker_when, records, run, tiny_pairs, torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def args(out, data, steps, *extra, batch_size=4):
    return ["--config", DEMO, "--output-dir", str(out), "--data.path", data, "--model.path", "null",
            "--max-steps", str(steps), "--logging.progress", "false", "--logging.plots", "false",
            "--logging.trackers", "[]", "--train.batch_size", str(batch_size), "--train.micro_batch_size", "1",
            "--validation.every", "0", *extra]


def assert_loaded_is_checkpoint(checkpoint, loaded, tmp_path):
    """The state ``tests/_reshard_worker.py`` gathered as loaded (``loaded``: its ``loaded.pt``) is the DCP
    checkpoint's, bitwise: every model tensor and every optimiser state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp_path / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    saved = torch.load(flat, weights_only=True)
    loaded = torch.load(loaded, weights_only=True)
    assert loaded["start_step"] == int(checkpoint.name.split("-")[1])
    assert loaded["model"].keys() == saved["model"].keys() and loaded["model"]
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert loaded["optim"]["state"].keys() == saved["optim"]["state"].keys()
    for key, state in saved["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(loaded["optim"]["state"][key][name]), torch.as_tensor(value)), \
                (key, name)


def test_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(tmp_path, data):
    steps = 8
    full, elastic = tmp_path / "full", tmp_path / "elastic"
    run(torchrun(2, "-m", "pgdpo", "train", *args(full, data, steps, "--save-every", "2")))
    reference = records(full)
    assert [r["step"] for r in reference] == list(range(1, steps + 1))

    # elastic launch; rank 1 (a worker, not the launcher) killed once checkpoint-2 is complete
    launch = torchrun(2, "-m", "pgdpo", "train", *args(elastic, data, steps, "--save-every", "2"))
    launch.insert(launch.index("--standalone"), "--max-restarts=1")
    proc = kill_worker_when(launch, lambda: (elastic / "checkpoint-2").is_dir(), rank=1,
                            what="checkpoint-2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    log = proc.stdout + proc.stderr
    assert "restart 1 of an elastic launch: resuming from checkpoint-" in log, log[-6000:]
    resumed_at = int(log.split("restart 1 of an elastic launch: resuming from checkpoint-")[1].split()[0])
    assert 2 <= resumed_at < steps, "killed too late: the run had finished"
    assert "pgdpo train: done" in proc.stdout
    assert not any(n.startswith("previous-") for n in os.listdir(elastic)), "a restart archived its own run"
    got = records(elastic)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in reference]


def assert_continues(got: list[dict], reference: list[dict], *, first_tol: float) -> dict:
    """The resumed run's losses follow the uninterrupted run's: its first step within ``first_tol``
    relative (the same weights, summed in another order), later ones and every gradient norm within 1e-5
    relative (AdamW updates from gradients summed in another order). Returns the reference by step."""
    want = {r["step"]: r for r in reference}
    first = got[0]["step"]
    for r in got:
        assert math.isfinite(r["loss"])
        tol = first_tol if r["step"] == first else 1e-5
        assert r["loss"] == pytest.approx(want[r["step"]]["loss"], rel=tol, abs=0), r["step"]
        assert r["grad_norm"] == pytest.approx(want[r["step"]]["grad_norm"], rel=1e-5), r["step"]
    return want


def test_four_process_checkpoint_resumes_on_two_and_back_on_four(tmp_path, data):
    full, two, four = tmp_path / "full4", tmp_path / "two", tmp_path / "four"
    run(torchrun(4, "-m", "pgdpo", "train", *args(full, data, 6, "--save-every", "2", "--checkpoint.keep_last", "0")))
    reference = records(full)
    assert [r["step"] for r in reference] == list(range(1, 7))
    checkpoint = full / "checkpoint-2"

    worker = os.path.join(os.path.dirname(__file__), "_reshard_worker.py")
    proc = run(torchrun(2, worker, *args(two, data, 4, "--resume", str(checkpoint))),
               env={"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    log = proc.stderr
    assert "resuming checkpoint-2: written by 4 processes (4 data-parallel x 1 micro-batch(es) of 1 per " \
           "step), this run has 2 (2 x 2 of 1): DCP reshards" in log, log[-4000:]
    assert "each pair keeps the noise and timestep it had in the uninterrupted run" in log

    # the state as loaded on 2 processes (gathered) is the checkpoint's, bitwise
    assert_loaded_is_checkpoint(checkpoint, two / "loaded.pt", tmp_path)

    # steps 3 and 4 on 2 processes, then 5 and 6 on 4 again from the 2-process checkpoint (ranks 2 and 3
    # have no file of their own in it): the same pairs and noise as the 4-process run's steps
    proc = run(torchrun(4, "-m", "pgdpo", "train", *args(four, data, 6, "--resume", str(two / "checkpoint-4"))))
    assert "resuming checkpoint-4: written by 2 processes (2 data-parallel x 2 micro-batch(es) of 1 per " \
           "step), this run has 4 (4 x 1 of 1)" in proc.stderr, proc.stderr[-4000:]
    got = records(two) + records(four)
    assert [r["step"] for r in got] == [3, 4, 5, 6]
    # step 3: the same per-pair losses from the same weights, averaged in another order (float32 sums of 4
    # terms: at most 3 eps relative); step 4 adds one AdamW update from gradients summed in another order
    # (3 eps relative per element, through lr 3e-3): far below 1e-5 relative; step 5 the same from the
    # 2-process run's step-4 weights (the same bound again), step 6 one more update
    want = assert_continues(got, reference, first_tol=4 * torch.finfo(torch.float32).eps)
    print(f"4->2->4 resume loss diffs, steps 3-6: {[abs(r['loss'] - want[r['step']]['loss']) for r in got]}", file=sys.stderr)


def test_four_process_checkpoint_resumes_on_eight(tmp_path, data):
    """4 -> 8 processes (more GPUs): train.batch_size 8 so both split a step into whole micro-batches of 1
    (4 ranks x 2, 8 ranks x 1). Ranks 4-7 have no file of their own in the checkpoint."""
    full, eight = tmp_path / "full4", tmp_path / "eight"
    run(torchrun(4, "-m", "pgdpo", "train", *args(full, data, 4, "--save-every", "2", "--checkpoint.keep_last",
                                                   "0", batch_size=8)))
    reference = records(full)
    assert [r["step"] for r in reference] == list(range(1, 5))
    checkpoint = full / "checkpoint-2"

    worker = os.path.join(os.path.dirname(__file__), "_reshard_worker.py")
    proc = run(torchrun(8, worker, *args(eight, data, 4, "--resume", str(checkpoint), batch_size=8)),
               env={"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    log = proc.stderr
    assert "resuming checkpoint-2: written by 4 processes (4 data-parallel x 2 micro-batch(es) of 1 per " \
           "step), this run has 8 (8 x 1 of 1): DCP reshards the model and optimiser state" in log, log[-4000:]
    assert "each pair keeps the noise and timestep it had in the uninterrupted run" in log
    assert "a rank the checkpoint's run did not have seeds its global RNGs from seed + rank" in log

    # the state as loaded on 8 processes (gathered) is the checkpoint's, bitwise
    assert_loaded_is_checkpoint(checkpoint, eight / "loaded.pt", tmp_path)

    got = records(eight)
    assert [r["step"] for r in got] == [3, 4]
    # step 3: the 8 pairs' losses from the same weights (loaded bitwise), pairs and noise, averaged in
    # another order (a float32 sum of 8 terms: at most 7 eps relative; the mean is summed in float64,
    # tighter still); step 4 adds one AdamW update from the 8 pairs' gradients summed in another order
    # (4 ranks x 2 micro-batches vs 8 ranks: 7 eps relative per element, through lr 3e-3): far below 1e-5
    # relative, the 4 -> 2 -> 4 test's bound
    want = assert_continues(got, reference, first_tol=8 * torch.finfo(torch.float32).eps)
    print("4->8 resume, steps 3-4: loss", [(r["loss"], abs(r["loss"] / want[r["step"]]["loss"] - 1)) for r in got],
          "grad_norm", [(r["grad_norm"], abs(r["grad_norm"] / want[r["step"]]["grad_norm"] - 1)) for r in got],
          file=sys.stderr)


def test_a_launch_continues_its_own_checkpoints_and_archives_another_launchs(tmp_path, data):
    """A node whose own workers did not fail restarts with TORCHELASTIC_RESTART_COUNT 0: the checkpoints
    of its launch's run id tell it that it is a restart (one process here: the rule is rank 0's); a
    launch with another run id is a new run, which moves the old one to previous-1."""
    out = tmp_path / "run"
    launch = torchrun(1, "-m", "pgdpo", "train")
    run([*launch, *args(out, data, 2, "--save-every", "2")], env={"TORCHELASTIC_RUN_ID": "job-7"})
    proc = run([*launch, *args(out, data, 3)], env={"TORCHELASTIC_RUN_ID": "job-7"})
    assert "a restarted worker group of elastic launch job-7: resuming from checkpoint-2" in proc.stderr
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    assert not (out / "previous-1").exists()
    proc = run([*launch, *args(out, data, 1)], env={"TORCHELASTIC_RUN_ID": "job-8"})
    assert "moved its checkpoints and logs to" in proc.stderr and (out / "previous-1" / "checkpoint-3").is_dir()
    assert [r["step"] for r in records(out)] == [1]
