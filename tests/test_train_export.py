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
from pgdpo.train.models import adapter_for, build_model, load_model

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
