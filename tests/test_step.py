"""PreferenceStep on tiny real diffusers models (CPU): loss at init, gradients, LoRA reference, switches."""

import copy
import math
import os
import warnings

import pytest
import torch

from pgdpo import PGDPOLoss
from pgdpo.train.models import adapter_for, build_model
from pgdpo.train.step import PreferenceStep, frozen_copy

from ._tolerance import assert_float32_orders_agree, network_bound

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


def zero_lora(model):
    """``model`` with peft LoRA adapters whose B starts at zero: the adapted policy computes exactly
    its base (base + 0), so the adapters-off reference is the same computation on the same weights."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=True))


def output_noise(step, batch, generator):
    """max |pred - ref_pred| of the step's two forwards on the step's own noisy inputs: the float noise
    between the policy and reference computations (0 when they are one computation)."""
    a = step.adapter
    pairs = step.schedule.noise_pairs(batch["chosen"], batch["rejected"], generator)
    with torch.no_grad():
        pred = a.predict(step.policy, pairs.noisy, pairs.model_timesteps, batch)
        ref = a.predict(step.reference, pairs.noisy, pairs.model_timesteps, batch)
    return (pred - ref).abs().max().item(), (pred + ref - 2 * pairs.target).abs().max().item()


SCHEDULE_CASES = [("tiny-wan-t2v", "flow"), ("tiny-wan-t2v", "ddpm-eps"), ("tiny-wan-t2v", "ddpm-v"),
                  ("tiny-wan-i2v", "flow"), ("tiny-unet3d", "ddpm-eps"), ("tiny-unet3d", "ddpm-v")]


@pytest.mark.parametrize("name, schedule", SCHEDULE_CASES)
def test_policy_equal_to_reference_gives_half_ln2(name, schedule):
    # At init d_w = d_l = 0: m = 0, alpha = gamma = 1/2, z = 0, so L = 1/2 * ln 2 + 1/2 * 0. Policy and
    # reference are made one computation (zero LoRA on, adapters off): two copies of a model need not agree
    # bitwise on every CPU, and the margin's 1/(d_l + eps) turns 1e-8 of noise into gamma = 0.42.
    step = PreferenceStep(zero_lora(build_model(name, seed=0)).train(), None, schedule=schedule)
    out = step(make_batch(name), torch.Generator().manual_seed(0))
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(HALF_LN2, abs=1e-6)
    assert set(out.stats) >= {"d_w", "d_l", "gamma", "accuracy"} and out.stats["d_w"].shape == (B,)
    assert torch.equal(out.stats["d_w"], torch.zeros(B)) and torch.equal(out.stats["d_l"], torch.zeros(B))


@pytest.mark.parametrize("name, schedule", SCHEDULE_CASES)
def test_copy_reference_at_init_gives_ln2_within_its_measured_noise(name, schedule):
    """A frozen copy is a second computation: DPO's loss at init is ln 2 up to the two copies' float noise.

    |d| = |mean (p - r)(p + r - 2t)| <= max|p - r| * max|p + r - 2t| =: delta, and
    |softplus(beta/2 (d_w - d_l)) - ln 2| <= beta/4 * |d_w - d_l| <= beta/2 * delta.
    """
    step = PreferenceStep(build_model(name, seed=0), "copy", schedule=schedule, loss=PGDPOLoss(method="dpo"))
    batch = make_batch(name)
    diff, spread = output_noise(step, batch, torch.Generator().manual_seed(0))
    delta = diff * spread * (1 + 1e-5) + 1e-12  # + fp32 rounding of the means
    out = step(batch, torch.Generator().manual_seed(0))
    assert out.stats["d_w"].abs().max().item() <= delta and out.stats["d_l"].abs().max().item() <= delta
    assert abs(out.loss.item() - math.log(2.0)) <= 0.5 * 100.0 * delta + 1e-6


def moved_temporal_convs(model, seed=3):
    """Move each UNet3D temporal block's zero-initialised last convolution off zero, as training does:
    from then on its dropout (diffusers hard-codes p = 0.1) changes the output."""
    g = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if type(m).__name__ == "TemporalConvLayer"]
    assert layers
    with torch.no_grad():
        for layer in layers:
            layer.conv4[-1].weight.add_(0.1 * torch.randn(layer.conv4[-1].weight.shape, generator=g))
    return model


def active_dropout(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


@pytest.mark.parametrize("schedule", ["ddpm-eps", "ddpm-v"])
def test_dropout_off_by_default_policy_equal_to_reference_in_train_mode(schedule):
    """UNet3D with trained temporal convolutions, policy in train mode, reference = the same weights:
    0.5 ln 2 on every call with the same generator, because the step turned the dropout off."""
    policy = zero_lora(moved_temporal_convs(build_model("tiny-unet3d", seed=0))).train()
    assert active_dropout(policy)  # diffusers' hard-coded 0.1: the step must turn it off
    step = PreferenceStep(policy, None, schedule=schedule)
    assert active_dropout(policy) == []
    batch = make_batch("tiny-unet3d")
    losses = [step(batch, torch.Generator().manual_seed(5)).loss.item() for _ in range(3)]
    assert losses == pytest.approx([HALF_LN2] * 3, abs=1e-6)
    assert len(set(losses)) == 1


def test_active_dropout_would_bias_and_randomise_the_loss():
    """The check above can fail: with ``disable_dropout=False`` the train-mode policy drops activations the
    eval-mode reference keeps, so the loss leaves 0.5 ln 2 and changes from call to call."""
    policy = zero_lora(moved_temporal_convs(build_model("tiny-unet3d", seed=0))).train()
    step = PreferenceStep(policy, None, schedule="ddpm-eps", disable_dropout=False)
    assert active_dropout(policy)
    batch = make_batch("tiny-unet3d")
    torch.manual_seed(0)  # dropout masks come from the global generator
    losses = [step(batch, torch.Generator().manual_seed(5)).loss.item() for _ in range(3)]
    assert len(set(losses)) == 3
    assert all(abs(x - HALF_LN2) > 1e-4 for x in losses)


def test_copy_reference_and_sft_step_have_no_dropout():
    from pgdpo.train.sft import SFTStep

    model = moved_temporal_convs(build_model("tiny-unet3d", seed=0))
    step = PreferenceStep(model, "copy", schedule="ddpm-eps")
    assert active_dropout(step.policy) == [] and active_dropout(step.reference) == []
    given = build_model("tiny-unet3d", seed=0)
    PreferenceStep(build_model("tiny-unet3d", seed=0), given, schedule="ddpm-eps")
    assert active_dropout(given) == []
    sft = SFTStep(build_model("tiny-unet3d", seed=0), "ddpm-eps")
    assert active_dropout(sft.policy) == []
    kept = PreferenceStep(build_model("tiny-unet3d", seed=0), "copy", schedule="ddpm-eps", disable_dropout=False)
    assert active_dropout(kept.policy) and active_dropout(kept.reference)
    with pytest.raises(TypeError, match="disable_dropout must be a bool"):
        PreferenceStep(build_model("tiny-unet3d"), "copy", schedule="ddpm-eps", disable_dropout="yes")


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
    from pgdpo.train.sft import SFTStep

    sft = SFTStep(build_model("tiny-wan-i2v"))  # the same check, from the shared base
    with pytest.raises(KeyError, match="missing \\['image_condition'\\]"):
        sft(variant(image_condition=None))
    with pytest.raises(ValueError, match="not divisible by the model's patch size"):
        sft(variant(chosen=good["chosen"][..., :3], rejected=good["rejected"][..., :3],
                    image_condition=good["image_condition"][..., :3]))


def test_dataset_and_batch_checks_share_the_grid_rule():
    """check_compatible (dataset meta) and the step's batch check report a bad Wan grid with one rule."""
    from pgdpo.train.data.compat import check_compatible
    from pgdpo.train.data.format import DataError

    meta = {"format": "pgdpo-preference-latents", "version": 1, "task": "t2v", "num_pairs": 1,
            "latent_shape": [16, 2, 4, 3], "text_len": 5, "text_dim": 32}
    step = PreferenceStep(build_model("tiny-wan-t2v"), "copy")
    batch = make_batch("tiny-wan-t2v")
    batch = dict(batch, chosen=batch["chosen"][..., :3], rejected=batch["rejected"][..., :3])
    with pytest.raises(ValueError) as from_batch:
        step(batch)
    with pytest.raises(DataError) as from_meta:
        check_compatible(meta, "tiny-wan-t2v")
    rule = "latent size (F, H, W) = (2, 4, 3) is not divisible by the model's patch size (1, 2, 2)"
    assert rule in str(from_batch.value) and rule in str(from_meta.value)


def test_step_pieces_compose_into_the_call():
    """noise_inputs -> reference_prediction -> policy_prediction -> loss_on is the step (what the trainer's
    Gamma pass reuses), bitwise."""
    step = PreferenceStep(perturbed(build_model("tiny-wan-t2v", seed=0)), build_model("tiny-wan-t2v", seed=0))
    batch = make_batch("tiny-wan-t2v")
    out = step(batch, torch.Generator().manual_seed(3))
    pairs = step.noise_inputs(batch, torch.Generator().manual_seed(3))
    pred = step.policy_prediction(pairs, batch)
    loss = step.loss_on(pred, step.reference_prediction(pairs, batch), pairs, step.sample_weights(pairs))
    assert torch.equal(loss, out.loss)


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


def _record_forward_dtypes(model, seen: set):
    """Record in ``seen`` the output dtype of every Linear layer of ``model`` in its forwards."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))


def test_low_precision_switches_compute_in_bf16():
    """bf16 weights and bf16 autocast really run the forwards in bf16, and agree with fp32 to bf16 accuracy."""
    name = "tiny-wan-t2v"
    keys = ("mse_policy_chosen", "mse_policy_rejected", "mse_ref_chosen", "mse_ref_rejected")
    fp32 = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0))(
        make_batch(name), torch.Generator().manual_seed(0))
    for switch in ("weights_dtype", "autocast_dtype"):
        step = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0),
                              **{switch: torch.bfloat16})
        weight_dtype = torch.bfloat16 if switch == "weights_dtype" else torch.float32
        assert step.policy.patch_embedding.weight.dtype == step.reference.patch_embedding.weight.dtype == weight_dtype
        dtypes = set()
        _record_forward_dtypes(step.policy, dtypes)
        _record_forward_dtypes(step.reference, dtypes)
        out = step(make_batch(name), torch.Generator().manual_seed(0))
        out.loss.backward()
        assert torch.bfloat16 in dtypes, switch
        assert step.policy.patch_embedding.weight.grad.dtype == weight_dtype
        assert torch.isfinite(out.loss)
        for k in keys:  # bf16 rounding moves the MSEs a little, never far
            assert not torch.equal(out.stats[k], fp32.stats[k]), (switch, k)
            torch.testing.assert_close(out.stats[k], fp32.stats[k], rtol=3e-2, atol=1e-3, msg=f"{switch} {k}")


def test_regional_compile_matches_eager():
    """Regional torch.compile (Inductor) of the repeated blocks: same loss and policy gradients as eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    name = "tiny-wan-t2v"
    eager = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0))
    compiled = PreferenceStep(perturbed(build_model(name, seed=0)), build_model(name, seed=0), compile=True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.policy.blocks)
    # the float64 step: what both float32 steps approximate (compile and eager sum in different orders)
    exact = PreferenceStep(perturbed(build_model(name, seed=0)).double(), build_model(name, seed=0).double())
    a = eager(make_batch(name), torch.Generator().manual_seed(0)).loss
    b = compiled(make_batch(name), torch.Generator().manual_seed(0)).loss
    c = exact({k: v.double() for k, v in make_batch(name).items()}, torch.Generator().manual_seed(0)).loss
    for loss in (a, b, c):
        loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # Dynamo captured the blocks
    batch = make_batch(name)
    bound = network_bound(eager.policy, tokens=2 * batch["chosen"].shape[0] * F * H * W)
    assert_float32_orders_agree(b, a, c, "loss", bound)
    for (n, p), q, r in zip(eager.policy.named_parameters(), compiled.policy.parameters(),
                            exact.policy.parameters()):
        assert_float32_orders_agree(q.grad, p.grad, r.grad, n, bound)


_COMPILE_ONE_BLOCK = """
import sys, torch
from pgdpo.train.models import build_model, compile_blocks
from pgdpo.train.models.switches import inductor_cache_for_this_cpu
model = build_model("tiny-wan-t2v", seed=0)
folder = inductor_cache_for_this_cpu()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 2, 4, 4, generator=g)
t = torch.tensor([100.0, 700.0])
text = torch.randn(2, 5, model.config.text_dim, generator=g)
with torch.no_grad():
    eager = model(x, t, text, return_dict=False)[0]
    compile_blocks(model)
    compiled = model(x, t, text, return_dict=False)[0]
err = float((compiled.double() - eager.double()).norm() / eager.double().norm())
print("RESULT", torch.backends.cpu.get_cpu_capability(), folder, err)
"""


def test_regional_compile_survives_another_instruction_set(tmp_path):
    """A compiled block run under one CPU instruction set and then, with the same temporary folder, under
    another (as .ci/run does, and a user with a shared home folder on mixed machines) computes what eager
    does in both: the Inductor cache is one folder per setting. Without that, torch 2.13 served the first
    setting's kernels to the second (NaN under avx2 after AVX-512; a C++ compile error under default)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    # the machine's own level (this process may run under another ATEN_CPU_CAPABILITY, as in .ci/numerics)
    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env=env, capture_output=True, text=True, timeout=120).stdout.strip().lower()
    other = "avx2" if native == "avx512" else "default"
    if native == other:
        pytest.skip(f"this CPU has one instruction-set level only ({native}): nothing to switch between")
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    folders = set()
    for capability in (native, other):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_ONE_BLOCK], env={**env, "ATEN_CPU_CAPABILITY": capability},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
        _, isa, folder, err = line.split()
        assert isa.lower() == capability and folder.startswith(str(tmp_path))
        bound = network_bound(build_model("tiny-wan-t2v", seed=0), tokens=2 * 2 * 4 * 4)
        assert float(err) <= bound, f"compiled under {capability}: relative error {err} against eager"
        folders.add(folder)
    assert len(folders) == 2
