"""The paper's pipeline end to end on a tiny random but real diffusers ``WanPipeline`` saved as a folder:
``pgdpo data generate`` -> ``score`` -> ``pairs`` -> ``encode`` -> ``pgdpo train`` -> ``pgdpo eval``;
generation split over 2 processes equals 1 process; an interrupted generation resumes without redoing
finished videos; clear errors for bad prompts and a missing pipeline part."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgdpo.cli import main
from pgdpo.train.data import PreferenceDataset, check_compatible, validate_dataset

from ._launch import ROOT, kill_when, run, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = ["--frames", "5", "--height", "32", "--width", "32", "--text-len", "16"]
PROMPTS = ["a cat surfing on the wave", "red dog running", "a dog on the wave"]


def _tiny_wan_pipeline(folder: Path) -> Path:
    """Tiny WanTransformer3DModel, AutoencoderKLWan, UMT5 encoder, WordLevel tokenizer, flow-matching
    scheduler: a WanPipeline saved with save_pretrained."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from pgdpo.train.models import build_model

    torch.manual_seed(0)
    words = ["<pad>", "</s>", "<unk>", *"a cat dog surfing on the wave red running".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    pipe = WanPipeline(
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                          unk_token="<unk>"),
        text_encoder=UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                 num_heads=4, relative_attention_num_buckets=8)),
        vae=AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=build_model("tiny-wan-t2v", seed=1))
    pipe.save_pretrained(folder)
    return folder


def _tiny_clip(folder: Path) -> Path:
    """A tiny CLIPModel with a WordLevel tokenizer and a CLIPImageProcessor in one folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=1,
                                         bos_token_id=1, pad_token_id=0),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    words = ["<pad>", "</s>", "<unk>", *"a cat dog surfing on the wave red running".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return _tiny_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipe")


def _prompts(path: Path, n: int = 2) -> Path:
    path.write_text("".join(p + "\n\n" for p in PROMPTS[:n]))  # blank lines are skipped
    return path


def _generate(pipe_dir, prompts, out, *extra, steps="2") -> None:
    assert main(["data", "generate", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--out", str(out),
                 "--per-prompt", "2", "--steps", steps, "--no-progress", *SIZE, *extra]) == 0


def _manifest(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "generations.jsonl").read_text().splitlines()]


def _frames(path) -> np.ndarray:
    """A generated video as uint8 [F, H, W, 3], read independently of pgdpo (PNG frames or .npy)."""
    from PIL import Image

    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)
    return np.stack([np.asarray(Image.open(p)) for p in sorted(path.glob("*.png"))])


def _video_stats(out) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (Path(out) / "videos").iterdir()
            if not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------- the chain


def test_chain_generate_score_pairs_encode_train_eval(pipe_dir, tmp_path, capsys):
    from diffusers import WanPipeline

    from pgdpo.train.cli import main as train_main

    gen = tmp_path / "gen"
    _generate(pipe_dir, _prompts(tmp_path / "prompts.txt"), gen)
    records = _manifest(gen)
    assert [(r["prompt_id"], r["candidate"], r["seed"]) for r in records] == [
        ("p00000", 0, 0), ("p00000", 1, 1), ("p00001", 0, 2), ("p00001", 1, 3)]
    assert [r["prompt"] for r in records] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    # the recorded seed reproduces the video with diffusers' own pipeline, called directly
    pipe = WanPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    again = pipe(PROMPTS[1], height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(records[3]["seed"]), output_type="np").frames[0]
    stored = _frames(gen / records[3]["video"])
    assert stored.shape == (5, 32, 32, 3) and stored.dtype == np.uint8
    assert np.abs(stored.astype(np.int16) - (again * 255).round().astype(np.int16)).max() <= 1
    assert not np.array_equal(_frames(gen / records[0]["video"]), _frames(gen / records[1]["video"]))

    # score: two hooks, each under its name; the ranking one in "score"
    scored = tmp_path / "scored" / "scored.jsonl"  # another folder: video paths are rewritten
    assert main(["data", "score", "--in", str(gen / "generations.jsonl"), "--out", str(scored), "--reward",
                 "tests._rewards:brightness", "--reward", "red=tests._rewards:redness", "--score-key", "red",
                 "--batch-size", "3", "--no-progress"]) == 0
    lines = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(lines) == 4
    for line, record in zip(lines, records):
        frames = _frames(gen / record["video"]).astype(np.float64) / 255
        assert line["scores"]["brightness"] == pytest.approx(frames.mean(), abs=1e-6)
        assert line["scores"]["red"] == pytest.approx(frames[..., 0].mean() - frames[..., 2].mean(), abs=1e-6)
        assert line["score"] == line["scores"]["red"] and line["seed"] == record["seed"]
        assert (scored.parent / line["video"]).resolve() == (gen / record["video"]).resolve()

    # pairs -> encode -> train
    pairs = tmp_path / "scored" / "pairs.jsonl"
    assert main(["data", "pairs", "--scores", str(scored), "--out", str(pairs)]) == 0
    pair_lines = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(pair_lines) == 2
    for pair in pair_lines:
        group = [line for line in lines if line["prompt_id"] == pair["prompt_id"]]
        best = max(group, key=lambda g: g["scores"]["red"])
        assert pair["chosen"] == {"video": best["video"], "score": best["scores"]["red"]}
    data = tmp_path / "data"
    assert main(["data", "encode", "--pairs", str(pairs), "--pipeline", str(pipe_dir), "--out", str(data),
                 "--text-len", "16", "--dtype", "float32"]) == 0
    meta = validate_dataset(data, deep=True)
    assert meta.num_pairs == 2 and meta.latent_shape == [16, 2, 4, 4]
    check_compatible(meta, "tiny-wan-t2v")
    run_dir = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--output-dir", str(run_dir),
                       "--data.path", str(data), "--model.path", str(pipe_dir), "--max-steps", "2",
                       "--train.batch_size", "2", "--train.micro_batch_size", "1", "--validation.every", "0",
                       "--logging.progress", "false", "--logging.trackers", "[]", "--logging.plots", "false",
                       "--optim.warmup_steps", "0", "--save-every", "2"]) == 0
    assert (run_dir / "final" / "diffusion_pytorch_model.safetensors").is_file()
    assert len(PreferenceDataset(data, batch_size=1)) == 2

    # eval: base vs the run's final/, 2 seeds, a reward, a metric hook, CLIP
    clip = _tiny_clip(tmp_path / "clip")
    ev = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--pipeline", str(pipe_dir), "--trained", str(run_dir), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(ev), "--seeds", "0,2", "--steps", "2",
                 "--reward", "tests._rewards:brightness", "--metric", "tests._rewards:redness", "--clip", str(clip),
                 "--no-progress", *SIZE]) == 0
    report = json.loads((ev / "eval.json").read_text())
    assert report["settings"]["trained_kind"] == "full"
    assert Path(report["settings"]["trained"]) == (run_dir / "final").resolve()
    videos = {(v["model"], v["prompt_id"], v["seed"]): v for v in report["videos"]}
    assert len(videos) == 2 * 2 * 2
    # same prompt, same seed, same settings: eval's base video is generate's video (seeds 0 and 2 here)
    assert np.array_equal(_frames(ev / videos[("base", "p00000", 0)]["video"]), _frames(gen / records[0]["video"]))
    assert np.array_equal(_frames(ev / videos[("base", "p00001", 2)]["video"]), _frames(gen / records[2]["video"]))
    trained0 = _frames(ev / videos[("trained", "p00000", 0)]["video"])
    assert not np.array_equal(trained0, _frames(gen / records[0]["video"]))  # the trained weights differ
    for v in report["videos"]:
        frames = _frames(ev / v["video"]).astype(np.float64) / 255
        assert v["brightness"] == pytest.approx(frames.mean(), abs=1e-6)
        flicker = 1 - np.abs(np.diff(frames, axis=0)).mean()
        assert v["temporal_flickering"] == pytest.approx(flicker, abs=1e-6)
        assert 0 <= v["clip_score"] <= 100
    # the CLIP score against the CLIP model called directly on all 5 frames
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(clip)).eval()
    frames = _frames(ev / videos[("trained", "p00001", 2)]["video"])
    with torch.no_grad():
        image = model.get_image_features(**CLIPImageProcessor.from_pretrained(str(clip))(list(frames),
                                                                                          return_tensors="pt"))
        text = model.get_text_features(**AutoTokenizer.from_pretrained(str(clip))([PROMPTS[1]], return_tensors="pt"))
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    want = (100 * torch.nn.functional.cosine_similarity(image.double(), text.double())).clamp(min=0).mean()
    assert videos[("trained", "p00001", 2)]["clip_score"] == pytest.approx(float(want), abs=1e-3)
    # the table: means, per-seed differences, their spread
    table = report["metrics"]
    assert set(table) == {"brightness", "redness", "temporal_flickering", "clip_score"}
    for name, row in table.items():
        per_seed = [np.mean([videos[("trained", p, s)][name] - videos[("base", p, s)][name]
                             for p in ("p00000", "p00001")]) for s in (0, 2)]
        assert row["per_seed_difference"] == pytest.approx(per_seed)
        assert row["difference"] == pytest.approx(np.mean(per_seed))
        assert row["difference_std_over_seeds"] == pytest.approx(np.std(per_seed, ddof=1))
        assert row["base"] == pytest.approx(np.mean([v[name] for k, v in videos.items() if k[0] == "base"]))
    markdown = (ev / "eval.md").read_text()
    assert "| brightness |" in markdown and "| clip_score |" in markdown and "std over seeds" in markdown
    assert "| brightness |" in capsys.readouterr().out
    from PIL import Image

    with Image.open(ev / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 200 and sheet.size[1] > 100
    # a rerun reuses the videos (same settings) and writes the same table
    stats = _video_stats(ev / "trained")
    assert main(["eval", "--pipeline", str(pipe_dir), "--trained", str(run_dir / "final"), "--prompts",
                 str(tmp_path / "prompts.txt"), "--out", str(ev), "--seeds", "0,2", "--steps", "2",
                 "--reward", "tests._rewards:brightness", "--metric", "tests._rewards:redness", "--clip", str(clip),
                 "--no-progress", *SIZE]) == 0
    assert _video_stats(ev / "trained") == stats
    assert json.loads((ev / "eval.json").read_text())["metrics"] == table


# ---------------------------------------------------------------------------------------------- resume


def test_interrupted_generate_resumes_without_redoing_finished_videos(pipe_dir, tmp_path):
    prompts = _prompts(tmp_path / "prompts.txt", 3)
    out = tmp_path / "gen"

    def some_done() -> bool:
        folder = out / "videos"
        return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())

    cmd = [*torchrun(1, "-m", "pgdpo", "data", "generate"), "--pipeline", str(pipe_dir), "--prompts", str(prompts),
           "--out", str(out), "--per-prompt", "2", "--steps", "40", "--no-progress", *SIZE]
    kill_when(cmd, some_done, what="a finished video")
    assert not (out / "generations.jsonl").exists()  # killed before the end
    finished = _video_stats(out)
    assert 1 <= len(finished) < 6
    proc = run(cmd)
    assert f"{6 - len(finished)} generated here, {len(finished)} already there" in proc.stdout
    after = _video_stats(out)
    assert len(after) == 6 and {k: after[k] for k in finished} == finished  # not generated again
    assert not [p for p in (out / "videos").iterdir() if p.name.startswith(".")]  # no temporary left over
    full = tmp_path / "full"
    _generate(pipe_dir, prompts, full, steps="40")
    assert _manifest(full) == _manifest(out)
    for record in _manifest(full):
        assert np.array_equal(_frames(full / record["video"]), _frames(out / record["video"])), record["video"]
    # other settings in the same folder are refused, naming what changed
    assert main(["data", "generate", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--out", str(out),
                 "--per-prompt", "2", "--steps", "3", "--no-progress", *SIZE]) == 1


@pytest.mark.distributed
def test_generate_on_two_processes_splits_the_prompts_and_equals_one(pipe_dir, tmp_path):
    prompts = _prompts(tmp_path / "prompts.txt", 3)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["data", "generate", "--pipeline", str(pipe_dir), "--prompts", str(prompts), "--per-prompt", "2",
            "--steps", "2", "--no-progress", "--video-format", "npy", *SIZE]
    proc = run([*torchrun(2, "-m", "pgdpo", *args), "--out", str(two)])
    assert "rank 0/2: prompts [0, 2], 4 video(s) generated" in proc.stdout
    assert "rank 1/2: prompts [1], 2 video(s) generated" in proc.stdout
    assert main([*args, "--out", str(one)]) == 0
    assert _manifest(one) == _manifest(two)
    assert len(_manifest(one)) == 6 and _manifest(one)[5]["video"] == "videos/00002_01.npy"
    for record in _manifest(one):
        assert np.array_equal(np.load(one / record["video"]), np.load(two / record["video"])), record["video"]


# ---------------------------------------------------------------------------------------------- errors


def test_bad_prompt_line_and_missing_pipeline_part_are_named(pipe_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"text": "a dog"}) + "\n")
    assert main(["data", "generate", "--pipeline", str(pipe_dir), "--prompts", str(bad), "--out",
                 str(tmp_path / "o")]) == 1
    assert "prompts.jsonl:2: 'prompt' must be a non-empty string" in capsys.readouterr().err
    bad.write_text(json.dumps({"prompt": "a cat", "prompt_id": "x"}) + "\n{oops\n")
    assert main(["data", "generate", "--pipeline", str(pipe_dir), "--prompts", str(bad), "--out",
                 str(tmp_path / "o")]) == 1
    assert "prompts.jsonl:2: not valid JSON" in capsys.readouterr().err
    broken = shutil.copytree(pipe_dir, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    assert main(["data", "generate", "--pipeline", str(broken), "--prompts", str(_prompts(tmp_path / "p.txt")),
                 "--out", str(tmp_path / "o")]) == 1
    assert "missing part vae/" in capsys.readouterr().err
    assert main(["data", "generate", "--pipeline", str(broken / "transformer"), "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "no model_index.json" in capsys.readouterr().err
    assert main(["eval", "--pipeline", str(pipe_dir), "--trained", str(tmp_path), "--prompts",
                 str(tmp_path / "p.txt"), "--out", str(tmp_path / "e")]) == 1
    assert "--trained" in capsys.readouterr().err


def test_score_resumes_after_a_crash_and_checks_hooks(pipe_dir, tmp_path, capsys):
    gen = tmp_path / "gen"
    _generate(pipe_dir, _prompts(tmp_path / "prompts.txt"), gen, "--video-format", "npy")
    args = ["data", "score", "--in", str(gen / "generations.jsonl"), "--reward", "tests._rewards:brightness",
            "--batch-size", "3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text(full[0] + "\n" + full[1][:20])  # what a crash mid-write leaves
    capsys.readouterr()
    assert main([*args, "--out", str(part)]) == 0
    assert "3 scored now, 1 already scored" in capsys.readouterr().out
    assert part.read_text().splitlines() == full
    assert main([*args, "--out", str(part), "--reward", "tests._rewards:redness"]) == 1  # other hooks
    assert "use another --out or --overwrite" in capsys.readouterr().err
    assert main(["data", "score", "--in", str(gen / "generations.jsonl"), "--out", str(tmp_path / "x.jsonl"),
                 "--reward", "tests._rewards:one_score_too_few", "--no-progress"]) == 1
    assert "reward 'one_score_too_few' returned 3 scores for 4 videos" in capsys.readouterr().err
    assert main(["data", "score", "--in", str(gen / "generations.jsonl"), "--out", str(tmp_path / "y.jsonl"),
                 "--reward", "tests._rewards:nothing"]) == 1
    assert "--reward 'tests._rewards:nothing'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- LoRA, I2V


def _pipeline_video(pipe_dir, prompt, seed, transformer=None, **kw) -> np.ndarray:
    """A video made by diffusers' own pipeline class, called directly, as uint8."""
    import diffusers

    extra = {"transformer": transformer} if transformer is not None else {}
    name = json.loads((Path(pipe_dir) / "model_index.json").read_text())["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(str(pipe_dir), local_files_only=True, **extra)
    frames = pipe(prompt=prompt, height=32, width=32, num_frames=5, num_inference_steps=2, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(seed), output_type="np", **kw).frames[0]
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def test_eval_of_lora_weights_matches_the_merged_adapters(pipe_dir, tmp_path):
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    from pgdpo.train.cli import main as train_main
    from pgdpo.train.data.synth import synth_dataset

    data = tmp_path / "data"
    synth_dataset(data, pairs=4, latent_shape=(16, 2, 4, 4), text_len=16, text_dim=32, progress=False)
    run_dir = tmp_path / "run"
    assert train_main(["--config", str(ROOT / "configs" / "demo.yaml"), "--output-dir", str(run_dir),
                       "--data.path", str(data), "--model.path", str(pipe_dir), "--model.lora_rank", "2",
                       "--max-steps", "2", "--train.batch_size", "2", "--train.micro_batch_size", "1",
                       "--validation.every", "0", "--logging.progress", "false", "--logging.trackers", "[]",
                       "--logging.plots", "false", "--optim.warmup_steps", "0", "--optim.lr", "3e-2"]) == 0
    lora = run_dir / "final" / "pytorch_lora_weights.safetensors"
    ev = tmp_path / "eval"
    assert main(["eval", "--pipeline", str(pipe_dir), "--trained", str(run_dir), "--prompts",
                 str(_prompts(tmp_path / "p.txt", 1)), "--out", str(ev), "--seeds", "5", "--steps", "2",
                 "--no-progress", "--video-format", "npy", *SIZE]) == 0
    report = json.loads((ev / "eval.json").read_text())
    assert report["settings"]["trained_kind"] == "lora"
    assert report["metrics"]["temporal_flickering"]["difference_std_over_seeds"] is None  # one seed
    assert "| n/a |" in (ev / "eval.md").read_text()
    # independently: W + (alpha / r) B A merged into the base transformer by hand
    transformer = WanTransformer3DModel.from_pretrained(str(pipe_dir / "transformer"))
    params = dict(transformer.named_parameters())
    with safe_open(str(lora), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
        keys = [k for k in f.keys() if k.endswith("lora_A.weight")]
        assert keys
        with torch.no_grad():
            for key in keys:
                a, b = f.get_tensor(key), f.get_tensor(key.replace("lora_A", "lora_B"))
                assert b.abs().max() > 0  # trained
                params[key.removeprefix("transformer.").replace("lora_A.weight", "weight")] += scale * b @ a
    want = _pipeline_video(pipe_dir, PROMPTS[0], 5, transformer=transformer)
    got = np.load(ev / "trained" / "videos" / "00000_s5.npy")
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    assert not np.array_equal(got, np.load(ev / "base" / "videos" / "00000_s5.npy"))


def test_i2v_generate_with_an_image_per_prompt_then_encode(pipe_dir, tmp_path, capsys):
    pytest.importorskip("ftfy", reason="diffusers' WanImageToVideoPipeline needs ftfy (pgdpo's dev/train extra)")
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from pgdpo.train.models import build_model

    base = WanPipeline.from_pretrained(str(pipe_dir), local_files_only=True)
    torch.manual_seed(0)
    i2v = tmp_path / "pipe_i2v"
    WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, scheduler=base.scheduler,
        image_encoder=CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=2, image_size=32, patch_size=8)),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        transformer=build_model("tiny-wan-i2v", seed=1)).save_pretrained(i2v)
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0], "prompt_id": "cat", "image": "img/a.png"}) + "\n"
                       + json.dumps({"prompt": PROMPTS[1], "prompt_id": "dog", "image": "img/b.png"}) + "\n")
    gen = tmp_path / "gen"
    _generate(i2v, prompts, gen, "--video-format", "npy")
    records = _manifest(gen)
    assert [(r["prompt_id"], r["seed"], Path(r["image"]).name) for r in records] == [
        ("cat", 0, "a.png"), ("cat", 1, "a.png"), ("dog", 2, "b.png"), ("dog", 3, "b.png")]
    with Image.open(tmp_path / "img" / "b.png") as image:
        want = _pipeline_video(i2v, PROMPTS[1], 3, image=image.convert("RGB"))
    got = np.load(gen / records[3]["video"])
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    assert main(["data", "score", "--in", str(gen / "generations.jsonl"), "--out", str(gen / "scored.jsonl"),
                 "--reward", "tests._rewards:brightness", "--no-progress"]) == 0
    assert main(["data", "pairs", "--scores", str(gen / "scored.jsonl"), "--out", str(gen / "pairs.jsonl")]) == 0
    assert all("image" in json.loads(line) for line in (gen / "pairs.jsonl").read_text().splitlines())
    assert main(["data", "encode", "--pairs", str(gen / "pairs.jsonl"), "--pipeline", str(i2v), "--task", "i2v",
                 "--out", str(tmp_path / "data"), "--text-len", "16", "--dtype", "float32"]) == 0
    meta = validate_dataset(tmp_path / "data", deep=True)
    assert meta.task == "i2v" and meta.num_pairs == 2
    check_compatible(meta, "tiny-wan-i2v")
    # a prompt without its image is named
    prompts.write_text(json.dumps({"prompt": PROMPTS[0], "prompt_id": "cat", "image": "img/a.png"}) + "\n"
                       + json.dumps({"prompt": PROMPTS[1], "prompt_id": "dog"}) + "\n")
    capsys.readouterr()
    assert main(["data", "generate", "--pipeline", str(i2v), "--prompts", str(prompts), "--out",
                 str(tmp_path / "x")]) == 1
    assert "prompt 'dog' has none" in capsys.readouterr().err


@pytest.mark.distributed
def test_eval_on_two_processes_equals_one(pipe_dir, tmp_path):
    """Prompts split over 2 processes (gloo, CPU); the trained model here is a transformer folder in
    save_pretrained layout (what `pgdpo export` writes), swapped into the pipeline."""
    from pgdpo.train.models import build_model

    build_model("tiny-wan-t2v", seed=2).save_pretrained(tmp_path / "exported")
    args = ["eval", "--pipeline", str(pipe_dir), "--trained", str(tmp_path / "exported"), "--prompts",
            str(_prompts(tmp_path / "p.txt", 3)), "--seeds", "0,1", "--steps", "2", "--no-progress",
            "--reward", "tests._rewards:brightness", "--video-format", "npy", *SIZE]
    run([*torchrun(2, "-m", "pgdpo", *args), "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert one["settings"]["trained_kind"] == "full" and len(one["videos"]) == 2 * 3 * 2
    assert one["videos"] == two["videos"] and one["metrics"] == two["metrics"]
    assert (tmp_path / "two" / "contact_sheet.png").is_file()
