"""Model configs, construction, loading, adapters, FLOP/token counts and attention backends."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pgdpo.train.models import (
    MODEL_CONFIGS,
    adapter_for,
    build_model,
    count_parameters,
    counted_forward_flops,
    load_model,
    model_flops_per_sample,
    tokens_per_sample,
    wan_forward_flops,
)
from pgdpo.train.models.attention import set_attention_backend


def wan_parameter_count(cfg: dict) -> int:
    """Parameters of a Wan2.1 DiT from its architecture description (independent of diffusers' code).

    Patch embedding (Conv3d), time MLP (freq -> d -> d) and its 6-way modulation projection, text MLP
    (text_dim -> d -> d), optional CLIP image MLP (LayerNorm, img -> img -> d, LayerNorm); per block:
    self- and cross-attention (q, k, v, o with bias + RMS q/k norms over all heads), for I2V the extra
    image k/v projections and their k-norm, the affine cross-attention LayerNorm, the GELU FFN and a
    6 x d modulation table; the output projection and its 2 x d modulation table.
    """
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, text, freq = cfg["ffn_dim"], cfg["text_dim"], cfg["freq_dim"]
    patch = math.prod(cfg["patch_size"])
    linear = lambda i, o: i * o + o  # noqa: E731
    n = cfg["in_channels"] * patch * d + d
    n += linear(freq, d) + linear(d, d) + linear(d, 6 * d)
    n += linear(text, d) + linear(d, d)
    img = cfg.get("image_dim")
    if img:
        n += 2 * img + linear(img, img) + linear(img, d) + 2 * d
    attn = 4 * linear(d, d) + 2 * d
    block = 2 * attn + 2 * d + linear(d, ffn) + linear(ffn, d) + 6 * d
    if cfg.get("added_kv_proj_dim"):
        block += 2 * linear(cfg["added_kv_proj_dim"], d) + d
    n += cfg["num_layers"] * block
    n += linear(d, cfg["out_channels"] * patch) + 2 * d
    return n


@pytest.mark.parametrize("name", ["tiny-wan-t2v", "tiny-wan-i2v", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b",
                                  "wan2.1-i2v-14b"])
def test_meta_parameter_counts_match_the_architecture(name):
    model = build_model(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert count_parameters(model) == wan_parameter_count(MODEL_CONFIGS[name])


def test_real_wan_sizes_match_the_published_ones():
    # Released as "1.3B" (its safetensors hold 1.42B) and "14B"; I2V-14B adds the CLIP image path.
    small = count_parameters(build_model("wan2.1-t2v-1.3b", device="meta"))
    big = count_parameters(build_model("wan2.1-t2v-14b", device="meta"))
    i2v = count_parameters(build_model("wan2.1-i2v-14b", device="meta"))
    assert 1.3e9 <= small < 1.5e9
    assert 13.5e9 < big < 14.5e9
    assert big < i2v < 17e9


def test_real_configs_follow_the_spec():
    t2v, big, i2v = (MODEL_CONFIGS[k] for k in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b"))
    assert (t2v["num_layers"], t2v["num_attention_heads"], t2v["attention_head_dim"], t2v["ffn_dim"]) == (
        30, 12, 128, 8960)
    assert (big["num_layers"], big["num_attention_heads"], big["ffn_dim"], big["text_dim"]) == (40, 40, 13824, 4096)
    assert (i2v["in_channels"], i2v["image_dim"], i2v["added_kv_proj_dim"]) == (36, 1280, 5120)


@pytest.mark.parametrize("name", ["tiny-wan-t2v", "tiny-wan-i2v", "tiny-unet3d"])
def test_tiny_models_are_small_and_seeded(name):
    a, b = build_model(name, seed=3), build_model(name, seed=3)
    assert count_parameters(a) < 500_000
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build_model(name, seed=4)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_bf16_build_keeps_diffusers_fp32_modules():
    model = build_model("tiny-wan-t2v", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["patch_embedding.weight"] == torch.bfloat16
    assert dtypes["blocks.0.ffn.net.0.proj.weight"] == torch.bfloat16
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model name 'wan-9b'"):
        build_model("wan-9b")
    with pytest.raises(ValueError, match="_class_name"):
        build_model({"num_layers": 2})
    with pytest.raises(ValueError, match="'_class_name' must be one of"):
        build_model({"_class_name": "UNet2DModel"})


def test_load_model_round_trip(tmp_path):
    model = build_model("tiny-wan-i2v", seed=1)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    for folder in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):  # model folder or pipeline folder
        loaded = load_model(folder)
        assert type(loaded) is type(model)
        for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_i2v_model_input_has_36_channels():
    model = build_model("tiny-wan-i2v", seed=0)
    adapter = adapter_for(model)
    assert adapter.family == "wan-i2v" and adapter.image_condition_channels == 20
    seen = {}
    model.patch_embedding.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    noisy = torch.randn(2, 16, 2, 4, 4)
    batch = {"encoder_hidden_states": torch.randn(1, 5, 32), "image_condition": torch.randn(1, 20, 2, 4, 4),
             "encoder_hidden_states_image": torch.randn(1, 3, 24)}
    out = adapter.predict(model, noisy, torch.tensor([500.0, 500.0]), batch)
    x = seen["x"]
    assert x.shape == (2, 36, 2, 4, 4) and out.shape == (2, 16, 2, 4, 4)
    assert torch.equal(x[:, :16], noisy)  # Wan I2V layout: noisy latents first, then mask + first frame
    assert torch.equal(x[0, 16:], batch["image_condition"][0]) and torch.equal(x[1, 16:], x[0, 16:])


def test_adapter_sees_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model("tiny-unet3d"), LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    adapter = adapter_for(model)
    assert adapter.family == "unet3d" and adapter.latent_channels == 4
    assert len(adapter.blocks(model)) == 5  # 2 down + mid + 2 up


def test_tokens_per_sample():
    # Wan 480p x 81 frames: latent [16, 21, 60, 104], 1x2x2 patches.
    assert tokens_per_sample("wan2.1-t2v-14b", (16, 21, 60, 104)) == 21 * 30 * 52
    assert tokens_per_sample("tiny-unet3d", (2, 4, 16, 40, 64)) == 16 * 40 * 64


def _real_forward_flops(name, latent, text_len, image_len):
    model = build_model(name, seed=0)
    adapter = adapter_for(model)
    batch = {"encoder_hidden_states": torch.randn(1, text_len, adapter.text_dim)}
    if adapter.family == "wan-i2v":
        batch["image_condition"] = torch.randn(1, 20, *latent[1:])
        batch["encoder_hidden_states_image"] = torch.randn(1, image_len, adapter.image_dim)
    t = adapter.model_timesteps(torch.tensor([500.0, 500.0]))
    # SDPA's math kernel is plain matmuls, which FlopCounterMode counts (the fused CPU kernel it skips).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        adapter.predict(model, torch.randn(2, *latent), t, batch)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", ["tiny-wan-t2v", "tiny-wan-i2v"])
def test_wan_closed_form_flops_match_torch_flop_counter(name):
    latent, text_len, image_len = (16, 3, 4, 6), 7, 5
    expected = _real_forward_flops(name, latent, text_len, image_len)
    cfg = adapter_for(name).config
    assert wan_forward_flops(cfg, latent, text_len, image_len if "i2v" in name else 0) == expected
    assert model_flops_per_sample(name, latent, text_len, image_len) == expected


def test_unet_flops_counted_on_meta_equal_a_real_forward():
    latent = (4, 2, 8, 8)
    assert counted_forward_flops("tiny-unet3d", latent, text_len=6) == _real_forward_flops("tiny-unet3d", latent, 6, 0)


def test_real_wan_flops_are_dominated_by_6_params_tokens_plus_attention():
    # Sanity of scale: forward ~ 2 * params * tokens + attention (4 N^2 d per layer).
    latent = (16, 21, 60, 104)
    n = tokens_per_sample("wan2.1-t2v-1.3b", latent)
    params = count_parameters(build_model("wan2.1-t2v-1.3b", device="meta"))
    attention = 30 * 4 * n * n * 1536
    flops = model_flops_per_sample("wan2.1-t2v-1.3b", latent)
    assert 0.9 < flops / (2 * params * n + attention) < 1.1


# ------------------------------------------------------------------------------------- attention backends


def test_attention_backend_is_set_on_the_model_only():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    model = build_model("tiny-wan-t2v")
    set_attention_backend(model, "_native_flash")
    backends = {m.processor._attention_backend for m in model.modules() if hasattr(m, "processor")}
    assert {str(getattr(b, "value", b)) for b in backends} == {"_native_flash"}
    assert _AttentionBackendRegistry._active_backend == before


@pytest.mark.parametrize("backend, package", [("flash", "flash-attn"), ("xformers", "xformers")])
def test_attention_backend_missing_package_is_named(backend, package):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec(package.replace("-", "_")) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(ImportError, match=f"needs the '{package}' package"):
        set_attention_backend(build_model("tiny-wan-t2v"), backend)


def test_attention_backends_without_backward_or_download_are_refused():
    model = build_model("tiny-wan-t2v")
    with pytest.raises(ValueError, match="_flash_3.*no backward"):
        set_attention_backend(model, "_flash_3")
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        set_attention_backend(model, "flash_hub")
    with pytest.raises(ValueError, match="'nope' is not allowed"):
        set_attention_backend(model, "nope")


def test_unet3d_refuses_a_dispatcher_backend_it_would_ignore():
    with pytest.raises(ValueError, match="UNet3DConditionModel.*call PyTorch SDPA directly"):
        set_attention_backend(build_model("tiny-unet3d"), "_native_flash")


# ------------------------------------------------------------------ shared arithmetic: latents, folders, unwrap


def test_latent_shape_of_wan_and_unet_configs():
    from pgdpo.train.models import latent_shape

    # Wan2.1 (AutoencoderKLWan: 4x in time, causal, 8x in space; 16 latent channels = out_channels):
    # 81 frames x 480 x 832 -> 1 + 80/4 = 21 frames, 60 x 104 (the paper's 480p setting).
    assert adapter_for("wan2.1-t2v-14b").latent_shape(81, 480, 832) == (16, 21, 60, 104)
    # I2V takes 36 input channels but its latents (and output) have 16.
    assert adapter_for("wan2.1-i2v-14b").latent_shape(33, 720, 1280) == (16, 9, 90, 160)
    # UNet3D: SD's AutoencoderKL per frame (8x in space, 1 in time), 4 latent channels in tiny-unet3d.
    assert adapter_for("tiny-unet3d").latent_shape(16, 256, 320) == (4, 16, 32, 40)
    # The bare formula, factors given (what the encoder calls with its loaded VAE's factors).
    assert latent_shape(17, 64, 96, channels=12, temporal_factor=4, spatial_factor=16) == (12, 5, 4, 6)
    # Not strict: the frames that fill no latent frame and the pixels past a multiple of 8 are dropped.
    assert adapter_for("tiny-wan-t2v").latent_shape(16, 70, 64) == (16, 4, 8, 8)


def test_latent_shape_errors_name_the_argument():
    a = adapter_for("tiny-wan-t2v")
    with pytest.raises(ValueError, match="frames must be 1 \\+ a multiple of the VAE's temporal factor 4"):
        a.latent_shape(16, 64, 64, strict=True)
    with pytest.raises(ValueError, match="width must be a multiple of the VAE's spatial factor 8, got 60"):
        a.latent_shape(17, 64, 60, strict=True)
    with pytest.raises(ValueError, match="height must be a positive integer, got 0"):
        a.latent_shape(17, 0, 64)
    assert adapter_for("tiny-unet3d").latent_shape(16, 64, 64, strict=True) == (4, 16, 8, 8)  # t = 1: any F


def test_model_folder_discovery_is_shared_by_load_model_and_the_trainer(tmp_path):
    from pgdpo.train.config import ConfigError
    from pgdpo.train.loading import pretrained_config, weights_folder
    from pgdpo.train.models import find_model_folder

    build_model("tiny-unet3d").save_config(tmp_path / "pipe" / "unet")
    assert find_model_folder(tmp_path / "pipe") == str(tmp_path / "pipe" / "unet")
    assert weights_folder(str(tmp_path / "pipe")) == str(tmp_path / "pipe" / "unet")
    assert pretrained_config(str(tmp_path / "pipe"))["_class_name"] == "UNet3DConditionModel"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.path: no config.json in .* transformer/ or unet/"):
        find_model_folder(tmp_path / "empty", what="model.path")
    with pytest.raises(ConfigError, match="model.path: no config.json"):
        pretrained_config(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="model.path: .*missing' is not a local directory"):
        weights_folder(str(tmp_path / "missing"))


def test_unwrap_model_sees_through_ddp_and_peft(tmp_path):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel

    from pgdpo.train.models import unwrap_model

    base = build_model("tiny-unet3d")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["to_q"]))
    ours = not dist.is_initialized()  # a single-process group a trainer test left open serves as well
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(peft_model)
        assert unwrap_model(wrapped) is base
        assert unwrap_model(DistributedDataParallel(build_model("tiny-wan-t2v"))).__class__.__name__ == \
            "WanTransformer3DModel"
        assert adapter_for(wrapped).family == "unet3d"  # no get_base_model grafted onto the wrapper
    finally:
        if ours:
            dist.destroy_process_group()
    assert unwrap_model(base) is base
