"""A model users can load: ``<output_dir>/final`` after 2-process FSDP2 training, and ``pgdpo export``.

The run trains a tiny Wan transformer loaded from a saved diffusers folder (``model.path``); the
exported folder is loaded back with diffusers (``from_pretrained``, or the base plus
``load_lora_adapter``) and must compute what the trained, sharded policy computed.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgdpo.train.data.synth import synth_dataset
from pgdpo.train.models import MODEL_CONFIGS, adapter_for, build_model, load_model

from ._launch import DEMO, run, torchrun

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _load_worker import probe_inputs  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "transformer"
    build_model("tiny-wan-t2v", seed=3).save_pretrained(folder, max_shard_size="30KB")
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs"
    synth_dataset(path, pairs=8, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    return str(path)


def train(out, base, data, *extra):
    cmd = torchrun(2, str(ROOT / "tests" / "_train_worker.py"), "--config", DEMO,
           "--output-dir", str(out), "--data.path", data, "--model.path", base, "--max-steps", "3",
           "--save-every", "3", "--logging.progress", "false", "--logging.plots", "false",
           "--logging.trackers", "[]", "--train.batch_size", "2", "--train.micro_batch_size", "1",
           "--optim.warmup_steps", "0", "--optim.lr", "1e-2", *extra)
    proc = run(cmd)
    assert "final model" in proc.stdout
    return load_file(Path(out) / "probe.safetensors")


def forward(model):
    noisy, t, batch = probe_inputs(adapter_for(model), seed=1)
    with torch.no_grad():
        return adapter_for(model).predict(model.eval(), noisy, t, batch)


def test_full_fine_tuning_final_and_export_load_in_diffusers(tmp_path, base, data):
    from pgdpo.train.export import main as export_main

    out = tmp_path / "run"
    probe = train(out, base, data)
    assert int(probe["replicated"]) > 0  # the fp32-kept parameters were trained (and agree across ranks)
    final = out / "final"
    assert (final / "config.json").is_file()
    assert (final / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((final / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    trained = load_model(final)
    torch.testing.assert_close(forward(trained), probe["output"], rtol=1e-5, atol=1e-6)
    initial = load_model(base)
    assert not torch.allclose(forward(initial), probe["output"])  # training moved the weights

    # pgdpo export of the 2-process checkpoint, in one process: the same weights
    assert export_main(["--checkpoint", str(out / "checkpoint-3"), "--out", str(tmp_path / "exp"),
                        "--max-shard-size-gb", str(30e3 / 1024 ** 3)]) == 0
    exported = load_model(tmp_path / "exp")
    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    index = json.loads((tmp_path / "exp" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # 30 KB files: the sharded layout, with its index
    for (k, a), (k2, b) in zip(sorted(exported.state_dict().items()), sorted(trained.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


def test_lora_final_loads_with_load_lora_adapter(tmp_path, base, data):
    out = tmp_path / "lora"
    probe = train(out, base, data, "--model.lora_rank", "4", "--method.reference", "lora")
    final = out / "final"
    weights = load_file(final / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and ".lora_" in k for k in weights)
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in weights.items())  # trained
    model = load_model(base)
    # the transformer's own reader (which, without weight_name / use_safetensors, only looks for .bin)
    model.load_lora_adapter(str(final), weight_name="pytorch_lora_weights.safetensors")
    # the pipeline's reader (pipe.load_lora_weights(final) reads the folder with it), default arguments
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state = WanLoraLoaderMixin.lora_state_dict(str(final))
    state = state[0] if isinstance(state, tuple) else state
    assert state.keys() == weights.keys()
    torch.testing.assert_close(forward(model), probe["output"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(forward(load_model(base)), probe["output"])


def test_full_export_holds_one_file_at_a_time(tmp_path):
    """A 110 MB model sharded over 2 processes is exported in 8 MB files: the writing rank's resident memory
    grows by at most one file's tensors plus the tensor being gathered and its gloo staging copy (never a
    whole state dict, which the same probe sees at >= 0.9x the model), the other rank's by one tensor; the
    folder is diffusers' sharded layout and loads with ``from_pretrained`` to the saved weights."""
    config = {**MODEL_CONFIGS["tiny-wan-t2v"], "num_attention_heads": 8, "attention_head_dim": 64,
              "ffn_dim": 2048, "num_layers": 6, "text_dim": 64}
    base = tmp_path / "base"
    build_model(config, seed=0).save_pretrained(base)
    shard, out, report = 8 * 2 ** 20, tmp_path / "exported", tmp_path / "report.jsonl"
    # every tensor >= 64 KB gets its own mapping, returned to the OS when freed: resident memory is live
    # memory (glibc's heap would otherwise keep freed buffers and hide a later allocation from the probe)
    run(torchrun(2, str(ROOT / "tests" / "_export_worker.py"), "--path", str(base), "--out", str(out),
                 "--max-shard-size", str(shard), "--report", str(report)),
        env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    ranks = sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    slack = 4 * 2 ** 20  # Python objects, the safetensors header, the index
    for r in ranks:
        assert r["whole"] >= 0.9 * r["model_bytes"], r  # the probe sees gathered tensors
        one = r["largest_tensor_bytes"]
        bound = (shard + 2 * one if r["rank"] == 0 else 2 * one) + slack
        assert r["export"] <= bound, (r, bound)
        assert bound < 0.3 * r["model_bytes"]  # far from a whole state dict

    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= ranks[0]["model_bytes"] // shard
    for name in files:  # each file holds at most max_shard_size bytes (or one larger tensor)
        tensors = load_file(out / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= shard or len(tensors) == 1, (name, size)
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(out).state_dict()
    saved = WanTransformer3DModel.from_pretrained(base).state_dict()
    assert exported.keys() == saved.keys()
    for k in saved:
        assert torch.equal(exported[k], saved[k]), k
