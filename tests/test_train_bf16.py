"""The GPU's precision path on CPU: ``model.precision: bf16`` with ``PGDPO_CPU_BF16=1`` in a 2-process
FSDP2 run over gloo (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: bf16 parameters in
compute, fp32 master weights and gradient reduction), the same run in fp32 beside it.

bf16 keeps 8 bits of mantissa (unit roundoff 2^-9 per operation); a 2-block model, its reference and the
loss over 4 steps amplify that by a small factor, so the losses and gradient norms must agree within a
few percent of the fp32 run, and must not be equal to it (which would mean bf16 never ran)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from pgdpo.train.data.synth import synth_dataset
from pgdpo.train.distributed import CPU_BF16_ENV

from ._launch import DEMO, records, run, torchrun

pytestmark = pytest.mark.distributed

BF16_EPS = 2.0 ** -8  # bf16 machine epsilon
#: relative agreement asked of the bf16 run: 16 bf16 epsilons (~6%) covers the rounding of a few layers
#: and steps; a broken path (wrong dtype in the loss, a dropped cast) drifts by far more or fails.
TOLERANCE = 16 * BF16_EPS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bf16")
    data = base / "pairs"
    synth_dataset(data, pairs=16, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    out = {}
    for precision in ("fp32", "bf16"):
        folder = base / precision
        cmd = torchrun(2, "-m", "pgdpo", "train", "--config", DEMO, "--output-dir", str(folder),
                       "--data.path", str(data), "--max-steps", "4", "--logging.progress", "false",
                       "--logging.plots", "false", "--logging.trackers", "[]", "--train.batch_size", "4",
                       "--train.micro_batch_size", "1", "--optim.warmup_steps", "0",
                       "--logging.diagnostics_every", "2", "--validation.every", "2",
                       "--validation.num_prompts", "2", "--validation.steps", "2",
                       "--model.precision", precision)
        proc = run(cmd, env={CPU_BF16_ENV: "1"})
        out[precision] = (folder, proc, records(folder))
    return out


def _steps(recs):
    return {r["step"]: r for r in recs if "loss" in r}


def test_bf16_run_computes_in_bf16_with_fp32_masters(runs):
    _, proc, _ = runs["bf16"]
    assert "compute dtype bfloat16" in proc.stderr + proc.stdout
    assert "2 process(es), strategy fsdp" in proc.stderr + proc.stdout
    _, proc32, _ = runs["fp32"]
    assert "compute dtype" not in proc32.stderr + proc32.stdout


def test_bf16_losses_track_fp32_and_differ(runs):
    steps32, steps16 = _steps(runs["fp32"][2]), _steps(runs["bf16"][2])
    assert sorted(steps16) == sorted(steps32) == [1, 2, 3, 4]
    differs = []
    for step in steps32:
        for key in ("loss", "grad_norm", "mse_policy_chosen", "mse_ref_rejected"):
            a, b = steps32[step][key], steps16[step][key]
            assert math.isfinite(b), (step, key, b)
            assert abs(b - a) <= TOLERANCE * abs(a), (step, key, a, b)
            differs.append(abs(b - a) > 4 * torch.finfo(torch.float32).eps * abs(a))
    # every step's gradient norm (bf16 forward and backward of the policy) differs from the fp32 one
    assert all(steps16[s]["grad_norm"] != steps32[s]["grad_norm"] for s in steps32)
    assert sum(differs) >= len(differs) // 2


def test_bf16_run_diagnostics_validation_and_export(runs):
    folder16, _, recs16 = runs["bf16"]
    folder32, _, _ = runs["fp32"]
    gammas = [r["Gamma"] for r in recs16 if r.get("Gamma") is not None]
    assert gammas and all(math.isfinite(g) for g in gammas)
    assert sorted(p.name for p in (folder16 / "samples").glob("step-*")) == ["step-000000", "step-000002",
                                                                            "step-000004"]
    assert list((folder16 / "samples" / "step-000004").glob("*.gif"))
    # the exported model is the fp32 master weights, trained to a different point than the fp32 run
    w16 = load_file(folder16 / "final" / "diffusion_pytorch_model.safetensors")
    w32 = load_file(folder32 / "final" / "diffusion_pytorch_model.safetensors")
    assert w16.keys() == w32.keys() and {t.dtype for t in w16.values()} == {torch.float32}
    assert any(not torch.equal(w16[k], w32[k]) for k in w16)
    # Adam moves a weight by at most ~lr (1-beta1)/sqrt(1-beta2) = 3.2 lr per step whatever its gradient,
    # so after 4 steps from the same start the two runs' weights are within 2 * 4 * 3.2 lr of each other
    lr = 3.0e-3  # configs/demo.yaml
    assert max((w16[k] - w32[k]).abs().max().item() for k in w16) <= 2 * 4 * 3.2 * lr
