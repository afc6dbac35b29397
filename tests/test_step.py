"""PreferenceStep on tiny real diffusers models (CPU): loss at init, gradients, LoRA reference, switches."""

import copy
import math
import warnings

import pytest
import torch

from pgdpo import PGDPOLoss
from pgdpo.models import adapter_for, build_model
from pgdpo.step import PreferenceStep, frozen_copy

warnings.filterwarnings("ignore", message="pgdpo: backend='auto' falls back")

B, F, H, W = 2, 2, 4, 4
HALF_LN2 = 0.5 * math.log(2.0)


def make_batch(name, seed=0, b=B):
    """A batch for the tiny model ``name``; conditions per pair."""
    g = torch.Generator().manual_seed(seed)
    a = adapter_for(name)
    c = a.latent_channels
    batch = {"chosen": torch.randn(b, c, F, H, W, generator=g), "rejected": torch.randn(b, c, F, H, W, generator=g),
             "encoder_hidden_states": torch.randn(b, 5, a.text_dim, generator=g)}
    if a.family == "wan-i2v":
        batch["image_condition"] = torch.randn(b, 20, F, H, W, generator=g)
        batch["encoder_hidden_states_image"] = torch.randn(b, 3, a.image_dim, generator=g)
    return batch


def perturbed(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def lora_config():
    from peft import LoraConfig

    # init_lora_weights=False: random A and B, so the adapted policy differs from its base.
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                      init_lora_weights=False)


@pytest.mark.parametrize("name, schedule", [
    ("tiny-wan-t2v", "flow"), ("tiny-wan-t2v", "ddpm-eps"), ("tiny-wan-t2v", "ddpm-v"),
    ("tiny-wan-i2v", "flow"), ("tiny-unet3d", "ddpm-eps"), ("tiny-unet3d", "ddpm-v")])
def test_policy_equal_to_reference_gives_half_ln2(name, schedule):
    # At init d_w = d_l = 0: m = 0, alpha = gamma = 1/2, z = 0, so L = 1/2 * ln 2 + 1/2 * 0.
    step = PreferenceStep(build_model(name, seed=0), "copy", schedule=schedule)
    out = step(make_batch(name), torch.Generator().manual_seed(0))
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(HALF_LN2, abs=1e-6)
    assert set(out.stats) >= {"d_w", "d_l", "gamma", "accuracy"} and out.stats["d_w"].shape == (B,)
    assert torch.equal(out.stats["d_w"], torch.zeros(B))


def test_dpo_method_at_init_gives_ln2():
    step = PreferenceStep(build_model("tiny-wan-t2v"), "copy", loss=PGDPOLoss(method="dpo"))
    assert step(make_batch("tiny-wan-t2v")).loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_gradients_reach_the_policy_only_and_reference_stays_bitwise():
    policy = perturbed(build_model("tiny-wan-t2v", seed=0))
    reference = build_model("tiny-wan-t2v", seed=0)
    snapshot = {k: v.clone() for k, v in reference.state_dict().items()}
    step = PreferenceStep(policy, reference, schedule="flow")
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    grad_mode = {}

    def record(name):
        def hook(module, args):
            grad_mode[name] = torch.is_grad_enabled()  # returns None: the inputs are left alone
        return hook

    policy.register_forward_pre_hook(record("policy"))
    reference.register_forward_pre_hook(record("reference"))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    for i in range(2):
        out = step(make_batch("tiny-wan-t2v", seed=i), torch.Generator().manual_seed(i))
        assert out.loss.item() != pytest.approx(HALF_LN2)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in policy.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in reference.parameters())
        assert grad_mode == {"policy": True, "reference": False}  # reference runs under no_grad: no activations
        opt.step()
    for k, v in reference.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in policy.state_dict().items())


def _lora_policy(kind, base):
    if kind == "diffusers":
        base.requires_grad_(False)  # as diffusers' LoRA scripts do before add_adapter
        base.add_adapter(lora_config())
        return base
    from peft import get_peft_model

    return get_peft_model(base, lora_config())


@pytest.mark.parametrize("kind", ["diffusers", "peft"])
def test_lora_reference_matches_a_frozen_copy_of_the_base(kind):
    name = "tiny-wan-i2v"
    base = build_model(name, seed=0)
    frozen_base = frozen_copy(base)
    policy = _lora_policy(kind, base)
    lora_step = PreferenceStep(policy, reference=None, schedule="flow")
    copy_step = PreferenceStep(policy, reference=frozen_base, schedule="flow")
    batch = make_batch(name)
    lora = lora_step(batch, torch.Generator().manual_seed(4))
    full = copy_step(batch, torch.Generator().manual_seed(4))
    for key in ("mse_ref_chosen", "mse_ref_rejected", "mse_policy_chosen", "d_w", "d_l"):
        torch.testing.assert_close(lora.stats[key], full.stats[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lora.loss, full.loss)
    assert lora.loss.item() != pytest.approx(HALF_LN2, abs=1e-4)  # the adapters do change the policy
    # The adapters are back on after the step: the policy still differs from its base.
    adapter = adapter_for(policy)
    x, t = torch.randn(2 * B, 16, F, H, W), torch.full((2 * B,), 500.0)
    with torch.no_grad():
        assert not torch.allclose(adapter.predict(policy, x, t, batch), adapter.predict(frozen_base, x, t, batch))
    lora.loss.backward()
    trained = [n for n, p in policy.named_parameters() if p.grad is not None]
    assert trained and all("lora" in n for n in trained)


def _grads(name, checkpointing):
    policy = perturbed(build_model(name, seed=0))
    step = PreferenceStep(policy, build_model(name, seed=0), schedule="ddpm-eps", checkpointing=checkpointing)
    # Count runs of each leaf layer inside each block: a recomputed block runs its layers twice (hooks on
    # the layers fire in the recompute too, whichever way the block itself is re-entered).
    leaf_calls = {}
    for i, block in enumerate(adapter_for(policy).blocks(policy)):
        for j, leaf in enumerate(m for m in block.modules() if not list(m.children())):
            leaf.register_forward_pre_hook(
                lambda m, a, key=(i, j): leaf_calls.__setitem__(key, leaf_calls.get(key, 0) + 1))
    torch.manual_seed(0)  # UNet3D's temporal convs use dropout 0.1: same masks in both runs
    step(make_batch(name), torch.Generator().manual_seed(0)).loss.backward()
    calls = {}  # layer calls per block
    for (i, _), n in leaf_calls.items():
        calls[i] = calls.get(i, 0) + n
    return {n: p.grad.clone() for n, p in policy.named_parameters()}, calls, step.checkpointed_blocks


@pytest.mark.parametrize("name, every", [("tiny-wan-t2v", "every"), ("tiny-wan-t2v", 2), ("tiny-unet3d", 1),
                                         ("tiny-unet3d", 2)])
def test_checkpointing_keeps_gradients_and_recomputes_the_chosen_blocks(name, every):
    plain, plain_calls, _ = _grads(name, None)
    ckpt, ckpt_calls, chosen = _grads(name, every)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)
    k = 1 if every == "every" else every
    assert chosen == list(range(0, len(plain_calls), k))
    # The chosen blocks run (at least part of) their layers again in the backward; the others do not.
    assert {i for i in plain_calls if ckpt_calls[i] > plain_calls[i]} == set(chosen)
    assert all(ckpt_calls[i] == plain_calls[i] for i in plain_calls if i not in chosen)


def test_step_feeds_the_model_pairs_with_shared_noise_and_timestep():
    name = "tiny-wan-i2v"
    policy = build_model(name, seed=0)
    step = PreferenceStep(policy, "copy", schedule="flow")
    seen = []
    policy.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = make_batch(name)
    out = step(batch, torch.Generator().manual_seed(9))
    (kw,) = seen
    x, t = kw["hidden_states"], kw["timestep"]
    assert x.shape == (2 * B, 36, F, H, W)  # 16 noisy + 4 mask + 16 first-frame latent channels
    assert torch.equal(t[:B], t[B:]) and torch.equal(t[:B], out.timesteps)
    sigma = (out.timesteps / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x[:B, :16] - (1 - sigma) * batch["chosen"], x[B:, :16] - (1 - sigma) * batch["rejected"])
    assert torch.equal(x[:B, 16:], batch["image_condition"]) and torch.equal(x[B:, 16:], batch["image_condition"])
    assert torch.equal(kw["encoder_hidden_states"][:B], kw["encoder_hidden_states"][B:])


def test_output_counts_tokens_and_flops():
    name = "tiny-wan-t2v"
    out = PreferenceStep(build_model(name), "copy")(make_batch(name))
    assert (out.num_pairs, out.num_samples) == (B, 2 * B)
    assert out.tokens == 2 * B * F * (H // 2) * (W // 2)
    per_sample = adapter_for(name).forward_flops_per_sample((16, F, H, W), text_len=5)
    assert out.model_flops == 4 * 2 * B * per_sample > 0


def test_sample_weight_fn_weights_each_pair():
    name = "tiny-wan-t2v"
    policy = perturbed(build_model(name, seed=0))
    seen = []

    def weight(t):
        seen.append(t)
        return torch.tensor([0.25, 2.0])

    out = PreferenceStep(policy, build_model(name, seed=0), sample_weight_fn=weight)(make_batch(name))
    assert torch.equal(seen[0], out.timesteps)
    torch.testing.assert_close(out.loss, (torch.tensor([0.25, 2.0]) * out.stats["loss"]).mean())
    bad = PreferenceStep(policy, build_model(name, seed=0), sample_weight_fn=lambda t: torch.ones(3))
    with pytest.raises(ValueError, match=r"sample_weight_fn must return a \[B=2\] tensor"):
        bad(make_batch(name))


def test_bad_batches_raise_clear_errors():
    step = PreferenceStep(build_model("tiny-wan-i2v"), "copy")
    good = make_batch("tiny-wan-i2v")

    def variant(**changes):
        batch = dict(good)
        for k, v in changes.items():
            if v is None:
                batch.pop(k)
            else:
                batch[k] = v
        return batch

    with pytest.raises(KeyError, match="missing \\['image_condition'\\]"):
        step(variant(image_condition=None))
    with pytest.raises(ValueError, match="batch\\['rejected'\\] has shape"):
        step(variant(rejected=good["rejected"][:, :, :1]))
    with pytest.raises(TypeError, match="batch\\['chosen'\\] must be a floating-point tensor"):
        step(variant(chosen=good["chosen"].long()))
    with pytest.raises(TypeError, match="batch\\['rejected'\\] is torch.float16"):
        step(variant(rejected=good["rejected"].half()))
    with pytest.raises(ValueError, match="has 4 channels but the wan-i2v model takes 16"):
        step(variant(chosen=good["chosen"][:, :4], rejected=good["rejected"][:, :4]))
    with pytest.raises(ValueError, match="encoder_hidden_states'\\] must be \\[B=2, L, D=32\\]"):
        step(variant(encoder_hidden_states=good["encoder_hidden_states"][:1]))
    with pytest.raises(ValueError, match="image_condition'\\] must be \\[B, 4 mask \\+ 16 latent"):
        step(variant(image_condition=good["image_condition"][:, :16]))
    with pytest.raises(ValueError, match="not divisible by the model's patch size"):
        step(variant(chosen=good["chosen"][..., :3], rejected=good["rejected"][..., :3],
                     image_condition=good["image_condition"][..., :3]))
    with pytest.raises(TypeError, match="batch must be a dict"):
        step([good["chosen"]])


def test_reference_errors():
    policy = build_model("tiny-wan-t2v")
    with pytest.raises(ValueError, match="reference=None needs a policy with LoRA adapters"):
        PreferenceStep(policy)
    with pytest.raises(ValueError, match="reference is the policy itself"):
        PreferenceStep(policy, policy)
    shallow = copy.copy(policy)
    with pytest.raises(ValueError, match="shares .* parameter tensors"):
        PreferenceStep(policy, shallow)
    with pytest.raises(ValueError, match="reference is a unet3d model but the policy is a wan-t2v"):
        PreferenceStep(policy, build_model("tiny-unet3d"))
    with pytest.raises(ValueError, match="checkpointing must be"):
        PreferenceStep(policy, "copy", checkpointing="some")


def test_low_precision_switches_run():
    name = "tiny-wan-t2v"
    bf16 = PreferenceStep(build_model(name, seed=0), "copy", weights_dtype=torch.bfloat16)
    assert bf16.policy.patch_embedding.weight.dtype == torch.bfloat16
    assert bf16.reference.patch_embedding.weight.dtype == torch.bfloat16
    out = bf16(make_batch(name))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(HALF_LN2, abs=1e-6)
    assert bf16.policy.patch_embedding.weight.grad.dtype == torch.bfloat16
    auto = PreferenceStep(build_model(name, seed=0), "copy", autocast_dtype=torch.bfloat16)
    out = auto(make_batch(name))
    out.loss.backward()
    assert auto.policy.patch_embedding.weight.dtype == torch.float32
    assert out.loss.item() == pytest.approx(HALF_LN2, abs=1e-6)


def test_regional_compile_matches_eager():
    name = "tiny-wan-t2v"
    eager = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0))
    compiled = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0), compile=True,
                              compile_options={"backend": "eager"})
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.policy.blocks)
    a = eager(make_batch(name), torch.Generator().manual_seed(0)).loss
    b = compiled(make_batch(name), torch.Generator().manual_seed(0)).loss
    torch.testing.assert_close(a, b)
