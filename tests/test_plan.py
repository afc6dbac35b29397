"""The planner: exact parameter counts, the paper's setting fits, memory and time move the right way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgdpo.tools.plan import GPUS, block_activation_bytes, plan

#: the paper's setting (sec. 4.1) as `pgdpo train --section.key VALUE` overrides of the trainer's defaults:
#: Wan2.1 T2V 14B, 480p x 81 frames, 16 pairs per step (the defaults give bf16, a frozen copy reference,
#: micro-batch 1, 512 text tokens, and activation checkpointing of every block: `auto` at 14B)
PAPER = [("model.name", "wan2.1-t2v-14b"), ("data.frames", 81), ("data.height", 480), ("data.width", 832),
         ("train.batch_size", 16)]


def paper(*extra):
    """The paper's setting with ``(dotted_key, value)`` overrides added."""
    return [*PAPER, *extra]


CHECKPOINTING = ("model.gradient_checkpointing", True)
NO_CHECKPOINTING = ("model.gradient_checkpointing", False)


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
    result = plan(gpus=8, gpu="h20", config_overrides=[("model.name", name)], suggest=False)
    assert result["model"]["parameters"] == _meta_numel(name)
    assert result["model"]["trainable_parameters"] == result["model"]["parameters"]


def test_known_sizes_and_tokens():
    r14 = plan(gpus=32, gpu="h20", suggest=False, config_overrides=PAPER)
    assert 14.2e9 < r14["model"]["parameters"] < 14.4e9  # "14B"
    assert r14["model"]["latent_shape"] == [16, 21, 60, 104]
    assert r14["model"]["tokens_per_video"] == 21 * 30 * 52 == 32760
    r13 = plan(gpus=1, gpu="h200", config_overrides=[("model.name", "wan2.1-t2v-1.3b")], suggest=False)
    assert 1.3e9 < r13["model"]["parameters"] < 1.5e9


def test_lora_parameter_count():
    r = plan(gpus=8, gpu="h20", suggest=False, config_overrides=[
        ("model.name", "wan2.1-t2v-1.3b"), ("model.lora_rank", 16), ("method.reference", "lora")])
    d, layers = 12 * 128, 30  # to_q/k/v/out of self- and cross-attention: 8 square d x d linears per block
    assert r["model"]["trainable_parameters"] == layers * 8 * 16 * (d + d)
    assert r["memory_gib"]["reference"] == 0


def test_paper_setting_fits_on_32_h20(tmp_path):
    result = plan(gpus=32, gpu="h20", config_overrides=paper(CHECKPOINTING))
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
        plan(str(config), gpus=8, suggest=False)
    assert main(["--config", str(config), "--gpus", "8"]) == 2
    assert "model.gradient_checkpoint'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="method.eps must be > 0"):
        plan({"model": {"name": "wan2.1-t2v-14b"}, "method": {"eps": 0}}, gpus=8, suggest=False)
    # the trainer's cross-field rules, not a second copy of them
    with pytest.raises(ConfigError, match=r"method.reference: lora needs model.lora_rank > 0"):
        plan(gpus=8, config_overrides=paper(("method.reference", "lora")), suggest=False)
    with pytest.raises(ConfigError, match="unknown config key 'data.resolution'"):
        plan(gpus=8, config_overrides=paper(("data.resolution", 480)), suggest=False)
    with pytest.raises(TypeError):  # no second schema: config values come only through the config
        plan(gpus=8, frames=81)


def test_config_defaults_are_the_trainers(tmp_path):
    """What a config leaves out takes the trainer's defaults, and no config at all is the trainer's
    defaults (`pgdpo train` without --config): the planner has no defaults of its own."""
    from pgdpo.train.config import TrainConfig
    from pgdpo.train.layout import resolve_layout

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: wan2.1-t2v-14b}\n")
    s = plan(str(config), gpus=1, suggest=False)["settings"]
    assert s["gradient_checkpointing"] is True and s["reference"] == "copy" and s["batch_size"] == 16
    config.write_text("model: {name: wan2.1-t2v-14b, lora_rank: 32}\nmethod: {reference: lora}\n")
    assert plan(str(config), gpus=1, suggest=False)["settings"]["reference"] == "lora"
    config.write_text("model: {name: wan2.1-t2v-14b}\nmethod: {ref_ema_every: 10}\n")
    assert plan(str(config), gpus=1, suggest=False)["settings"]["reference"] == "ema"
    defaults = TrainConfig()
    result = plan(gpus=2, suggest=False)
    assert result["layout"] == resolve_layout(defaults, 2).as_dict()
    s = result["settings"]
    assert s["model"] == defaults.model.name and s["optimizer"] == defaults.optim.name
    assert (s["frames"], s["height"], s["width"], s["text_len"]) == (
        defaults.data.frames, defaults.data.height, defaults.data.width, defaults.data.text_len)
    assert (s["reshard_after_forward"], s["reference_sharded"], s["cpu_offload"], s["strategy"]) == (
        defaults.distributed.reshard_after_forward, defaults.distributed.reference_sharded,
        defaults.distributed.cpu_offload, defaults.distributed.strategy)
    assert s["checkpoint_every"] == defaults.model.checkpoint_every
    # the trainer's defaults with the same overrides pgdpo train would take
    assert plan(defaults, gpus=2, suggest=False) == result
    assert (plan(defaults, gpus=2, suggest=False, config_overrides=PAPER)["settings"]
            == plan(gpus=2, suggest=False, config_overrides=PAPER)["settings"])


def test_memory_decreases_with_more_gpus_and_with_checkpointing():
    totals = [plan(gpus=n, gpu="h20", suggest=False, config_overrides=PAPER)["total_gib"] for n in (8, 16, 32, 64)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    on = plan(gpus=32, gpu="h20", suggest=False, config_overrides=paper(CHECKPOINTING))
    off = plan(gpus=32, gpu="h20", suggest=False, config_overrides=paper(NO_CHECKPOINTING))
    assert on["memory_gib"]["activations"] < off["memory_gib"]["activations"] / 10
    assert on["total_gib"] < off["total_gib"] and not off["fits"]


def test_14b_on_8_h20_needs_lora_or_more_gpus():
    full = plan(gpus=8, gpu="h20", config_overrides=paper(CHECKPOINTING))
    assert not full["fits"]
    fitting = {s["change"] for s in full["suggestions"] if s["fits"]}
    assert any(c.startswith("LoRA") for c in fitting)
    lora = plan(gpus=8, gpu="h20", config_overrides=paper(CHECKPOINTING, ("model.lora_rank", 64),
                                                          ("method.reference", "lora")))
    assert lora["fits"] and lora["batch"]["grad_accumulation"] == 2
    assert lora["memory_gib"]["optimizer states"] < 1


def test_step_time_counts_recompute_and_reference():
    common = dict(gpus=32, gpu="h20", suggest=False)
    on = plan(config_overrides=paper(CHECKPOINTING), **common)
    off = plan(config_overrides=paper(NO_CHECKPOINTING), **common)
    sft = plan(config_overrides=paper(NO_CHECKPOINTING, ("method.name", "sft")), **common)
    assert sft["settings"]["reference"] == "none"
    # forward + 2x backward + reference forward = 4 forwards; + recompute = 5; SFT (no reference) = 3
    assert on["flops"]["per_step"] / off["flops"]["per_step"] == pytest.approx(5 / 4)
    assert sft["flops"]["per_step"] / off["flops"]["per_step"] == pytest.approx(3 / 4)
    fwd = on["flops"]["forward_per_video"]
    assert on["flops"]["per_step"] == 2 * on["batch"]["pairs_per_step"] * 5 * fwd
    assert on["time"]["compute_s"] == pytest.approx(on["flops"]["per_step"] / (32 * 148e12 * 0.40))
    faster = plan(config_overrides=paper(CHECKPOINTING), **{**common, "gpu": "h100"})
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

    assert main(["plan", "--model.name", "wan2.1-t2v-14b", "--gpus", "32", "--gpu", "h20", "--json",
                 "--steps", "3000"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["time"]["total_s"] == pytest.approx(3000 * result["time"]["step_s"])
    assert main(["plan", "--model.name", "wan2.1-t2v-14b", "--data.frames", "81", "--data.height", "480",
                 "--data.width", "832", "--train.batch_size", "16", "--gpus", "8", "--gpu", "h20",
                 "--model.gradient_checkpointing", "true"]) == 0
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "to make it fit" in table and "LoRA" in table
    assert main(["plan", "--gpus", "8", "--data.frames", "80"]) == 2
    err = capsys.readouterr().err
    assert "data.frames" in err and "4k+1" in err
    with pytest.raises(SystemExit):
        main(["plan", "--gpus", "8", "--gpu", "v100"])


@pytest.mark.parametrize("argv, key", [
    (["--frames", "81"], "--data.frames"), (["--frames=81"], "--data.frames"),
    (["--model", "wan2.1-t2v-14b"], "--model.name"), (["--batch", "16"], "--train.batch_size"),
    (["--checkpointing"], "--model.gradient_checkpointing true"),
    (["--no-checkpointing"], "--model.gradient_checkpointing false"),
    (["--lora-rank", "64"], "--model.lora_rank"), (["--sp-degree", "2"], "--distributed.sp_degree"),
    (["--replicated-reference"], "--distributed.reference_sharded false"),
])
def test_retired_flags_name_their_config_key(capsys, argv, key):
    """The planner's flags from before it read the trainer's config are errors that name the key."""
    from pgdpo.tools.plan import main

    assert main(["--gpus", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert f"{argv[0].split('=')[0]} is gone" in err and key in err


def test_help_shows_the_config_way(capsys):
    from pgdpo.tools.plan import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "without --config: the trainer's defaults" in out.lower().replace("\n", " ")
    assert "--model.name wan2.1-t2v-14b --data.frames 81" in out
    for retired in ("--frames", "--lora-rank", "--checkpointing", "--sp-degree"):
        assert f"  {retired} " not in out  # no option of that name


def test_video_size_must_give_whole_latents_and_patches():
    """The planner's one check of its own (the trainer takes the size from its dataset), naming the key."""
    with pytest.raises(ValueError, match=r"data.frames must be 1 \+ a multiple"):
        plan(gpus=8, suggest=False, config_overrides=paper(("data.frames", 80)))
    with pytest.raises(ValueError, match="data.width must be a multiple of the VAE's spatial factor 8"):
        plan(gpus=8, suggest=False, config_overrides=paper(("data.width", 836)))
    with pytest.raises(ValueError, match=r"data.height and data.width must be multiples of 16 x 16"):
        plan(gpus=8, suggest=False, config_overrides=paper(("data.height", 488)))
    with pytest.raises(ValueError, match="unknown gpu"):
        plan(gpus=8, gpu="tpu", suggest=False)


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
    without = plan(config, gpus=8, gpu="h20", suggest=False, config_overrides=[("distributed.sp_degree", 1)])
    assert not without["fits"]


def test_sequence_parallelism_divides_activations_not_the_static_figures():
    base = plan(gpus=8, gpu="h20", suggest=False, config_overrides=paper(CHECKPOINTING))
    sp = [plan(gpus=8, gpu="h20", suggest=False,
               config_overrides=paper(CHECKPOINTING, ("distributed.sp_degree", n))) for n in (2, 4, 8)]
    acts = [base["memory_gib"]["activations"]] + [r["memory_gib"]["activations"] for r in sp]
    assert acts == sorted(acts, reverse=True) and acts[-1] < acts[0] / 4
    assert all(r["static_bytes_per_rank"] == base["static_bytes_per_rank"] for r in sp)
    assert [r["batch"]["grad_accumulation"] for r in sp] == [4, 8, 16]  # one pair per group per forward
    assert all(r["time"]["sp_comm_s"] > 0 for r in sp) and base["time"]["sp_comm_s"] == 0
    with pytest.raises(ValueError, match="must divide the attention heads"):
        plan(gpus=6, gpu="h20", suggest=False, config_overrides=paper(("distributed.sp_degree", 6)))  # 40 heads


def test_checkpoint_every_k_trades_memory_for_recompute():
    runs = [plan(gpus=32, gpu="h20", suggest=False,
                 config_overrides=paper(CHECKPOINTING, ("model.checkpoint_every", k))) for k in (1, 2, 4)]
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


# ---------------------------------------------------------------------------------------- the network

PAPER_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "wan2.1-i2v-14b.yaml")


def _sharded_and_kept_numel(name: str) -> tuple[int, int]:
    """Elements FSDP2 shards and elements the trainer keeps whole in fp32 (``_keep_in_fp32_modules``), from
    the meta model and the trainer's list of kept names (not the planner's table)."""
    from pgdpo.train.models import build_model, keep_fp32_names, resolve_config

    model = build_model(resolve_config(name), device="meta")
    params = dict(model.named_parameters())
    kept = set(keep_fp32_names(model)) & set(params)  # (the names include buffers)
    # every sharded row count of the Wan 14B models divides by 8 and 32 (dims 5120, 13824, 64, ...): no padding
    assert all(p.shape[0] % 32 == 0 for n, p in params.items() if n not in kept and p.dim())
    kept_numel = sum(params[n].numel() for n in kept)
    return sum(p.numel() for p in params.values()) - kept_numel, kept_numel


def test_hsdp_collectives_and_links_by_hand():
    """The paper config as shipped (32 H20 = 4 nodes of 8; sp 2, replicate 4 x shard 8; full fine-tuning,
    bf16, copy reference, checkpointing of every block, 16 pairs = 1 per data-parallel group): each
    collective's bytes per rank from the ring formulas, its link, its time at the H20 table's bandwidths."""
    result = plan(PAPER_CONFIG, gpus=32, gpu="h20", suggest=False)
    assert result["mesh"] == {"replicate_degree": 4, "shard_degree": 8, "sp_degree": 2, "nodes": 4,
                              "gpus_per_node": 8}
    assert result["runnable"] and result["batch"]["grad_accumulation"] == 1
    sharded, kept = _sharded_and_kept_numel("wan2.1-i2v-14b")
    layers, d, tokens = 40, 5120, 32760
    intra, inter = 450e9, 25e9  # H20: NVLink 4 each way; 200 Gb/s per GPU
    by_name = {c["name"]: c for c in result["communication"]["collectives"]}
    expected = {  # name: (calls, bytes per rank, link)
        "all-gather, policy forward": (layers + 1, 7 / 8 * sharded * 2, "intra"),
        "all-gather, policy backward": (layers + 1, 7 / 8 * sharded * 2, "intra"),
        "all-gather, reference forward": (layers + 1, 7 / 8 * sharded * 2, "intra"),
        "reduce-scatter, gradients": (layers + 1, 7 / 8 * sharded * 4, "intra"),
        # each rank's fp32 gradient shard (1/8), ring all-reduce over the 4 nodes
        "all-reduce, gradient shards across replica groups (HSDP)": (layers + 1, 2 * 3 / 4 * sharded / 8 * 4,
                                                                     "inter"),
        "all-reduce, replicated fp32 gradients": (None, 2 * 31 / 32 * kept * 4, "inter"),
        # 4 per self-attention in the policy forward, backward, recompute and reference forward; each rank
        # holds 2 videos x tokens / 2 x d in bf16 and sends half of it
        "all-to-all, sequence parallel attention (q, k, v, out)": (4 * 4 * layers,
                                                                   4 * 4 * layers * 2 * tokens / 2 * d * 2 / 2,
                                                                   "intra"),
    }
    for name, (calls, sent, link) in expected.items():
        c = by_name[name]
        assert c["bytes_per_rank"] == pytest.approx(sent, rel=1e-12), name
        assert c["link"] == link and c["seconds"] == pytest.approx(sent / (intra if link == "intra" else inter))
        assert calls is None or c["calls"] == calls, name
    comm = result["communication"]
    hsdp_inter = expected["all-reduce, gradient shards across replica groups (HSDP)"][1] + 2 * 31 / 32 * kept * 4
    assert comm["inter_node_bytes"] == pytest.approx(hsdp_inter)
    assert comm["inter_node_s"] == pytest.approx(hsdp_inter / inter)
    # plain FSDP over all 32: every all-gather and reduce-scatter crosses the nodes
    plain_inter = 31 / 32 * sharded * (3 * 2 + 4) + 2 * 31 / 32 * kept * 4
    h = result["hsdp"]
    assert h["replicate_degree"] == 4 and h["plain_fsdp"]["inter_node_bytes"] == pytest.approx(plain_inter)
    assert h["saves_inter_node_s"] == pytest.approx((plain_inter - hsdp_inter) / inter)
    # the network is overridable: twice the inter-node bandwidth, half the inter-node time
    faster = plan(PAPER_CONFIG, gpus=32, gpu="h20", suggest=False, inter_node_gbps=50)
    assert faster["communication"]["inter_node_s"] == pytest.approx(comm["inter_node_s"] / 2)
    assert faster["communication"]["intra_node_s"] == pytest.approx(comm["intra_node_s"])


def test_where_groups_run():
    from pgdpo.tools.plan import crosses_nodes, mesh_groups

    g = mesh_groups(32, 8, 2)
    assert g["shard"][1] == list(range(8, 16)) and g["replicate"][3] == [3, 11, 19, 27]
    assert not crosses_nodes(g["shard"], 8) and crosses_nodes(g["replicate"], 8)
    assert not crosses_nodes(g["sequence"], 8) and crosses_nodes(g["world"], 8)
    assert crosses_nodes(mesh_groups(32, 16, 1)["shard"], 8) and not crosses_nodes(mesh_groups(32, 16, 1)["shard"], 16)
    assert crosses_nodes(mesh_groups(24, 6, 1)["shard"], 8)  # ranks 6..11 straddle two nodes
    assert not crosses_nodes(mesh_groups(8, 8, 1)["world"], 8)
    # 2 replica groups of 16: the shard groups span 2 nodes of 8 (inter) unless a node holds 16 GPUs
    cfg = [("distributed.sp_degree", 2), ("distributed.replicate_degree", 2)]
    links = {c["name"]: c["link"] for c in plan(PAPER_CONFIG, gpus=32, suggest=False,
                                                 config_overrides=cfg)["communication"]["collectives"]}
    assert links["all-gather, policy forward"] == "inter"
    links = {c["name"]: c["link"] for c in plan(PAPER_CONFIG, gpus=32, suggest=False, gpus_per_node=16,
                                                 config_overrides=cfg)["communication"]["collectives"]}
    assert links["all-gather, policy forward"] == "intra"
    assert links["all-reduce, gradient shards across replica groups (HSDP)"] == "inter"
    with pytest.raises(ValueError, match="gpus_per_node must be a positive integer"):
        plan(PAPER_CONFIG, gpus=32, gpus_per_node=0)


def test_paper_config_plans_as_a_runnable_job(capsys):
    """configs/wan2.1-i2v-14b.yaml on 32 x H20: the layout as shipped is one the trainer accepts
    (resolve_layout with an exact batch), it fits, and it is the planner's best layout for 16 pairs; without
    sequence parallelism it is not runnable and the planner names the shipped layout."""
    from pgdpo.tools.plan import main
    from pgdpo.train.config import ConfigError, load_config
    from pgdpo.train.layout import resolve_layout
    from pgdpo.train.models import resolve_config

    config = load_config(PAPER_CONFIG)
    layout = resolve_layout(config, 32, arch=resolve_config(config.model.name))  # what the trainer runs
    assert (layout.sp_degree, layout.replicate_degree, layout.shard_degree, layout.grad_accum) == (2, 4, 8, 1)
    result = plan(PAPER_CONFIG, gpus=32, gpu="h20")
    assert result["fits"] and result["runnable"]
    best = result["layouts"][0]
    assert (best["sp_degree"], best["replicate_degree"], best["micro_batch_size"]) == (2, 4, 1)
    assert all(16 % (o["micro_batch_size"] * o["data_parallel_groups"]) == 0 for o in result["layouts"])
    plain = [("distributed.sp_degree", 1), ("distributed.replicate_degree", 1)]
    with pytest.raises(ConfigError, match="train.batch_size"):
        resolve_layout(load_config(PAPER_CONFIG, plain), 32, arch=resolve_config(config.model.name))
    as_before = plan(PAPER_CONFIG, gpus=32, gpu="h20", config_overrides=plain)
    assert not as_before["runnable"]
    assert as_before["layouts"][0]["overrides"].startswith("--distributed.sp_degree 2 --distributed.replicate_degree 4")
    assert main(["--config", PAPER_CONFIG, "--gpus", "32", "--gpu", "h20"]) == 0
    out = capsys.readouterr().out
    assert "mesh: replicate=4 shard=8 sp=2 on 4 node(s)" in out and "inter-node" in out
    assert "<- this config" in out.split("best first")[1].splitlines()[1]
    # the network and the mesh from the command line: nodes of 4 GPUs, a replica group per node
    assert main(["--config", PAPER_CONFIG, "--gpus", "32", "--inter-node-gbps", "50", "--gpus-per-node", "4",
                 "--distributed.replicate_degree", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["assumptions"]["inter_node_gbps"] == 50 and r["mesh"]["nodes"] == 8
    assert r["mesh"]["shard_degree"] == 4 and r["hsdp"]["replicate_degree"] == 8
    assert {c["link"] for c in r["communication"]["collectives"] if c["group"] == "shard"} == {"intra"}


# ------------------------------------------------------------------------ against a real 4-process run


def assert_collectives_match(planned: list[dict], recorded: list[dict], sp_degree: int) -> None:
    """The planner's collectives of one step (``result["communication"]["collectives"]``) vs those a real
    run issued on rank 0 (``tests/_plan_worker.py``'s collectives.json): every all-gather and
    reduce-scatter with its group size (output / input) and full-buffer size, every all-to-all with its
    size, the same number of times; every planned all-reduce among the recorded ones (which also hold the
    small metric reductions; their group is not recorded). The hook for a real HSDP run."""
    from collections import Counter

    plan_calls, plan_reduce = Counter(), Counter()
    for c in planned:
        ranks = None if c["op"] == "all-to-all" else c["ranks"]
        for size in c["call_bytes"]:
            if c["op"] == "all-reduce":
                plan_reduce[size] += c["passes"]
            else:
                plan_calls[(c["op"], ranks, size)] += c["passes"]
    run_calls, run_reduce = Counter(), Counter()
    for call in recorded:
        op, t = call["op"], call["tensors"]
        if op in ("c10d._allgather_base_", "pgdpo.in_place_all_gather"):  # output, input
            run_calls[("all-gather", t[0] // t[1], t[0])] += 1
        elif op == "c10d._reduce_scatter_base_":  # output, input
            run_calls[("reduce-scatter", t[1] // t[0], t[1])] += 1
        elif op == "_c10d_functional.all_gather_into_tensor":  # the sequence-parallel group's; input only
            run_calls[("all-gather", sp_degree, t[0] * sp_degree)] += 1
        elif op in ("_c10d_functional.all_to_all_single", "c10d.alltoall_base_"):
            run_calls[("all-to-all", None, t[-1])] += 1
        elif op == "c10d.allreduce_":
            run_reduce[t[0]] += 1
    assert run_calls == plan_calls
    assert not plan_reduce - run_reduce, (plan_reduce, run_reduce)


def _real_run(tmp_path, nproc, *extra):
    from pgdpo.train.cli import resolve
    from pgdpo.train.data.synth import synth_dataset

    from ._launch import DEMO, ROOT, run, torchrun

    data = tmp_path / "i2v"
    synth_dataset(data, pairs=8, task="i2v", latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32,
                  image_len=8, image_dim=24, progress=False)
    out = tmp_path / "run"
    # data.frames/height/width as the dataset's latents [16, 3, 8, 8], so that the planner sees its tokens
    args = ["--config", DEMO, "--output-dir", str(out), "--data.path", str(data), "--model.name",
            "tiny-wan-i2v", "--model.path", "null", "--max-steps", "3", "--logging.progress", "false",
            "--logging.plots", "false", "--logging.trackers", "[]", "--train.micro_batch_size", "1",
            "--data.frames", "9", "--data.height", "64", "--data.width", "64", "--optim.warmup_steps", "0",
            "--optim.scheduler", "constant", *extra]
    run(torchrun(nproc, str(ROOT / "tests" / "_plan_worker.py"), *args))
    cfg, _ = resolve(args)
    return (cfg, json.loads((out / "static.json").read_text()),
            json.loads((out / "collectives.json").read_text()))


REAL_RUNS = {
    "fsdp4-copy-accum2": ["--train.batch_size", "8"],
    "fsdp4-sp2-lora-ref-checkpointing-accum2": ["--train.batch_size", "4", "--distributed.sp_degree", "2",
                                                "--model.lora_rank", "4", "--method.reference", "lora",
                                                "--model.gradient_checkpointing", "true"],
    "hsdp2x2-copy": ["--train.batch_size", "4", "--distributed.replicate_degree", "2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("extra", REAL_RUNS.values(), ids=REAL_RUNS.keys())
def test_planner_static_figures_equal_a_real_4_process_run(tmp_path, extra):
    """Bytes per rank (weights, gradients, AdamW states, reference) and every collective of one optimiser
    step with its size: the planner vs what rank 0 of a real 4-process CPU run (gloo) held and issued."""
    cfg, static, recorded = _real_run(tmp_path, 4, *extra)
    result = plan(cfg, gpus=4, suggest=False)
    assert result["mesh"]["replicate_degree"] == cfg.distributed.replicate_degree
    assert result["static_bytes_per_rank"] == static
    assert_collectives_match(result["communication"]["collectives"], recorded, cfg.distributed.sp_degree)
