"""Helpers of the multi-process tests: torchrun command lines (CPU processes, gloo), running them, reading a
run's metrics.jsonl, and killing a run (SIGKILL) at a chosen moment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from pgdpo.train.data.synth import synth_dataset

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TIMEOUT = 300
#: the models are tiny: one intra-op thread per process avoids OpenMP spin-waits on a 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N ARGS`` (plain ``python ARGS``
    for one process). ``args`` is a script path or ``-m module``, then its arguments."""
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *args]


class LaunchHung(AssertionError):
    """A launch that outlived :data:`TIMEOUT`; the message holds its processes' stacks."""


class LaunchHungWarning(UserWarning):
    """A launch hung once and was started again (the stacks of the hung one are in the message)."""


def run(cmd: list[str], *, check: bool = True, env: dict | None = None, retries_after_hang: int = 1
        ) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; with ``check``, fail the test with the output's tail unless it
    succeeds (``check=False`` for a run that is meant to fail). ``env``: variables added to :data:`ENV`.

    A run that outlives :data:`TIMEOUT` is killed (its whole process tree) after the Python stacks of every
    process are taken. It is started again up to ``retries_after_hang`` times, with a
    :class:`LaunchHungWarning` carrying those stacks (pytest's warnings summary shows it); a second hang
    fails the test with them. Why a retry and not a failure: one CI run on record hung once, in a launch that
    passed in every one of 37 repetitions here, and a bare DDP launch in 160 (docs/testing.md); starting
    again is what the trainer supports anyway (a killed run resumes exactly), and the warning keeps the
    stacks for the root cause."""
    for attempt in range(retries_after_hang + 1):
        try:
            done = _run_once(cmd, env)
            break
        except LaunchHung as hung:
            if attempt == retries_after_hang:
                raise
            warnings.warn(LaunchHungWarning(f"started again after a hang: {hung}"), stacklevel=2)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _run_once(cmd: list[str], env: dict | None) -> subprocess.CompletedProcess:
    with subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            tree = process_tree(proc.pid)
            stacks = stacks_of(tree)
            for pid in reversed(tree):  # the workers too: a hung worker may not die with its launcher
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            stdout, stderr = proc.communicate()
            raise LaunchHung(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n--- stacks of its processes\n"
                             f"{stacks}\n--- stderr (tail)\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (Linux ``/proc``), parents first."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        pids.append(pid)
        todo.extend(_children(pid))
    return pids


def stacks_of(pids: list[int]) -> str:
    """The stacks of these processes: Python and native frames by ``py-spy dump`` where it is installed,
    else each process's kernel wait channel."""
    spy = shutil.which("py-spy")
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            continue
        out.append(f"== pid {pid}: {name}")
        if spy:
            dump = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                                  timeout=60)
            out.append((dump.stdout + dump.stderr)[-4000:])
        else:
            try:
                with open(f"/proc/{pid}/wchan") as f:
                    out.append(f"waiting in {f.read() or '?'} (install py-spy for the Python stacks)")
            except OSError:
                pass
    return "\n".join(out)


def tiny_pairs(tmp_path_factory) -> str:
    """A 16-pair synthetic dataset for the demo config's tiny Wan (latents [16, 3, 8, 8], text 16 x 32),
    written once per test module (call it from a module-scoped fixture); returns its folder."""
    path = tmp_path_factory.mktemp("data") / "pairs"
    synth_dataset(path, pairs=16, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    return str(path)


def records(out) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def kill_when(cmd: list[str], ready: Callable[[], bool], *, what: str, poll_s: float = 0.005) -> None:
    """Start ``cmd`` and SIGKILL its launcher as soon as ``ready()`` holds (torchrun's workers die with it:
    PR_SET_PDEATHSIG). Fails if the run ends first or ``ready`` does not come within the timeout."""
    victim = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ready():
            assert victim.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} in time"
            time.sleep(poll_s)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()


def workers_of(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun workers that are children of ``launcher_pid`` (Linux /proc: the
    parent from ``stat``, the rank from the ``RANK`` torchrun puts in each worker's environment)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue  # (gone meanwhile)
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def kill_worker_when(cmd: list[str], ready: Callable[[], bool], *, rank: int, what: str,
                     poll_s: float = 0.005) -> subprocess.CompletedProcess:
    """Start ``cmd`` (a torchrun launch), SIGKILL its worker of ``rank`` (not the launcher) as soon as
    ``ready()`` holds, and let the launch go on (torchrun ``--max-restarts``: it restarts the workers);
    returns the finished launch (stdout and stderr as text). Fails if the run ends first or ``ready``
    does not come within the timeout."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        launch = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not ready():
                assert launch.poll() is None, f"the run ended before {what}"
                assert time.monotonic() < deadline, f"no {what} in time"
                time.sleep(poll_s)
            pid = workers_of(launch.pid).get(rank)
            assert pid is not None, f"no worker of rank {rank} under the launcher at {what}"
            os.kill(pid, signal.SIGKILL)
            code = launch.wait(timeout=TIMEOUT)
        except BaseException:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())
