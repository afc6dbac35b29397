"""The planner: exact parameter counts, the paper's setting fits, memory and time move the right way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgdpo.tools.plan import GPUS, PlanSettings, block_activation_bytes, plan, settings_from_config

PAPER = {"model": "wan2.1-t2v-14b", "frames": 81, "height": 480, "width": 832, "batch_size": 16}


def _meta_numel(name: str) -> int:
    """Parameter count of the diffusers class built on the meta device straight from MODEL_CONFIGS."""
    import diffusers

    from pgdpo.train.models import MODEL_CONFIGS

    config = dict(MODEL_CONFIGS[name])
    cls = getattr(diffusers, config.pop("_class_name"))
    with torch.device("meta"):
        model = cls(**config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"])
def test_parameter_counts_are_the_meta_models(name):
    result = plan(gpus=8, gpu="h20", model=name, suggest=False)
    assert result["model"]["parameters"] == _meta_numel(name)
    assert result["model"]["trainable_parameters"] == result["model"]["parameters"]


def test_known_sizes_and_tokens():
    r14 = plan(gpus=32, gpu="h20", suggest=False, **PAPER)
    assert 14.2e9 < r14["model"]["parameters"] < 14.4e9  # "14B"
    assert r14["model"]["latent_shape"] == [16, 21, 60, 104]
    assert r14["model"]["tokens_per_video"] == 21 * 30 * 52 == 32760
    assert 1.3e9 < plan(gpus=1, gpu="h200", model="wan2.1-t2v-1.3b", suggest=False)["model"]["parameters"] < 1.5e9


def test_lora_parameter_count():
    r = plan(gpus=8, gpu="h20", model="wan2.1-t2v-1.3b", lora_rank=16, reference="lora", suggest=False)
    d, layers = 12 * 128, 30  # to_q/k/v/out of self- and cross-attention: 8 square d x d linears per block
    assert r["model"]["trainable_parameters"] == layers * 8 * 16 * (d + d)
    assert r["memory_gib"]["reference"] == 0


def test_paper_setting_fits_on_32_h20(tmp_path):
    result = plan(gpus=32, gpu="h20", gradient_checkpointing=True, **PAPER)
    assert result["fits"], result["memory_gib"]
    assert result["total_gib"] <= result["usable_gib"] < GPUS["h20"].memory_gib
    # the same from a YAML config in the trainer's schema, with keys the planner does not need
    config = tmp_path / "paper.yaml"
    config.write_text("output_dir: runs/paper\nseed: 3\n"
                      "model: {name: wan2.1-t2v-14b, gradient_checkpointing: true, precision: bf16}\n"
                      "data: {path: data, frames: 81, height: 480, width: 832}\n"
                      "method: {name: pgdpo, beta: 100, reference: copy}\n"
                      "optim: {name: adamw, lr: 1.0e-6}\ntrain: {batch_size: 16, max_steps: 3000}\n"
                      "logging: {trackers: [tensorboard]}\n")
    from_yaml = plan(str(config), gpus=32, gpu="h20")
    assert from_yaml["fits"] and from_yaml["total_gib"] == pytest.approx(result["total_gib"])


def test_configs_are_read_by_the_trainers_loader(tmp_path, capsys):
    """A misspelt key or a bad value is the error `pgdpo train` gives, not silently ignored."""
    from pgdpo.tools.plan import main
    from pgdpo.train.config import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: wan2.1-t2v-14b, gradient_checkpoint: true}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.gradient_checkpoint' \(did you mean "
                                          r"'model.gradient_checkpointing'\?\)"):
        settings_from_config(str(config))
    assert main(["--config", str(config), "--gpus", "8"]) == 2
    assert "model.gradient_checkpoint'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="method.eps must be > 0"):
        settings_from_config({"model": {"name": "wan2.1-t2v-14b"}, "method": {"eps": 0}})


def test_config_defaults_are_the_trainers(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: wan2.1-t2v-14b}\n")
    s = settings_from_config(str(config))
    assert s.gradient_checkpointing is True and s.reference == "copy" and s.batch_size == 16
    config.write_text("model: {name: wan2.1-t2v-14b, lora_rank: 32}\nmethod: {reference: lora}\n")
    assert settings_from_config(str(config)).reference == "lora"
    config.write_text("model: {name: wan2.1-t2v-14b}\nmethod: {ref_ema_every: 10}\n")
    assert settings_from_config(str(config)).reference == "ema"


def test_memory_decreases_with_more_gpus_and_with_checkpointing():
    totals = [plan(gpus=n, gpu="h20", suggest=False, **PAPER)["total_gib"] for n in (8, 16, 32, 64)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    on = plan(gpus=32, gpu="h20", gradient_checkpointing=True, suggest=False, **PAPER)
    off = plan(gpus=32, gpu="h20", gradient_checkpointing=False, suggest=False, **PAPER)
    assert on["memory_gib"]["activations"] < off["memory_gib"]["activations"] / 10
    assert on["total_gib"] < off["total_gib"] and not off["fits"]


def test_14b_on_8_h20_needs_lora_or_more_gpus():
    full = plan(gpus=8, gpu="h20", gradient_checkpointing=True, **PAPER)
    assert not full["fits"]
    fitting = {s["change"] for s in full["suggestions"] if s["fits"]}
    assert any(c.startswith("LoRA") for c in fitting)
    lora = plan(gpus=8, gpu="h20", gradient_checkpointing=True, lora_rank=64, reference="lora", **PAPER)
    assert lora["fits"] and lora["batch"]["grad_accumulation"] == 2
    assert lora["memory_gib"]["optimizer states"] < 1


def test_step_time_counts_recompute_and_reference():
    common = dict(gpus=32, gpu="h20", suggest=False, **PAPER)
    on = plan(gradient_checkpointing=True, **common)
    off = plan(gradient_checkpointing=False, **common)
    sft = plan(gradient_checkpointing=False, reference="none", **common)
    # forward + 2x backward + reference forward = 4 forwards; + recompute = 5; SFT (no reference) = 3
    assert on["flops"]["per_step"] / off["flops"]["per_step"] == pytest.approx(5 / 4)
    assert sft["flops"]["per_step"] / off["flops"]["per_step"] == pytest.approx(3 / 4)
    fwd = on["flops"]["forward_per_video"]
    assert on["flops"]["per_step"] == 2 * on["batch"]["pairs_per_step"] * 5 * fwd
    assert on["time"]["compute_s"] == pytest.approx(on["flops"]["per_step"] / (32 * 148e12 * 0.40))
    faster = plan(gradient_checkpointing=True, **{**common, "gpu": "h100"})
    assert faster["time"]["compute_s"] == pytest.approx(on["time"]["compute_s"] * 148 / 989)


def test_block_activation_estimate_matches_measured_saved_tensors():
    """The per-block bytes the planner assumes vs what diffusers' Wan block really saves for backward."""
    from pgdpo.train.models import build_model

    config = {"_class_name": "WanTransformer3DModel", "patch_size": (1, 2, 2), "num_attention_heads": 2,
              "attention_head_dim": 64, "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 32,
              "ffn_dim": 512, "num_layers": 2, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
              "eps": 1e-6, "rope_max_seq_len": 64}
    model = build_model(config, dtype=torch.bfloat16, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    block = model.blocks[1]
    forward = block.forward

    def hooked(*args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return forward(*args, **kwargs)

    block.forward = hooked
    f, h, w, text = 4, 8, 8, 16
    model(torch.randn(1, 16, f, 2 * h, 2 * w, dtype=torch.bfloat16), torch.tensor([500.0]),
          torch.randn(1, text, 32, dtype=torch.bfloat16), return_dict=False)
    measured = sum(saved.values())
    estimate = block_activation_bytes(128, 512, f * h * w, text, "bf16")
    assert abs(estimate - measured) / measured < 0.10, (estimate, measured)


def test_cli_json_table_and_errors(capsys):
    from pgdpo.cli import main

    assert main(["plan", "--gpus", "32", "--gpu", "h20", "--json", "--steps", "3000"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["time"]["total_s"] == pytest.approx(3000 * result["time"]["step_s"])
    assert main(["plan", "--model", "wan2.1-t2v-14b", "--frames", "81", "--height", "480", "--width", "832",
                 "--batch", "16", "--gpus", "8", "--gpu", "h20", "--checkpointing"]) == 0
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "to make it fit" in table and "LoRA" in table
    assert main(["plan", "--gpus", "8", "--frames", "80"]) == 2
    assert "4k+1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--gpus", "8", "--gpu", "v100"])


def test_plan_settings_validation():
    with pytest.raises(ValueError, match="needs lora_rank > 0"):
        plan(gpus=8, reference="lora")
    with pytest.raises(TypeError, match="unknown setting"):
        plan(gpus=8, resolution=480)
    with pytest.raises(ValueError, match="unknown gpu"):
        plan(gpus=8, gpu="tpu")
    assert PlanSettings().validate().latent_shape == (16, 21, 60, 104)


def test_shipped_8xh20_config_fits_full_fine_tuning_at_the_papers_resolution():
    """configs/wan2.1-i2v-14b-8xh20.yaml: full fine-tuning of the 14B I2V model, frozen copy reference,
    480x832x81, through the trainer's loader; sequence parallelism 8 is what makes it fit."""
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / "configs" / "wan2.1-i2v-14b-8xh20.yaml")
    result = plan(config, gpus=8, gpu="h20", suggest=False)
    s = result["settings"]
    assert (s["model"], s["lora_rank"], s["reference"], s["frames"], s["height"], s["width"]) == \
        ("wan2.1-i2v-14b", 0, "copy", 81, 480, 832)
    assert result["model"]["tokens_per_video"] == 32760 and s["sp_degree"] == 8
    assert result["fits"] and result["setup_peak_gib"] < result["total_gib"] <= result["usable_gib"]
    without = plan(config, gpus=8, gpu="h20", suggest=False, sp_degree=1)
    assert not without["fits"]


def test_sequence_parallelism_divides_activations_not_the_static_figures():
    base = plan(gpus=8, gpu="h20", suggest=False, gradient_checkpointing=True, **PAPER)
    sp = [plan(gpus=8, gpu="h20", suggest=False, gradient_checkpointing=True, sp_degree=n, **PAPER)
          for n in (2, 4, 8)]
    acts = [base["memory_gib"]["activations"]] + [r["memory_gib"]["activations"] for r in sp]
    assert acts == sorted(acts, reverse=True) and acts[-1] < acts[0] / 4
    assert all(r["static_bytes_per_rank"] == base["static_bytes_per_rank"] for r in sp)
    assert [r["batch"]["grad_accumulation"] for r in sp] == [4, 8, 16]  # one pair per group per forward
    assert all(r["time"]["sp_comm_s"] > 0 for r in sp) and base["time"]["sp_comm_s"] == 0
    with pytest.raises(ValueError, match="must divide the attention heads"):
        plan(gpus=6, gpu="h20", suggest=False, sp_degree=6, **PAPER)  # 40 heads


def test_checkpoint_every_k_trades_memory_for_recompute():
    runs = [plan(gpus=32, gpu="h20", suggest=False, gradient_checkpointing=True, checkpoint_every=k, **PAPER)
            for k in (1, 2, 4)]
    acts = [r["memory_gib"]["activations"] for r in runs]
    recompute = [r["flops"]["per_video"]["recompute"] for r in runs]
    assert acts == sorted(acts) and recompute == sorted(recompute, reverse=True)


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_plan_and_train_resolve_one_layout_for_every_shipped_config(path, tmp_path):
    """`pgdpo plan --config X --gpus N` and `pgdpo train` on N processes read the run the same way: the one
    Layout of pgdpo.train.layout (model.path's config.json when set, reference kind, strategy, mesh,
    accumulation, checkpointing), for every world size the trainer accepts."""
    import json

    from pgdpo.train.config import ConfigError, load_config
    from pgdpo.train.layout import resolve_layout
    from pgdpo.train.models import resolve_config

    overrides = []
    name = load_config(path).model.name
    if load_config(path).model.path:  # a diffusers folder holding the named model's config.json
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text(json.dumps(resolve_config(name)))
        overrides = [("model.path", str(tmp_path))]
    config = load_config(path, overrides)
    accepted = 0
    for gpus in (1, 2, 8, 32):
        try:
            train = resolve_layout(config, gpus)  # what Trainer._setup calls
        except ConfigError:
            continue
        accepted += 1
        result = plan(str(path), gpus=gpus, suggest=False, config_overrides=overrides)
        assert result["layout"] == train.as_dict()
        s, b = result["settings"], result["batch"]
        assert s["reference"] == train.reference and s["sp_degree"] == train.sp_degree
        assert s["gradient_checkpointing"] == (train.checkpoint_every is not None)
        assert result["strategy"] == train.strategy and b["grad_accumulation"] == train.grad_accum
        assert result["model"]["family"] == train.family
    assert accepted, f"{path.name}: the trainer accepts none of the world sizes tried"


def test_plan_reads_train_style_overrides(capsys):
    from pgdpo.tools.plan import main

    assert main(["--gpus", "8", "--model.name", "wan2.1-t2v-1.3b", "--train.batch_size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layout"]["model"] == "wan2.1-t2v-1.3b" and result["layout"]["grad_accum"] == 4
    assert main(["--gpus", "8", "--train.batch_sise", "32"]) == 2
    assert "train.batch_size" in capsys.readouterr().err  # the trainer's did-you-mean
