"""``pgdpo train`` in one process (CPU): config, end-to-end runs, exact resume, checkpoints, bad input.

Runs are in-process (``pgdpo.train.cli.main``) on the tiny Wan-shaped model with a small synthetic
dataset, a few steps each.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pgdpo.train.checkpoint import list_checkpoints, resolve_resume
from pgdpo.train.cli import main, parse_overrides
from pgdpo.train.config import ConfigError, from_dict, load_config
from pgdpo.train.data.synth import synth_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
REQUIRED = ("step", "loss", "loss_dpo", "loss_ipr", "alpha_mean", "alpha_min", "alpha_max", "gamma_mean",
            "gamma_min", "gamma_max", "reward_margin", "accuracy", "mse_policy_chosen", "mse_policy_rejected",
            "mse_ref_chosen", "mse_ref_rejected", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small t2v dataset for tiny-wan-t2v: 8 pairs of [16, 3, 8, 8] latents, 16 x 32 text."""
    path = tmp_path_factory.mktemp("data") / "pairs"
    synth_dataset(path, pairs=8, latent_shape=(16, 3, 8, 8), text_len=16, text_dim=32, progress=False)
    return str(path)


TIMING = ("step_time_s", "tokens_per_s", "pairs_per_s", "tflops_per_device", "peak_mem_gb")


def args(out, data=None, steps=3, *extra):
    """The demo config with the random-init tiny model (``--model.path null``: fast; the shipped base model
    ``models/demo-base`` is tested in tests/test_validation.py), short and quiet."""
    argv = ["--config", DEMO, "--output-dir", str(out), "--max-steps", str(steps), "--model.path", "null",
            "--logging.progress", "false", "--logging.trackers", "[]", "--logging.plots", "false",
            "--train.batch_size", "2", "--train.micro_batch_size", "1", "--optim.warmup_steps", "0",
            "--validation.every", "0", "--validation.data", "null", "--validation.num_seeds", "1",
            "--validation.num_prompts", "4"]
    if data is not None:
        argv += ["--data.path", data]
    return argv + list(extra)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(out)]


# ------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        from_dict({"optim": {"lrr": 1e-5}})
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        from_dict({"modle": {"name": "x"}})
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        from_dict({"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"method.name must be one of .*'sft'.*got 'foo'"):
        from_dict({"method": {"name": "foo"}})
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        from_dict({"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError, match="method.reference: lora needs model.lora_rank > 0"):
        from_dict({"method": {"reference": "lora"}})
    with pytest.raises(ConfigError, match="train.batch_size .* multiple of train.micro_batch_size"):
        from_dict({"train": {"batch_size": 3, "micro_batch_size": 2}})
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x processes"):
        from_dict({"train": {"batch_size": 4, "micro_batch_size": 1}}).grad_accum(3)
    # YAML reads 1e-6 as a string; float fields take it.
    assert from_dict({"optim": {"lr": "1e-6"}}).optim.lr == 1e-6


def test_config_file_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny-wan-t2v\n  precison: bf16\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.precison' \(did you mean "
                                          r"'model.precision'\?\)"):
        load_config(bad)
    cfg = load_config(DEMO, parse_overrides(["--optim.lr", "2e-5", "--method.name=dpo",
                                             "--logging.trackers", "[]"]))
    assert (cfg.optim.lr, cfg.method.name, cfg.logging.trackers) == (2e-5, "dpo", [])
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--optim.lr"])


def test_cli_reports_bad_keys_and_values(tmp_path, capsys):
    assert main(["--config", DEMO, "--optim.lrr", "1e-5"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["--config", DEMO, "--train.micro_batch_size", "0"]) == 2
    assert "train.micro_batch_size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("--resume latest|PATH", "--max-steps", "--save-every", "--optim.lr", "torchrun"):
        assert text in out
    assert main(["--config", DEMO, "--print-config", "--optim.lr", "3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out


def test_paper_configs_load():
    for name, model in (("wan2.1-t2v-1.3b", "wan2.1-t2v-1.3b"), ("wan2.1-i2v-14b", "wan2.1-i2v-14b")):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.name == model and cfg.model.precision == "bf16"
        assert (cfg.train.batch_size, cfg.train.max_steps, cfg.optim.lr) == (16, 3000, 1e-6)
        assert (cfg.method.beta, cfg.method.k1, cfg.method.k2) == (100.0, 10.0, 10.0)
        assert (cfg.data.height, cfg.data.width, cfg.data.frames) == (480, 832, 81)
        assert cfg.distributed.strategy == "fsdp" and cfg.model.gradient_checkpointing


# ------------------------------------------------------------------------------------------- runs


def test_demo_end_to_end(tmp_path, capsys):
    """The README path: synthetic data made on the fly, metrics, checkpoints, TensorBoard, plots, summary."""
    out = tmp_path / "demo"
    argv = args(out, None, 4, "--save-every", "2", "--data.synth_pairs", "8", "--logging.plots", "true",
                "--logging.trackers", "[tensorboard]")
    assert main(argv) == 0
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in REQUIRED)
        assert 0 <= r["alpha_min"] <= r["alpha_mean"] <= r["alpha_max"] <= 1
    assert records[0]["mse_policy_chosen"] == records[0]["mse_ref_chosen"]  # policy == reference at step 1
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    ck = out / "checkpoint-4"
    for name in ("trainer_state.json", "trainer.pt", "rank-0.pt", ".metadata", "config.yaml"):
        assert (ck / name).exists(), name
    assert (out / "data" / "dataset.json").exists()
    for name in ("loss.png", "alpha_gamma.png", "likelihood.png"):
        assert (out / name).stat().st_size > 0
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    captured = capsys.readouterr()
    assert "pgdpo train: done: 4 steps" in captured.out and "tokens/s" in captured.out


def test_resume_matches_uninterrupted_run(tmp_path, data):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full, data, 5, "--save-every", "2")) == 0
    assert main(args(part, data, 2, "--save-every", "2")) == 0
    # A crash after step 3 leaves metric lines past the checkpoint (and a torn last line): cut on resume.
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    assert main(args(part, data, 5, "--save-every", "2", "--resume", "latest")) == 0
    assert losses(part) == losses(full)  # bitwise, and each step once
    assert [r["grad_norm"] for r in metrics(part)] == [r["grad_norm"] for r in metrics(full)]


def test_unfinished_checkpoints_are_ignored(tmp_path, data):
    out = tmp_path / "run"
    assert main(args(out, data, 2, "--save-every", "1")) == 0
    # What a kill -9 during a save leaves: a .tmp folder (even with every file in it) and a folder without
    # its completion marker.
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9.tmp")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-7")
    os.remove(out / "checkpoint-7" / "trainer_state.json")
    assert resolve_resume("latest", str(out)) == str(out / "checkpoint-2")
    with pytest.raises(Exception, match="unfinished checkpoint"):
        resolve_resume(str(out / "checkpoint-9.tmp"), str(out))
    with pytest.raises(Exception, match="not a complete checkpoint"):
        resolve_resume(str(out / "checkpoint-7"), str(out))
    assert main(args(out, data, 3, "--save-every", "1", "--resume", "latest")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert not (out / "checkpoint-9.tmp").exists()  # cleaned up by the next complete save


def test_fresh_start_keeps_previous_run(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(args(out, data, 1)) == 0
    assert main(args(out, data, 1)) == 0
    assert "moved its checkpoints and logs to" in capsys.readouterr().err
    assert (out / "previous-1" / "checkpoint-1").is_dir() and (out / "previous-1" / "metrics.jsonl").exists()
    assert main(args(out, data, 1, "--overwrite")) == 0
    assert not (out / "previous-2").exists() and [r["step"] for r in metrics(out)] == [1]
    assert main(args(out, data, 1, "--resume", str(tmp_path / "nowhere"))) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_other_methods_run(tmp_path, data, method):
    out = tmp_path / method
    assert main(args(out, data, 2, "--method.name", method)) == 0
    records = metrics(out)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    if method == "sft":
        assert "mse_policy_chosen" in records[0] and "alpha_mean" not in records[0]
        # the plain diffusion loss on the chosen half
        assert records[0]["loss"] == pytest.approx(records[0]["mse_policy_chosen"], rel=1e-5)
    else:
        assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
        assert records[0]["alpha_mean"] == 1.0 and records[0]["gamma_mean"] == 1.0


def test_lora_reference_and_options_resume_exactly(tmp_path, data):
    """LoRA (reference = adapters off), timestep weighting and the likelihood probe: their state resumes too."""
    opts = ("--model.lora_rank", "4", "--method.reference", "lora", "--method.timestep_weighting",
            "inverse-std", "--logging.diagnostics_every", "1", "--model.gradient_checkpointing", "true")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args(full, data, 4, *opts)) == 0
    assert main(args(part, data, 2, *opts)) == 0
    assert main(args(part, data, 4, *opts, "--resume", "latest")) == 0
    records = metrics(full)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert "sample_weight_mean" in records[-1] and "probe_logp_chosen_change" in records[-1]
    assert metrics(part) == [dict(r, **{k: metrics(part)[i][k] for k in TIMING}) for i, r in enumerate(records)]
    # Gamma (Eq. 10) on every step; the resumed run's running fraction counts the steps before the resume
    gammas = [r["Gamma"] for r in records]
    assert len(gammas) == 4 and all(math.isfinite(g) and g != 0.0 for g in gammas)
    assert records[-1]["Gamma_positive_fraction"] == sum(g > 0 for g in gammas) / 4


def test_diagnostics_do_not_change_training(tmp_path, data):
    """A run with the likelihood probe and Gamma every step trains exactly like one without: same
    losses, gradient norms and final weights, bitwise (the Gamma pass draws its own noise, restores
    the RNG state and leaves no gradient behind)."""
    from safetensors.torch import load_file

    on, off = tmp_path / "on", tmp_path / "off"
    common = ("--train.batch_size", "4", "--train.micro_batch_size", "2")
    assert main(args(on, data, 3, *common, "--logging.diagnostics_every", "1")) == 0
    assert main(args(off, data, 3, *common)) == 0
    assert "Gamma" in metrics(on)[-1] and "Gamma" not in metrics(off)[-1]
    assert losses(on) == losses(off)
    assert [r["grad_norm"] for r in metrics(on)] == [r["grad_norm"] for r in metrics(off)]
    weights = [load_file(str(next((p / "final").rglob("*.safetensors")))) for p in (on, off)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_ema_reference_moves_toward_policy(tmp_path, data):
    from pgdpo.train.trainer import Trainer

    cfg = load_config(DEMO, [("output_dir", str(tmp_path / "ema")), ("data.path", data),
                             ("logging.trackers", []), ("logging.progress", False),
                             ("train.batch_size", 2), ("train.micro_batch_size", 1),
                             ("optim.warmup_steps", 0), ("method.ref_ema_every", 1), ("method.ref_ema_rate", 0.25)])
    trainer = Trainer(cfg)
    try:
        it = trainer.dataset.stream()
        before = [p.detach().clone() for p in trainer.reference.parameters()]
        initial_gap = sum(float((p.detach() - r).abs().sum()) for p, r in zip(trainer.policy.parameters(), before))
        assert initial_gap == 0.0
        trainer.train_step(1, it)
        after = [p.detach() for p in trainer.reference.parameters()]
        policy = [p.detach() for p in trainer.policy.parameters()]
        for b, a, p in zip(before, after, policy):
            torch.testing.assert_close(a, b + 0.25 * (p - b), rtol=0, atol=1e-6)
        gap_before = sum(float((p - b).abs().sum()) for p, b in zip(policy, before))
        gap_after = sum(float((p - a).abs().sum()) for p, a in zip(policy, after))
        assert 0 < gap_after < gap_before
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------- bad input


def test_data_model_mismatch_is_an_error(tmp_path, data, capsys):
    assert main(args(tmp_path / "unet", data, 1, "--model.name", "tiny-unet3d")) == 2
    err = capsys.readouterr().err
    assert "dataset and model are incompatible" in err and "latent channels" in err


def test_corrupt_and_missing_data_name_the_file(tmp_path, data, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    shard = next(broken.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(args(tmp_path / "a", str(broken), 1)) == 2
    assert shard.name in capsys.readouterr().err
    assert main(args(tmp_path / "b", str(tmp_path / "nothing"), 1, "--data.synthesize", "false")) == 2
    assert "nothing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- parts


def test_unpaired_predict_matches_paired_predict():
    from pgdpo.train.models import adapter_for, build_model

    for name in ("tiny-wan-t2v", "tiny-wan-i2v", "tiny-unet3d"):
        model = build_model(name, seed=0).eval()
        a = adapter_for(model)
        g = torch.Generator().manual_seed(0)
        b, (f, h, w) = 2, (3, 8, 8)
        batch = {"encoder_hidden_states": torch.randn(b, 5, a.text_dim, generator=g)}
        if a.family == "wan-i2v":
            batch["image_condition"] = torch.randn(b, a.image_condition_channels, f, h, w, generator=g)
            batch["encoder_hidden_states_image"] = torch.randn(b, 4, a.image_dim, generator=g)
        noisy = torch.randn(2 * b, a.latent_channels, f, h, w, generator=g)
        t = a.model_timesteps(torch.tensor([300.0, 700.0, 100.0, 900.0]))
        with torch.no_grad():
            paired = a.predict(model, noisy, t, batch)
            half = a.predict(model, noisy[:b], t[:b], batch, paired=False)
        torch.testing.assert_close(half, paired[:b], rtol=1e-5, atol=1e-5)


def test_timestep_weighting():
    from pgdpo.train.weighting import TimestepWeighting

    tw = TimestepWeighting(bins=4, momentum=0.0)
    t = torch.tensor([100.0, 300.0, 600.0, 900.0])
    assert torch.equal(tw(t), torch.ones(4))  # no statistics yet
    tw.observe(t, torch.tensor([8.0, 4.0, 2.0, 1.0]))  # reward signal largest at small t
    tw.update()
    w = tw(t)
    assert w.mean().item() == pytest.approx(1.0)  # uniform draws: mean weight 1
    assert torch.all(w[:-1] < w[1:])  # inverse to the signal's size
    assert w[0] / w[3] == pytest.approx(1 / 8)
    state = tw.state_dict()
    other = TimestepWeighting(bins=4)
    other.load_state_dict(state)
    assert torch.equal(other(t), w)


def test_step_seeds_are_distinct_and_stable():
    from pgdpo.train.trainer import step_seed

    seeds = {step_seed(0, s, r, m) for s in range(50) for r in range(4) for m in range(3)}
    assert len(seeds) == 600
    assert step_seed(0, 7, 1, 0) == step_seed(0, 7, 1, 0) != step_seed(1, 7, 1, 0)


def test_sigterm_stops_with_a_checkpoint(tmp_path, data):
    """A scheduler's SIGTERM: the step finishes, a checkpoint is written, the exit code says why."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "pgdpo", "train", *args(out, data, 100000, "--save-every", "0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = metrics(out)[-1]["step"]
    assert [s for s, _ in list_checkpoints(str(out))] == [last]
    assert "got SIGTERM" in err and "--resume latest" in err
