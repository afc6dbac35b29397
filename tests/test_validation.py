"""Validation samples during training (``pgdpo.train.validation``), and the motion demo data.

Real runs of ``pgdpo train`` on tiny Wan and UNet3D models: GIFs at step 0, every ``validation.every``
steps and at the end, a before/after grid, a reward hook's scores; the 2-process FSDP2 case is in
``tests/test_train_distributed.py``.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pgdpo.train.cli import main
from pgdpo.train.data.synth import motion_pair, motion_reward, position_code, synth_dataset
from pgdpo.train.preview import latent_to_rgb, rgb_to_latent

from .test_train import ROOT, args, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 4


def gif_frames(path) -> list[np.ndarray]:
    img = Image.open(path)
    frames = []
    for i in range(img.n_frames):
        img.seek(i)
        frames.append(np.asarray(img.convert("RGB")))
    return frames


def check_samples(out, steps, frames, size):
    folders = sorted(p.name for p in (out / "samples").glob("step-*"))
    assert folders == [f"step-{s:06d}" for s in steps]
    for folder in folders:
        gifs = sorted((out / "samples" / folder).glob("prompt-*.gif"))
        assert len(gifs) == 2
        for gif in gifs:
            fs = gif_frames(gif)
            assert len(fs) == frames and fs[0].shape == (size * SCALE, size * SCALE, 3)
            pixels = np.stack(fs).reshape(-1, 3).astype(float)
            assert pixels.std(0).max() > 5, f"{gif} is blank"  # not one flat colour
    grid = np.asarray(Image.open(out / "samples" / "before_after.png").convert("RGB")).astype(float)
    assert grid.std() > 5


@pytest.mark.parametrize("model,latent,schedule", [("tiny-wan-t2v", (16, 3, 8, 8), "flow"),
                                                   ("tiny-unet3d", (4, 3, 8, 8), "ddpm-eps")])
def test_validation_samples_at_the_chosen_steps(tmp_path, model, latent, schedule, capsys):
    data = tmp_path / "data"
    synth_dataset(data, pairs=4, latent_shape=latent, text_len=8, text_dim=32, kind="motion", progress=False)
    out = tmp_path / "run"
    argv = args(out, str(data), 4, "--model.name", model, "--method.schedule", schedule,
                "--validation.every", "2", "--validation.num_prompts", "2", "--validation.steps", "3",
                "--validation.scale", str(SCALE), "--validation.reward", "pgdpo.train.data.synth:motion_reward",
                "--logging.trackers", "[tensorboard]", "--save-every", "0")
    assert main(argv) == 0
    assert "samples" in capsys.readouterr().out
    check_samples(out, [0, 2, 4], latent[1], latent[2])
    records = [json.loads(line) for line in (out / "samples" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(len(r["reward"]) == 2 and -1 <= r["reward_mean"] <= 1 for r in records)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # validation adds nothing to metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert "validation/prompt-00" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("validation/reward")] == [0, 2, 4]


def test_samples_are_reproducible_for_fixed_weights(tmp_path):
    """The fixed seed: two runs' step-0 samples (same initial weights) are the same images."""
    data = tmp_path / "data"
    synth_dataset(data, pairs=4, latent_shape=(16, 3, 8, 8), text_len=8, text_dim=32, kind="motion",
                  progress=False)
    for name in ("a", "b"):
        assert main(args(tmp_path / name, str(data), 1, "--validation.every", "5", "--validation.steps", "2",
                         "--validation.num_prompts", "1", "--save-every", "0")) == 0
    a = gif_frames(tmp_path / "a" / "samples" / "step-000000" / "prompt-00.gif")
    b = gif_frames(tmp_path / "b" / "samples" / "step-000000" / "prompt-00.gif")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_reward_hook_is_named(tmp_path, capsys):
    assert main(args(tmp_path / "r", None, 1, "--validation.every", "1", "--validation.reward", "nope")) == 2
    assert "validation.reward must be 'module:function'" in capsys.readouterr().err


def test_preview_and_motion_data():
    # the blob's colour vector previews as the asked colour
    rgb = latent_to_rgb(rgb_to_latent(torch.tensor([1.0, 0.5, 0.1]), 16).view(16, 1, 1, 1))
    torch.testing.assert_close(rgb.view(3), torch.tensor([1.0, 0.5, 0.1]), atol=1e-4, rtol=0)
    pairs = [motion_pair(i, latent_shape=(16, 5, 8, 8), text_len=8, text_dim=32, seed=0) for i in range(16)]
    prompts = [p["prompt"] for p in pairs]
    chosen = motion_reward(torch.stack([latent_to_rgb(p["chosen"]) for p in pairs]), prompts)
    rejected = motion_reward(torch.stack([latent_to_rgb(p["rejected"]) for p in pairs]), prompts)
    assert chosen.min() > 0.95 and rejected.mean() < 0.3  # the preference the reward sees
    # chosen and rejected share the background: they differ only where the blob is
    diff = (pairs[0]["chosen"] - pairs[0]["rejected"]).abs().amax(0)
    assert diff[0].max() < 1e-6 and diff[1:].max() > 0.5  # same start, different motion after


@pytest.mark.parametrize("channels", [16, 4, 8])
def test_position_code_is_invisible_in_the_preview_and_shared_by_every_clip(channels):
    """The motion clips' fixed layout: in the preview's null space (the GIFs and the reward do not see it),
    not zero where spare channel directions exist, and the same in every pair (a background, not noise)."""
    code = position_code(channels, 5, 8, 8)
    rgb = latent_to_rgb(code)
    torch.testing.assert_close(rgb, latent_to_rgb(torch.zeros_like(code)), atol=1e-5, rtol=0)
    assert code.abs().amax() > 1.0
    # without the noise background a clip is blob + code, and the blob's colour lies in the preview's
    # row space: projected on the null space, every clip (chosen or rejected, any pair) is the code
    from pgdpo.train.preview import latent_rgb_factors

    factors, _ = latent_rgb_factors(channels)
    null = torch.eye(channels) - factors @ torch.linalg.pinv(factors)  # projector on the null space
    for i in range(3):
        p = motion_pair(i, latent_shape=(channels, 5, 8, 8), text_len=8, text_dim=32, seed=0, background=0.0)
        for clip in (p["chosen"], p["rejected"]):
            projected = torch.einsum("dc,cfhw->dfhw", null, clip)
            torch.testing.assert_close(projected, code, atol=1e-4, rtol=0)
    assert position_code(3, 5, 8, 8).abs().amax() == 0  # no spare channel direction: no code


def main_in_repository(argv: list[str]) -> int:
    """``pgdpo train ARGV`` run from the repository root, as the README's commands are (the demo config's
    model.path is relative to the working directory)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return main(argv)
    finally:
        os.chdir(cwd)


def test_demo_short_form_learns_the_preference(tmp_path):
    """The README's demo config, shortened: the motion preference is learnt well above chance, with the
    chosen likelihood above the reference's (chosen MSE below it)."""
    out = tmp_path / "demo"
    argv = args(out, None, 120, "--train.batch_size", "8", "--train.micro_batch_size", "4",
                "--optim.warmup_steps", "5", "--data.synth_pairs", "32", "--save-every", "0")
    assert main(argv) == 0
    tail = metrics(out)[-20:]
    mean = lambda key: sum(r[key] for r in tail) / len(tail)
    assert mean("accuracy") > 0.6
    assert mean("mse_policy_chosen") < mean("mse_ref_chosen")
    assert mean("mse_policy_chosen") < mean("mse_policy_rejected")


def test_validation_decodes_with_a_local_vae(tmp_path):
    """validation.vae: a (tiny, random) AutoencoderKLWan saved with save_pretrained and loaded from the folder."""
    from diffusers import AutoencoderKLWan

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1], num_res_blocks=1,
                     temperal_downsample=[False]).save_pretrained(vae_dir)
    data = tmp_path / "data"
    synth_dataset(data, pairs=2, latent_shape=(16, 3, 8, 8), text_len=8, text_dim=32, kind="motion",
                  progress=False)
    out = tmp_path / "run"
    assert main(args(out, str(data), 1, "--validation.every", "1", "--validation.num_prompts", "1",
                     "--validation.steps", "2", "--validation.scale", "1", "--validation.vae", str(vae_dir),
                     "--save-every", "0")) == 0
    frames = gif_frames(out / "samples" / "step-000001" / "prompt-00.gif")
    assert len(frames) >= 3 and frames[0].shape[:2] == (16, 16)  # decoded: 2x the latent's 8x8
    assert np.stack(frames).astype(float).std() > 1
    assert main(args(tmp_path / "bad", str(data), 1, "--validation.every", "1",
                     "--validation.vae", str(tmp_path / "nowhere"))) == 2


def test_motion_mix_and_held_out_indices(tmp_path):
    """kind="motion-mix": each pair is the motion pair of the same index, chosen and rejected swapped in
    about half; first_index: pairs I.. of the same sequence (a held-out set is a later slice)."""
    from pgdpo.train.data.dataset import PreferenceDataset

    kw = dict(latent_shape=(16, 3, 8, 8), text_len=8, text_dim=32, progress=False)
    synth_dataset(tmp_path / "motion", pairs=12, kind="motion", **kw)
    synth_dataset(tmp_path / "mix", pairs=12, kind="motion-mix", **kw)
    synth_dataset(tmp_path / "late", pairs=4, kind="motion", first_index=8, **kw)
    motion, mix, late = (PreferenceDataset(str(tmp_path / n), batch_size=1, shuffle=False)
                         for n in ("motion", "mix", "late"))
    swapped = 0
    for i in range(12):
        m, x = motion.read_pair(i), mix.read_pair(i)
        torch.testing.assert_close(m["encoder_hidden_states"], x["encoder_hidden_states"], rtol=0, atol=0)
        if torch.equal(m["chosen"], x["chosen"]):
            torch.testing.assert_close(m["rejected"], x["rejected"], rtol=0, atol=0)
        else:
            swapped += 1
            torch.testing.assert_close(m["chosen"], x["rejected"], rtol=0, atol=0)
            torch.testing.assert_close(m["rejected"], x["chosen"], rtol=0, atol=0)
    assert 2 <= swapped <= 10  # a fair coin per pair (12 draws)
    for j in range(4):
        torch.testing.assert_close(late.read_pair(j)["chosen"], motion.read_pair(8 + j)["chosen"], rtol=0,
                                   atol=0)
    assert [e.prompt for e in late.entries] == [e.prompt for e in motion.entries[8:]]


def test_held_out_prompts_seeds_and_compare_grid(tmp_path, capsys):
    """validation.data "{output_dir}/..." with data.synthesize: held-out prompts written there (pairs past
    any training set); validation.num_seeds: the reward over several noise seeds; --compare: the second
    run's last samples become a column of the first run's before/after grid, and both runs' validation
    rewards are in the table."""
    from pgdpo.train.validation import HELD_OUT_FIRST_INDEX

    out = tmp_path / "run"
    argv = args(out, None, 2, "--data.synth_pairs", "4", "--validation.every", "2", "--validation.steps", "2",
                "--validation.num_prompts", "2", "--validation.num_seeds", "3", "--validation.scale", "1",
                "--validation.data", "{output_dir}/heldout", "--save-every", "0", "--compare", "dpo")
    assert main(argv) == 0
    captured = capsys.readouterr().out
    assert "validation reward" in captured and "val. reward" in captured
    held = json.loads((out / "heldout" / "dataset.json").read_text())
    assert held["num_pairs"] == 2 and held["source"]["first_index"] == HELD_OUT_FIRST_INDEX
    records = [json.loads(line) for line in (out / "samples" / "validation.jsonl").read_text().splitlines()]
    for r in records:
        assert r["seeds"] == [0, 1, 2] and len(r["reward"]) == 6 and len(r["reward_by_seed"]) == 3
        assert r["reward_mean"] == pytest.approx(sum(r["reward_by_seed"]) / 3)
    recipe = json.loads((out / "samples" / "before_after.json").read_text())
    labels = [c["label"] for c in recipe["columns"]]
    assert labels == ["step 0: tiny-wan-t2v (random init)", "step 2: pgdpo",
                      "step 2: dpo"]
    assert recipe["columns"][2]["videos"].startswith(str(out / "compare-dpo"))
    grid = np.asarray(Image.open(out / "samples" / "before_after.png").convert("RGB"))
    assert grid.shape[1] > grid.shape[0]  # four columns side by side


def test_held_out_set_written_again_for_more_prompts(tmp_path):
    """A held-out folder written for fewer prompts than validation.num_prompts is written again (not read
    short); one that holds enough is kept."""
    out = tmp_path / "run"
    common = ("--data.synth_pairs", "4", "--validation.every", "1", "--validation.steps", "1",
              "--validation.data", "{output_dir}/heldout", "--save-every", "0", "--checkpoint.overwrite", "true")
    assert main(args(out, None, 1, "--validation.num_prompts", "1", *common)) == 0
    meta = out / "heldout" / "dataset.json"
    assert json.loads(meta.read_text())["num_pairs"] == 1
    assert main(args(out, None, 1, "--validation.num_prompts", "3", *common)) == 0
    assert json.loads(meta.read_text())["num_pairs"] == 3
    written = meta.stat().st_mtime_ns
    assert main(args(out, None, 1, "--validation.num_prompts", "2", *common)) == 0
    assert meta.stat().st_mtime_ns == written  # enough pairs: kept


def test_demo_main_job_starts_from_the_shipped_base_model(tmp_path, capsys):
    """The README's main job as shipped (configs/demo.yaml: models/demo-base, held-out prompts, 3 noise
    seeds), shortened, with --compare dpo: both runs start from the base model (the same step-0 samples and
    reward), the grid has base / PG-DPO / DPO / data columns, and the base model's samples are blobs (a
    concentrated orange mass per frame, not noise)."""
    from safetensors.torch import load_file

    from pgdpo.train.validation import VIDEOS_FILE

    base = ROOT / "models" / "demo-base"
    weights = base / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 1_000_000 and (base / "config.json").is_file()
    out = tmp_path / "demo"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--output-dir", str(out), "--max-steps", "4",
            "--validation.every", "4", "--validation.scale", "1", "--logging.progress", "false",
            "--logging.trackers", "[]", "--logging.plots", "false", "--save-every", "0", "--compare", "dpo"]
    assert main_in_repository(argv) == 0
    printed = capsys.readouterr().out
    assert "of pgdpo on models/demo-base" in printed and "of dpo on models/demo-base" in printed
    main_runs = [json.loads(x) for x in (out / "samples" / "validation.jsonl").read_text().splitlines()]
    dpo_runs = [json.loads(x) for x in (out / "compare-dpo" / "samples" / "validation.jsonl").read_text()
                .splitlines()]
    assert [r["step"] for r in main_runs] == [0, 4] and main_runs[0]["seeds"] == [0, 1, 2]
    assert main_runs[0]["reward"] == dpo_runs[0]["reward"]  # same base, prompts and seeds
    recipe = json.loads((out / "samples" / "before_after.json").read_text())
    assert [c["label"] for c in recipe["columns"]] == ["step 0: demo-base", "step 4: pgdpo", "step 4: dpo"]
    assert recipe["data"]
    # the base model's samples are pictures, not noise: neighbouring pixels of the preview differ about as
    # little as in the data's clips, far less than in the preview of noise latents
    def roughness(v):  # [N, F, H, W, 3]
        return float(((v[:, :, 1:] - v[:, :, :-1]).abs().mean() + (v[:, :, :, 1:] - v[:, :, :, :-1]).abs().mean())
                     / 2)

    base_samples = load_file(str(out / "samples" / "step-000000" / VIDEOS_FILE))["videos"]
    data = load_file(recipe["data"])["videos"]
    noise = latent_to_rgb(torch.randn(8, 16, 5, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert roughness(base_samples) < 2 * roughness(data) < roughness(noise)


def test_demo_main_job_raises_the_held_out_reward_by_at_least_0_3(tmp_path):
    """Issue 27's bar, in CI's short form: the README's main job (configs/demo.yaml, from the shipped base
    model), 25 PG-DPO steps instead of 250, raises the validation reward on held-out prompts (mean over 3
    noise seeds) by at least 0.3 from the base model's. Measured here: +0.26 -> +0.84 after 25 steps, +0.94
    after 250 (bench/results/demo-cpu-2c/demo.md)."""
    out = tmp_path / "demo"
    argv = ["--config", str(ROOT / "configs" / "demo.yaml"), "--output-dir", str(out), "--max-steps", "25",
            "--validation.every", "25", "--logging.progress", "false", "--logging.trackers", "[]",
            "--logging.plots", "false", "--save-every", "0"]
    assert main_in_repository(argv) == 0
    runs = [json.loads(x) for x in (out / "samples" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in runs] == [0, 25] and runs[0]["seeds"] == [0, 1, 2]
    base, final = (sum(r["reward_by_seed"]) / len(r["reward_by_seed"]) for r in runs)
    assert final - base >= 0.3, (base, final)
