"""Checkpoints that lose nothing, written atomically, found again by ``--resume latest``.

A checkpoint is a folder ``<output_dir>/checkpoint-<step>``:

- DCP files (``torch.distributed.checkpoint``; ``.metadata`` + ``*.distcp``): the sharded state of the
  policy (trainable parameters), the optimiser and, when it moves, the EMA reference. Written by every
  rank, resharded on load (``get_state_dict`` / ``set_state_dict``).
- ``rank-<r>.pt``: what differs between ranks: RNG states (torch CPU/CUDA, python, numpy) and the
  position of the rank's data shard (the dataset's ``state_dict()``, which also holds the global pair
  index, so a run on another number of processes continues the same order; a rank the writing run did
  not have takes rank 0's data position and keeps its own RNG seeding: docs/resume.md).
- ``trainer.pt``: what all ranks share: step, LR schedule, timestep-weighting statistics, world size.
- ``trainer_state.json`` (human-readable summary) and ``config.yaml``.
- ``manifest.json``: size and checksum (:mod:`pgdpo.train.integrity`) of every other file, written before the
  rename; ``--resume`` verifies it, refuses a damaged checkpoint by name, and ``latest`` falls back to the
  newest checkpoint that verifies (saying which it skipped and why). Checkpoints written before the
  manifest existed resume with a warning.

Atomicity: everything goes to ``checkpoint-<step>.tmp``; files are fsynced; after a barrier (every rank
finished) rank 0 renames the folder to ``checkpoint-<step>`` and fsyncs the parent. A crash (even
``kill -9``) leaves either a complete checkpoint or a ``.tmp`` folder, which ``latest`` ignores and the
next save removes. Everything is read back with ``torch.load(weights_only=True)`` / DCP / JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .integrity import checksum_matches, file_checksum

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_SUFFIX = ".tmp"
STATE_JSON = "trainer_state.json"
TRAINER_FILE = "trainer.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file."""


# ---------------------------------------------------------------------------------------------- finding


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_JSON)) and os.path.isfile(os.path.join(path, ".metadata"))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first (``.tmp`` folders ignored)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str, *, verify: bool = True, log=None) -> str | None:
    """The checkpoint folder ``resume`` names: None, ``"latest"`` (None when there is none) or a path.

    ``verify``: check the checkpoint's files against its manifest (:func:`verify_checkpoint`). A damaged
    checkpoint named by path is a :class:`CheckpointError` naming the file; with ``"latest"`` it is
    skipped for the newest one that verifies, and ``log`` (a ``print``-like callable) says so.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        skipped = []
        for _, path in reversed(found):
            if not verify:
                return path
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                skipped.append(path)
                if log is not None:
                    log(f"--resume latest: skipping the damaged {os.path.basename(path)}: {exc}")
                continue
            if skipped and log is not None:
                log(f"--resume latest: falling back to {os.path.basename(path)}, the newest checkpoint that "
                    f"verifies (skipped {[os.path.basename(p) for p in skipped]})")
            return path
        if skipped:
            raise CheckpointError(f"--resume latest: every checkpoint in {output_dir} is damaged "
                                  f"({[os.path.basename(p) for p in skipped]}); nothing to resume from")
        return None
    path = os.path.expanduser(resume)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    if path.rstrip(os.sep).endswith(TMP_SUFFIX):
        raise CheckpointError(f"--resume {resume}: a '.tmp' folder is an unfinished checkpoint (the run was "
                              "interrupted while saving it); resume from a complete checkpoint-<step>")
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: not a complete checkpoint (no {STATE_JSON} or DCP "
                              ".metadata in it)")
    if verify:
        verify_checkpoint(path)
    return path


def write_manifest(folder: str, checksums: dict[str, str]) -> None:
    """``manifest.json`` in ``folder``: ``{"files": {name: {"size": bytes, "checksum": "blake2b:..."}}}``."""
    files = {name: {"size": os.path.getsize(os.path.join(folder, name)), "checksum": checksums[name]}
             for name in sorted(checksums)}
    _write_text(os.path.join(folder, MANIFEST), json.dumps({"files": files}, indent=1) + "\n")


def checksum_files(folder: str, rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """Checksums of this rank's share of the files in ``folder`` (every ``world_size``-th, sorted by name),
    so that the ranks hash a large checkpoint in parallel."""
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                   and n not in (MANIFEST, STATE_JSON))
    return {name: file_checksum(os.path.join(folder, name)) for name in names[rank::world_size]}


def verify_checkpoint(path: str) -> bool:
    """Check every file in ``path``'s manifest (present, same size, same checksum).

    Returns False for a checkpoint without a manifest (written before there were manifests: a warning), True
    when everything matched; a :class:`CheckpointError` naming the first bad file otherwise.
    """
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        warnings.warn(f"{path}: no {MANIFEST} (written before checkpoints had checksums); resuming without "
                      "verifying its files", stacklevel=2)
        return False
    try:
        with open(file) as f:
            files = json.load(f)["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: damaged manifest ({type(exc).__name__}: {exc})") from None
    for name, entry in sorted(files.items()):
        target = os.path.join(path, name)
        if not os.path.isfile(target):
            raise CheckpointError(f"{target}: missing (listed in {MANIFEST})")
        size = os.path.getsize(target)
        if size != entry.get("size"):
            raise CheckpointError(f"{target}: damaged: {size} bytes, {MANIFEST} recorded {entry.get('size')}")
        try:
            ok, actual = checksum_matches(target, str(entry.get("checksum")))
        except ValueError as exc:
            raise CheckpointError(f"{file}: {name}: {exc}") from None
        if not ok:
            raise CheckpointError(f"{target}: damaged: checksum {actual}, {MANIFEST} recorded "
                                  f"{entry['checksum']}")
    return True


#: what a run writes in its output folder (the dataset and anything else are left alone)
RUN_ARTIFACTS = ("metrics.jsonl", "tensorboard", "config.yaml", "samples", "loss.png", "alpha_gamma.png",
                 "likelihood.png", "final")


def archive_previous_run(output_dir: str) -> str | None:
    """Move a previous run's checkpoints and logs into ``output_dir/previous-<n>``; returns it (or None).

    A fresh start (no ``--resume``) in a folder that holds a run keeps that run instead of mixing with it
    or deleting it. Renames only: no data is copied.
    """
    if not os.path.isdir(output_dir):
        return None
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") or n in RUN_ARTIFACTS]
    if not names:
        return None
    n = 1
    while os.path.exists(os.path.join(output_dir, f"previous-{n}")):
        n += 1
    target = os.path.join(output_dir, f"previous-{n}")
    os.makedirs(target)
    for name in sorted(names):
        os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    _fsync_dir(output_dir)
    return target


def read_summary(path: str) -> dict:
    file = os.path.join(path, STATE_JSON)
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from None


# ----------------------------------------------------------------------------------------------- RNG


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """RNG states of torch (CPU and every CUDA device), python and numpy, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generators:
        state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


class GlobalRNG:
    """The process's global RNGs (torch, CUDA, python, numpy) as a checkpointed component: ``state_dict``
    is :func:`rng_state`; ``load_state_dict(None)`` (a rank the checkpoint's run did not have) keeps this
    process's own seeding."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            set_rng_state(state)


# ----------------------------------------------------------------------------------------------- I/O


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(obj, path: str) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def load_torch(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _state_dict_options(trainable_only: bool):
    # Only trained parameters are saved (a LoRA run saves its adapters, not the frozen base). Loading
    # is then non-strict about the frozen ones; every saved key must still be found (DCP raises).
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _dcp_state(policy, optimizer, reference):
    model_sd, optim_sd = get_state_dict(policy, optimizer, options=_state_dict_options(True))
    state = {"model": model_sd, "optim": optim_sd}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference, options=_state_dict_options(False))
    return state


def save_checkpoint(output_dir: str, step: int, *, dist_state, policy, optimizer, reference=None,
                    rank_state: dict, trainer_state: dict, summary: dict, config_yaml: str,
                    keep_last: int = 0, stale: list[str] | None = None, async_group=None):
    """Write ``checkpoint-<step>`` atomically (collective: every rank calls it). Returns its path.

    ``reference``: the EMA reference model to save (None when it is the frozen initial weights).
    ``stale``: checkpoint folders of an abandoned timeline, deleted once this one is complete.
    ``async_group``: a process group for DCP ``async_save`` (gloo; its collectives run in a background
    thread, apart from the training's): the state is staged to host memory and written in the
    background, and a :class:`PendingCheckpoint` is returned; it is renamed into place (complete) by
    its ``finish()`` once every rank's write is done. Until then it is a ``.tmp`` folder, which
    ``latest`` never loads.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final + TMP_SUFFIX
    if dist_state.is_main:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist_state.barrier()

    save_torch(rank_state, os.path.join(tmp, f"rank-{dist_state.rank}.pt"))
    with warnings.catch_warnings():  # single process: "torch.distributed is disabled ... single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        if async_group is not None:
            future = dcp.async_save(_dcp_state(policy, optimizer, reference), checkpoint_id=tmp,
                                    process_group=async_group)
        else:
            dcp.save(_dcp_state(policy, optimizer, reference), checkpoint_id=tmp)
            future = None
    pending = PendingCheckpoint(output_dir, final, dist_state, future, trainer_state, summary, config_yaml,
                                keep_last, stale)
    if future is None:
        return pending.finish()
    return pending


class PendingCheckpoint:
    """A checkpoint whose DCP shards are being written (``async_save``); :meth:`finish` completes it."""

    def __init__(self, output_dir, final, dist_state, future, trainer_state, summary, config_yaml,
                 keep_last, stale):
        self.output_dir, self.path, self.dist = output_dir, final, dist_state
        self.future, self.trainer_state, self.summary = future, trainer_state, summary
        self.config_yaml, self.keep_last, self.stale = config_yaml, keep_last, stale

    def written(self) -> bool:
        """True on every rank once every rank's write has finished (collective)."""
        return self.dist.all_ok(self.future is None or self.future.done())

    def finish(self) -> str:
        """Wait for the writes, then rename ``.tmp`` into place (collective). Returns the path."""
        if self.future is not None:
            self.future.result()  # re-raises a failed write
            self.future = None
        tmp, final, output_dir = self.path + TMP_SUFFIX, self.path, self.output_dir
        ok = self.dist.all_ok(True)  # every rank has written and fsynced its part
        if not ok:  # pragma: no cover - all_ok(True) is true unless a rank raised, which propagates
            raise CheckpointError(f"{tmp}: a rank failed to write its part")
        if self.dist.is_main:
            save_torch(self.trainer_state, os.path.join(tmp, TRAINER_FILE))
            _write_text(os.path.join(tmp, "config.yaml"), self.config_yaml)
        self.dist.barrier()
        # Every file is in place: the ranks hash their shares of them, rank 0 writes the manifest.
        checksums = checksum_files(tmp, self.dist.rank, self.dist.world_size)
        if self.dist.distributed:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, checksums)
            checksums = {k: v for part in parts for k, v in part.items()}
        if self.dist.is_main:
            write_manifest(tmp, checksums)
            for name in os.listdir(tmp):
                if os.path.isfile(os.path.join(tmp, name)):
                    _fsync_file(os.path.join(tmp, name))
            # The summary is the completion marker: written last, inside the .tmp folder.
            _write_text(os.path.join(tmp, STATE_JSON),
                        json.dumps(self.summary, indent=2, sort_keys=True) + "\n")
            _fsync_dir(tmp)
            if os.path.exists(final):  # same step written before (resumed from an older checkpoint)
                old = final + ".replaced" + TMP_SUFFIX
                if os.path.exists(old):
                    shutil.rmtree(old)
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(output_dir)
            _prune(output_dir, self.keep_last, self.stale or [], keep=final)
        self.dist.barrier()
        return final


def _prune(output_dir: str, keep_last: int, stale: list[str], keep: str) -> None:
    for path in stale:
        if os.path.abspath(path) != os.path.abspath(keep) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    stale.clear()
    for name in os.listdir(output_dir):  # leftovers of interrupted saves (no save is in flight here)
        if name.startswith("checkpoint-") and name.endswith(TMP_SUFFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if keep_last > 0:
        complete = list_checkpoints(output_dir)
        for _, path in complete[:-keep_last]:
            if os.path.abspath(path) != os.path.abspath(keep):
                shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str, *, dist_state, policy, optimizer, reference=None) -> tuple[dict, dict]:
    """Load ``path`` into the (already wrapped) models and optimiser; returns (rank_state, trainer_state).

    DCP reshards the model and optimiser state onto this run's processes, however many wrote it. A rank
    the writing run did not have (more processes now) gets ``{"data": rank 0's data state, "rng": None}``.
    """
    trainer_state = load_torch(os.path.join(path, TRAINER_FILE))
    saved_world = int(trainer_state.get("world_size") or 1)
    if reference is None and trainer_state.get("has_reference_state"):
        raise CheckpointError(f"{path} holds an EMA reference but this run's config has no moving "
                              "reference (method.ref_ema_every: 0)")
    if reference is not None and not trainer_state.get("has_reference_state"):
        raise CheckpointError(f"{path} holds no EMA reference but this run's config moves the reference "
                              "(method.ref_ema_every > 0); resume with the config the checkpoint was made "
                              "with")
    state = _dcp_state(policy, optimizer, reference)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=path)
    except Exception as exc:  # noqa: BLE001 - DCP raises several types; name the folder
        raise CheckpointError(f"{path}: the sharded model/optimiser state cannot be loaded into this model "
                              f"({type(exc).__name__}: {exc})") from exc
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_dict_options(True))
    if reference is not None:
        set_model_state_dict(reference, state["reference"], options=_state_dict_options(False))
    if dist_state.rank < saved_world:
        rank_state = load_torch(os.path.join(path, f"rank-{dist_state.rank}.pt"))
    else:
        rank_state = {"data": load_torch(os.path.join(path, "rank-0.pt"))["data"], "rng": None}
    return rank_state, trainer_state
