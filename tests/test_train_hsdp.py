"""HSDP (``distributed.replicate_degree``) and a launch over several nodes, in real 4-process runs (gloo).

- HSDP 2 x 2 (two replica groups of two shard ranks) trains as plain FSDP2 over the same 4 processes: the
  same data and noise on every rank, the same weights all-gathered; only the order in which the 4 ranks'
  gradients are summed differs (a reduce-scatter in each shard group, then an all-reduce across the
  groups, vs one reduce-scatter over all 4);
- two torchrun agents (``--nnodes 2 --nproc_per_node 2``, c10d rendezvous on this machine: two "nodes")
  give the one-launch run of the same mesh, bitwise: the same ranks run the same collectives, so nothing
  may depend on which node a rank is on (``LOCAL_RANK`` picks the device only);
- a checkpoint written under HSDP (DCP, DTensors on the 2-D mesh) resumes bitwise, and one written by
  plain FSDP2 resumes under HSDP (DCP re-shards; the log names the change);
- HSDP composes with sequence parallelism (and LoRA with the adapters-off reference): the same training
  as FSDP2 with the same sp_degree;
- a mesh that cannot be built is refused naming the key (cheap, no processes).

AdamW runs with ``eps = 1`` (as in tests/test_train_parallel.py): the update is then about ``lr * g``,
not ``lr * sign(g)``, which would turn rounding differences of near-zero gradient entries into
differences of ``lr`` in the weights.
"""

import json
import math
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from ._launch import DEMO, ENV, ROOT, TIMEOUT, records, run, tiny_pairs, torchrun
from ._tolerance import EPS32, gamma

STEPS = 3
WORLD = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pairs(tmp_path_factory)


def train_args(out, data, *extra):
    return ["-m", "pgdpo", "train", "--config", DEMO, "--output-dir", str(out), "--data.path", data,
            "--model.path", "null", "--max-steps", str(STEPS), "--logging.progress", "false",
            "--logging.plots", "false", "--logging.trackers", "[]", "--validation.every", "0",
            "--train.batch_size", "4", "--train.micro_batch_size", "1", "--optim.warmup_steps", "0",
            "--optim.scheduler", "constant", "--optim.lr", "0.1", "--optim.eps", "1.0",
            "--save-every", "1", "--checkpoint.keep_last", "0", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(args: list[str]) -> tuple[str, str]:
    """Two torchrun agents of 2 processes each, rendezvous c10d on 127.0.0.1 (two nodes on one machine);
    both must succeed. Returns their stderr and stdout, joined."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"hsdp-{port}",
           *args]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    outs = []
    try:
        for agent in agents:
            outs.append(agent.communicate(timeout=TIMEOUT))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    for agent, (stdout, stderr) in zip(agents, outs):
        assert agent.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return "".join(e for _, e in outs), "".join(o for o, _ in outs)


#: Step 1 runs the same forward on the same weights in both layouts; its loss is the mean of the 4 ranks'
#: losses (an all-reduce: error <= gamma_4 relative) and its gradient norm that of the sum of the same 4
#: rank gradients in another order (each entry within gamma_3 * sum_r |g_r|; a few times that relative to
#: |sum_r g_r| where the ranks' gradients partly cancel). 64 gamma_4 (~1.5e-5) covers both with room for
#: a cancellation factor of ~30; a layout that drops or double-counts a replica group is off by ~1/2.
STEP1_RTOL = 64 * gamma(WORLD)
#: Later steps: the weights differ by lr * (that gradient rounding); the loss reads the small
#: policy-minus-reference difference (of the size of one update, ~lr |g| ~ 1e-2), so its relative
#: rounding is ~1e-5 and the signed margin's 1/(d_l + eps) amplifies it (tests/test_train_parallel.py
#: bounds the same quantity, for sequence parallelism's larger reordering, by 3e-4).
LATER_RTOL = 3e-4


def assert_same_training(a: list[dict], b: list[dict]) -> float:
    """Same losses and gradient norms step for step (see the tolerances); returns the largest relative
    loss difference."""
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    worst = 0.0
    for x, y in zip(a, b):
        rtol = STEP1_RTOL if x["step"] == 1 else LATER_RTOL
        assert x["loss"] == pytest.approx(y["loss"], rel=rtol, abs=16 * EPS32), (x["step"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=rtol), (x["step"], x["grad_norm"],
                                                                              y["grad_norm"])
        worst = max(worst, abs(x["loss"] - y["loss"]) / abs(y["loss"]))
    return worst


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.distributed
def test_hsdp_2x2_trains_as_fsdp_two_nodes_as_one_launch_and_resumes(tmp_path, data):
    fsdp, hsdp, nodes, resumed = (tmp_path / name for name in ("fsdp", "hsdp", "nodes", "resumed"))
    hsdp_args = ("--distributed.replicate_degree", "2")

    proc = run(torchrun(WORLD, *train_args(fsdp, data)))
    assert "4 process(es), strategy fsdp, mesh replicate=1 shard=4 sp=1" in proc.stderr
    proc = run(torchrun(WORLD, *train_args(hsdp, data, *hsdp_args)))
    assert "4 process(es), strategy fsdp, mesh replicate=2 shard=2 sp=1" in proc.stderr
    assert "nodes" not in proc.stderr  # one launch: one node

    # (a) HSDP 2x2 = FSDP2 over 4, to float32 reduction order; the weights after 3 steps too
    worst = assert_same_training(records(hsdp), records(fsdp))
    print(f"HSDP vs FSDP: largest relative loss difference {worst:.3g}")
    wh, wf = final_weights(hsdp), final_weights(fsdp)
    assert wh.keys() == wf.keys()
    for name in wh:
        torch.testing.assert_close(wh[name], wf[name], rtol=1e-4, atol=1e-6, msg=name)
    state = json.loads((hsdp / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["replicate_degree"] == 2 and state["world_size"] == WORLD

    # (b) two torchrun agents ("nodes") of 2 = one launch of 4, same mesh: bitwise (the same computation)
    stderr, stdout = two_agents(train_args(nodes, data, *hsdp_args))
    assert "mesh replicate=2 shard=2 sp=1, 2 nodes of 2" in stderr and "pgdpo train: done" in stdout
    assert "wider than a node" not in stderr  # each shard group is one node's: no cross-node all-gather note
    one, two = records(hsdp), records(nodes)
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in two] == [r["loss"] for r in one]
    assert [r["grad_norm"] for r in two] == [r["grad_norm"] for r in one]
    assert all(torch.equal(t, final_weights(nodes)[k]) for k, t in final_weights(hsdp).items())

    # an HSDP checkpoint (DCP, DTensors on the 2-D mesh) resumes bitwise: from step 1 of the HSDP run
    resumed.mkdir()
    shutil.copytree(hsdp / "checkpoint-1", resumed / "checkpoint-1")
    shutil.copy(hsdp / "metrics.jsonl", resumed / "metrics.jsonl")
    proc = run(torchrun(WORLD, *train_args(resumed, data, *hsdp_args, "--resume", "latest")))
    assert "resumed from" in proc.stderr and "replicate_degree" not in proc.stderr  # nothing changed
    again = records(resumed)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in again] == [(r["loss"], r["grad_norm"]) for r in one]
    assert all(math.isfinite(r["loss"]) for r in again)

    # a plain FSDP2 checkpoint resumes under HSDP: DCP re-shards onto the 2-D mesh, the log says what
    # changed, and step 3 is the FSDP run's to float32 reduction order
    switched = tmp_path / "switched"
    switched.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", switched / "checkpoint-2")
    shutil.copy(fsdp / "metrics.jsonl", switched / "metrics.jsonl")
    proc = run(torchrun(WORLD, *train_args(switched, data, *hsdp_args, "--resume", "latest")))
    assert "written with distributed.replicate_degree 1, this run has 2" in proc.stderr
    assert_same_training(records(switched), records(fsdp))
    assert records(switched)[:2] == records(fsdp)[:2]


@pytest.mark.distributed
def test_hsdp_with_sequence_parallel_trains_as_fsdp_with_it(tmp_path, data):
    """HSDP 2 x 2 with sp_degree 2 (each shard group is one sequence group) = FSDP2 over 4 with sp_degree 2,
    with LoRA adapters and the adapters-off reference (a frozen base sharded on the 2-D mesh):
    the same 2 data-parallel groups, data and noise; the loss factor sp_degree (parallel.gradient_scale)
    gives the same mean under HSDP's two-stage average (reduce-scatter in a shard group, all-reduce across
    groups) as under FSDP2's one (pgdpo/train/parallel.py): a wrong count is off by 2x."""
    fsdp, hsdp = tmp_path / "fsdp-sp", tmp_path / "hsdp-sp"
    sp = ("--distributed.sp_degree", "2", "--save-every", "0", "--model.lora_rank", "4", "--method.reference",
          "lora")
    proc = run(torchrun(WORLD, *train_args(fsdp, data, *sp)))
    assert "mesh replicate=1 shard=4 sp=2, sequence parallel 2 (Ulysses; 2 data-parallel group(s))" in proc.stderr
    proc = run(torchrun(WORLD, *train_args(hsdp, data, *sp, "--distributed.replicate_degree", "2")))
    assert "mesh replicate=2 shard=2 sp=2, sequence parallel 2 (Ulysses; 2 data-parallel group(s))" in proc.stderr
    worst = assert_same_training(records(hsdp), records(fsdp))
    print(f"HSDP+SP vs FSDP+SP: largest relative loss difference {worst:.3g}")


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(("world", "settings", "message"), [
    (4, {"replicate_degree": 3}, r"distributed.replicate_degree \(3\) must divide the number of processes \(4\)"),
    (8, {"replicate_degree": 2, "sp_degree": 3},
     r"distributed.sp_degree \(3\) must divide the processes of a shard group \(4 = 8 processes / "
     r"replicate_degree 2\)"),
    (8, {"replicate_degree": 4, "sp_degree": 4}, r"distributed.sp_degree \(4\) must divide .* shard group \(2"),
    (4, {"replicate_degree": 2, "strategy": "ddp"},
     r"distributed.replicate_degree: 2 \(HSDP\) needs distributed.strategy: fsdp"),
    (1, {"replicate_degree": 2}, r"distributed.replicate_degree \(2\) must divide the number of processes \(1\)"),
])
def test_bad_meshes_name_the_key(monkeypatch, world, settings, message):
    """A mesh that cannot be built is refused by the trainer's process-group setup (before any collective:
    no hang) and by the layout `pgdpo plan` resolves, each naming the key."""
    from pgdpo.train.config import ConfigError, load_config
    from pgdpo.train.distributed import init_distributed
    from pgdpo.train.layout import resolve_layout

    cfg = load_config(DEMO, [("model.path", None), ("train.batch_size", 8), ("train.micro_batch_size", 1),
                             *((f"distributed.{k}", v) for k, v in settings.items())])
    with pytest.raises(ConfigError, match=message):
        resolve_layout(cfg, world)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=message):
        init_distributed(cfg.distributed, "cpu")


def test_replicate_degree_at_least_one():
    from pgdpo.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="distributed.replicate_degree"):
        load_config(DEMO, [("distributed.replicate_degree", 0)])


def test_layout_of_a_valid_hsdp_mesh():
    """32 processes as 4 nodes of 8 with 2-way sequence parallelism: shard groups of 8, 16 data groups."""
    from pgdpo.train.config import load_config
    from pgdpo.train.layout import resolve_layout

    cfg = load_config(DEMO, [("model.path", None), ("train.batch_size", 16), ("train.micro_batch_size", 1),
                             ("distributed.replicate_degree", 4), ("distributed.sp_degree", 2)])
    layout = resolve_layout(cfg, 32)
    assert (layout.replicate_degree, layout.shard_degree, layout.sp_degree, layout.dp_size) == (4, 8, 2, 16)
    assert layout.grad_accum == 1


@pytest.mark.parametrize(("world", "per_node", "replicate", "sp", "notes"), [
    (16, 8, 2, 1, []),  # HSDP with a shard group per node: nothing crosses nodes but the all-reduce
    (16, 8, 1, 1, ["shard group of 16 ranks is wider than a node (8 processes)", "replicate_degree 2"]),
    (16, 4, 2, 8, ["shard group of 8 ranks is wider", "sequence group of 8 ranks is wider than a node"]),
])
def test_start_notes_where_collectives_cross_nodes(world, per_node, replicate, sp, notes):
    """The trainer's start line counts the nodes (torchrun's LOCAL_WORLD_SIZE) and says when a shard group
    or a sequence group spans several of them (no process group needed: the layout alone decides)."""
    from types import SimpleNamespace

    from pgdpo.train.distributed import DistState
    from pgdpo.train.trainer import Trainer

    state = DistState(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), strategy="fsdp",
                      sp_degree=sp, replicate_degree=replicate, local_world_size=per_node)
    assert state.nodes == world // per_node
    assert state.mesh_description() == f"replicate={replicate} shard={world // replicate} sp={sp}"
    said = []
    Trainer._note_node_spans(SimpleNamespace(dist=state, info=said.append))
    assert len(said) == (world // replicate > per_node) + (sp > per_node)
    for note in notes:
        assert any(note in line for line in said), (note, said)
