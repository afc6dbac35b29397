"""FSDP2's parameter all-gather on gloo (:class:`pgdpo.train.distributed.InPlaceAllGather`) and the CPU heap
trim (:mod:`pgdpo.train.host_memory`): what ``bench/run_memory.py``'s whole-run figures rest on.

- the in-place all-gather gathers what gloo's ``all_gather_into_tensor`` gathers, bitwise (it copies
  bytes), over the world and over a subgroup;
- with it, FSDP2 holds at most two block-sized buffers in a forward and a checkpointed backward, where
  its default all-gather on gloo holds three (so the probe sees the buffer it claims to remove);
- ``trim_heap`` returns a fragmented heap's free pages to the OS, and the trainer's CPU preparation
  trims before every block.
"""

import json
import os
import subprocess
import sys

import pytest

from pgdpo.train.cli import resolve
from pgdpo.train.host_memory import _trim_before_block
from pgdpo.train.models import MODEL_CONFIGS, build_model, spec_for
from pgdpo.train.prepare import PrepareOptions, prepare
from pgdpo.train.trainer import Trainer

from ._launch import DEMO, ROOT, run, torchrun

WORKER = str(ROOT / "tests" / "_all_gather_worker.py")


def reports(path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["rank"])


@pytest.mark.distributed
def test_in_place_all_gather_equals_gloos_all_gather(tmp_path):
    report = tmp_path / "report.jsonl"
    run(torchrun(3, WORKER, "equal", "--report", str(report)))
    ranks = reports(report)
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    for r in ranks:
        groups = {x["group"] for x in r["results"]}
        assert groups == ({3, 2} if r["rank"] in (0, 2) else {3}), r  # rank 1 is outside the subgroup
        assert len(r["results"]) == 4 * len(groups)
        assert all(x["equal"] for x in r["results"]), r


@pytest.mark.distributed
def test_fsdp_holds_two_block_buffers_with_the_in_place_all_gather(tmp_path):
    """Forward: a block's flat all-gather output and its parameters (FSDP2's default keeps the previous
    block's output too, until the copy-out); backward: one block's parameters and the next one's
    prefetched output (gloo's all-gather adds its staging copy of the output). Units: one block's
    weights; the slack covers activations (8 x 2048 fp32 per block) and allocator pages."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    ours, default = tmp_path / "ours.jsonl", tmp_path / "default.jsonl"
    run(torchrun(2, WORKER, "memory", "--report", str(ours)), env=env)
    run(torchrun(2, WORKER, "memory", "--report", str(default), "--default-all-gather"), env=env)
    for r in reports(ours):
        assert r["forward_blocks"] <= 2.25 and r["backward_blocks"] <= 2.25, r
    for r in reports(default):  # the probe sees the third buffer where it is
        assert r["forward_blocks"] >= 2.75 and r["backward_blocks"] >= 2.75, r


TRIM_PROBE = r"""
import json, torch
from pgdpo.train.host_memory import trim_heap

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

# 400 tensors of 256 KB from the heap (below the 1 MiB mmap threshold); keep every other one: the freed
# half lies between live chunks, so glibc cannot give it back by shrinking the heap from its top
tensors = [torch.ones(64 * 1024) for _ in range(400)]
kept = tensors[1::2]
del tensors
before = rss()
ok = trim_heap()
print(json.dumps({"ok": ok, "freed": before - rss(), "kept": sum(t.numel() * 4 for t in kept)}))
"""


def test_trim_heap_returns_the_free_pages_of_a_fragmented_heap():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"], "no glibc malloc_trim on this machine"
    half = 200 * 256 * 1024  # the freed half: 52 MB
    assert result["freed"] >= 0.8 * half, result


def first_pre_hooks(model) -> list:
    return [next(iter(b._forward_pre_hooks.values()), None) for b in spec_for(model).blocks(model)]


def test_cpu_preparation_trims_before_every_block(tmp_path):
    model = build_model(MODEL_CONFIGS["tiny-wan-t2v"], seed=0)
    prepare(model, PrepareOptions(trim_host_heap=True, checkpoint_every=1))
    hooks = first_pre_hooks(model)
    assert hooks and all(h is _trim_before_block for h in hooks)
    plain = build_model(MODEL_CONFIGS["tiny-wan-t2v"], seed=0)
    prepare(plain, PrepareOptions())
    assert not any(h is _trim_before_block for h in first_pre_hooks(plain))
    # the trainer on CPU: every block of the policy (the first of its pre-hooks)
    cfg, _ = resolve(["--config", DEMO, "--output-dir", str(tmp_path / "run"), "--model.path", "null",
                      "--data.path", str(tmp_path / "data"), "--data.synthesize", "true",
                      "--logging.trackers", "[]", "--logging.progress", "false", "--device", "cpu"])
    trainer = Trainer(cfg)
    try:
        hooks = first_pre_hooks(trainer.model)
        assert hooks and all(h is _trim_before_block for h in hooks)
    finally:
        trainer.close()
