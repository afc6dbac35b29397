"""Loading that scales (``pgdpo.train.loading``): meta init, FSDP2 sharding, per-rank sliced reads.

A tiny Wan transformer is saved with diffusers' ``save_pretrained`` (several safetensors shards, so the
index is exercised); 2 real processes (``torchrun``, gloo) load it sharded and must hold exactly what a
single-process ``from_pretrained`` holds: every parameter and buffer (the non-persistent rotary tables
included, which no file holds and ``to_empty`` leaves as garbage), for full fine-tuning and LoRA, with a
copy and an adapters-off reference.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgdpo.train.config import ConfigError, from_dict
from pgdpo.train.distributed import DistState
from pgdpo.train.loading import LoadError, build_models, file_key, pretrained_config
from pgdpo.train.models import adapter_for, build_model, load_model

from ._launch import ROOT, run, torchrun

sys.path.insert(0, str(ROOT / "tests"))
from _load_worker import probe_inputs  # noqa: E402

CASES = [[0, "copy"], [4, "lora"], [4, "copy"]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Wan T2V saved by diffusers in 4+ safetensors shards (rope tables of a 64-token maximum)."""
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    build_model("tiny-wan-t2v", seed=3).save_pretrained(folder, max_shard_size="30KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return str(folder)


def one_process():
    return DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), strategy="none")


def config(path, lora_rank=0, reference="copy", **extra):
    return from_dict({"model": {"path": path, "lora_rank": lora_rank, "precision": "fp32", **extra},
                      "method": {"reference": reference}, "device": "cpu"})


@pytest.fixture(scope="module")
def two_rank_load(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("loaded")
    run(torchrun(2, str(ROOT / "tests" / "_load_worker.py"), "--path", saved, "--out", str(out),
                 "--cases", json.dumps(CASES)))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"lora{r}-{ref}" for r, ref in CASES])
def test_two_process_load_equals_from_pretrained(saved, two_rank_load, case):
    lora_rank, reference = CASES[case]
    expected = load_model(saved).eval()
    want = expected.state_dict()
    policy = load_file(two_rank_load / f"case{case}-policy.safetensors")
    base = {file_key(k): v for k, v in policy.items() if ".lora_" not in k}
    assert base.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(base[k], v), k  # bitwise: the same fp32 bytes, read by rows
    lora = {k: v for k, v in policy.items() if ".lora_" in k}
    assert bool(lora) == bool(lora_rank)
    for k, v in lora.items():
        assert (v == 0).all() if ".lora_B." in k else v.abs().sum() > 0, k
    if lora_rank:  # the adapters' init does not depend on the number of processes
        model, _ = build_models(config(saved, lora_rank, reference), one_process(), pretrained_config(saved),
                                with_reference=False)
        single = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        assert single.keys() == lora.keys()
        assert all(torch.equal(single[k], lora[k]) for k in lora)
    if reference == "copy":
        ref = load_file(two_rank_load / f"case{case}-reference.safetensors")
        assert ref.keys() == want.keys() and all(torch.equal(ref[k], want[k]) for k in want)

    buffers = dict(expected.named_buffers())
    assert {"rope.freqs_cos", "rope.freqs_sin"} <= buffers.keys()
    noisy, t, batch = probe_inputs(adapter_for(expected))
    with torch.no_grad():
        want_out = adapter_for(expected).predict(expected, noisy, t, batch)
    for rank in (0, 1):
        held = load_file(two_rank_load / f"case{case}-rank{rank}.safetensors")
        for prefix in ("policy",) + (("reference",) if reference == "copy" else ()):
            for k, v in buffers.items():  # rotary tables: recomputed, not the garbage of to_empty
                assert torch.equal(held[f"{prefix}.{k}"], v), (rank, prefix, k)
        # LoRA B = 0: policy and reference compute what the pretrained model computes
        torch.testing.assert_close(held["output.policy"], want_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(held["output.reference"], want_out, rtol=1e-5, atol=1e-6)


def test_random_init_takes_the_same_path(saved):
    """No model.path: a seeded build, equal to build_model(name, seed) (and so equal on every rank)."""
    cfg = from_dict({"model": {"name": "tiny-wan-i2v", "precision": "fp32"}, "seed": 5, "device": "cpu"})
    model, ref = build_models(cfg, one_process(), cfg_arch("tiny-wan-i2v"), with_reference=True)
    want = build_model("tiny-wan-i2v", seed=5)
    for name, v in [*want.state_dict().items(), *want.named_buffers()]:
        got = dict([*model.state_dict().items(), *model.named_buffers()])[name]
        assert torch.equal(got, v), name
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def cfg_arch(name):
    from pgdpo.train.models import resolve_config

    return resolve_config(name)


def test_fp32_modules_stay_fp32_under_bf16_mixed_precision(monkeypatch):
    """FSDP2 with MixedPrecisionPolicy(bf16) (forced here on CPU): the blocks compute in bf16, while
    diffusers' _keep_in_fp32_modules (time embedder, scale_shift_table, norms) see fp32 weights."""
    import pgdpo.train.distributed as distributed
    import pgdpo.train.loading  # noqa: F401

    monkeypatch.setattr(distributed, "mixed_precision_dtype", lambda precision, device: torch.bfloat16)
    state = distributed.init_distributed(from_dict({"distributed": {"strategy": "fsdp"}}).distributed, "cpu")
    try:
        cfg = from_dict({"model": {"name": "tiny-wan-t2v", "precision": "bf16"}, "device": "cpu",
                         "distributed": {"strategy": "fsdp"}})
        model, _ = build_models(cfg, state, cfg_arch("tiny-wan-t2v"), with_reference=False)
        seen = {}

        def record(key, module, attr):
            def hook(mod, args):  # the dtype each module computes with (after FSDP2's all-gather)
                seen.setdefault(key, getattr(mod, attr).dtype)
            return module.register_forward_pre_hook(hook)

        block = model.blocks[0]
        hooks = [record("to_q", block.attn1.to_q, "weight"), record("table", block, "scale_shift_table"),
                 record("time", model.condition_embedder.time_embedder.linear_1, "weight"),
                 record("norm2", block.norm2, "weight")]
        noisy, t, batch = probe_inputs(adapter_for(model))
        with torch.no_grad():
            out = adapter_for(model).predict(model, noisy.bfloat16(), t, batch)
        for h in hooks:
            h.remove()
        assert torch.isfinite(out.float()).all()
        assert seen == {"to_q": torch.bfloat16, "table": torch.float32, "time": torch.float32,
                        "norm2": torch.float32}
    finally:
        state.shutdown()


def test_weights_that_do_not_fit_name_the_tensor(saved, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    with open(bad / "config.json") as f:
        conf = json.load(f)
    conf["ffn_dim"] = 40
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LoadError, match=r"tensor 'blocks.0.ffn.net.0.proj.weight' has shape \[48, 24\]"):
        build_models(config(str(bad)), one_process(), pretrained_config(str(bad)), with_reference=False)
    extra = tmp_path / "extra"  # one file (no index) holding a tensor the model does not have
    extra.mkdir()
    shutil.copy(Path(saved) / "config.json", extra / "config.json")
    save_file({**load_model(saved).state_dict(), "unused.weight": torch.zeros(2)},
              extra / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LoadError, match="unused.weight"):
        build_models(config(str(extra)), one_process(), pretrained_config(str(extra)), with_reference=False)


def test_bad_config_value_fails_before_any_weight_is_read(tmp_path, capsys):
    """method.eps: 0 (a NaN margin at the first step) is refused at config load, naming the key, before
    the trainer opens a file: here the weights folder is unreadable, and the error is about the key."""
    from pgdpo.train.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"method.eps must be > 0, got 0.0"):
        from_dict({"method": {"eps": 0}, "model": {"path": str(folder)}})
    assert main(["--model.path", str(folder), "--method.eps", "0", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "method.eps must be > 0" in err and "config.json" not in err
    assert not (tmp_path / "o").exists()  # nothing was started
