"""``pgdpo eval``: the base pipeline against a trained model on held-out prompts, with fixed seeds.

Both models sample every prompt once per seed (``--seeds``) through the same diffusers Wan pipeline
(:mod:`pgdpo.train.data.generate`: the same call, the same ``torch.Generator`` seed for base and trained,
so a pair of videos differs only by the weights). The trained model is ``--trained``: a run's output
folder (its ``final/``), a ``final/`` or ``pgdpo export`` folder (the transformer in ``save_pretrained``
layout, swapped into the pipeline), or LoRA weights (``pytorch_lora_weights.safetensors``, loaded with
``pipe.load_lora_weights``).

Metrics, per video:

- every ``--reward`` / ``--metric`` hook (``module:function``, the signature of ``validation.reward``:
  ``fn(videos [N, F, H, W, 3] in [0, 1], prompts) -> N numbers``);
- ``temporal_flickering``: ``1 - mean |frame[t+1] - frame[t]|`` over pixels in [0, 1] (VBench's
  pixel form: 1 = no change between frames; no model);
- ``clip_score`` with ``--clip DIR`` (a local ``CLIPModel`` folder with its tokenizer and
  ``CLIPImageProcessor``): ``max(100 cos(image, text), 0)`` averaged over up to 8 evenly spaced frames.

Written into ``--out``: ``videos`` of both models (``base/``, ``trained/``; a rerun reuses them),
``eval.json`` (settings, per-video scores, the table), ``eval.md`` (per metric: base mean, trained mean,
the difference trained - base and its standard deviation over seeds, the fraction of prompt x seed where
trained > base), ``contact_sheet.png`` (the first ``--sheet-prompts`` prompts, first seed: base and
trained frames side by side).
Under ``torchrun`` the prompts are split over the ranks (one pipeline per GPU); rank 0 scores and writes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

MODELS = ("base", "trained")
FLICKER = "temporal_flickering"
CLIP = "clip_score"
LORA_FILE = "pytorch_lora_weights.safetensors"
SHEET_FRAMES = 8


# ---------------------------------------------------------------------------------------------- metrics


def temporal_flickering(video: torch.Tensor) -> float:
    """``1 - mean |frame[t+1] - frame[t]|`` of a float ``[F, H, W, 3]`` video in [0, 1] (1: static)."""
    if video.shape[0] < 2:
        raise ValueError(f"temporal flickering needs at least 2 frames, got {video.shape[0]}")
    video = video.double()
    return float(1.0 - (video[1:] - video[:-1]).abs().mean())


def spaced_frames(count: int, most: int = SHEET_FRAMES) -> list[int]:
    """Up to ``most`` evenly spaced frame indices of ``count`` frames, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


class ClipScorer:
    """CLIP score of a video against its prompt, from a local ``CLIPModel`` folder."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = Path(folder)
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"--clip {str(folder)!r}: no config.json (expected a local CLIPModel "
                                    "folder with its tokenizer and image processor)")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(f"--clip {folder}/config.json: model_type {model_type!r}, expected 'clip' "
                             "(a CLIPModel: text and vision towers)")
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(f"--clip {str(folder)!r}: no preprocessor_config.json (the "
                                    "CLIPImageProcessor)")
        self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompt: str) -> float:
        frames = video[spaced_frames(video.shape[0])]
        pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        inputs = self.processor(images=list(pixels), return_tensors="pt")
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=max_len,
                                return_tensors="pt").to(self.device)
        text = self.model.get_text_features(input_ids=tokens["input_ids"],
                                            attention_mask=tokens["attention_mask"])
        image, text = _features(image), _features(text)
        cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
        return float((100.0 * cos).clamp(min=0).mean())


def _features(output) -> torch.Tensor:
    """Projected features (newer transformers return an output object with ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------- models


def resolve_trained(path: str | os.PathLike) -> tuple[str, Path]:
    """``("lora" | "full", folder)`` of ``--trained``: a run folder (its ``final/``), LoRA weights, or a
    transformer in ``save_pretrained`` layout (itself or a pipeline's ``transformer/``)."""
    from pgdpo.train.models import find_model_folder, spec_for

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--trained {str(path)!r}: not a folder")
    if (path / "final").is_dir():
        path = path / "final"
    if (path / LORA_FILE).is_file():
        return "lora", path
    folder = Path(find_model_folder(path, what="--trained", subfolders=("transformer",)))
    config = json.loads((folder / "config.json").read_text())
    try:
        spec = spec_for(config)
    except (TypeError, ValueError) as exc:
        held = config.get("_class_name") or "model of unknown class"
        raise ValueError(f"--trained {folder}: holds a {held} ({exc}); expected a Wan transformer (final/, "
                         f"pgdpo export) or LoRA weights ({LORA_FILE})") from None
    if spec.pipeline_class is None:
        raise ValueError(f"--trained {folder}: a {spec.family} model; pgdpo eval drives no pipeline for it")
    return "full", folder


def load_model_pipeline(which: str, pipeline: str, trained: tuple[str, Path] | None, dtype, device):
    """The base pipeline, or the same with the trained transformer (or LoRA) in it."""
    from pgdpo.train.data.generate import load_pipeline

    if which == "base" or trained is None:
        return load_pipeline(pipeline, dtype=dtype, device=device)
    kind, folder = trained
    if kind == "full":
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel.from_pretrained(str(folder), local_files_only=True,
                                                            torch_dtype=dtype)
        return load_pipeline(pipeline, dtype=dtype, device=device, transformer=transformer)
    pipe = load_pipeline(pipeline, dtype=dtype, device=device)
    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, local_files_only=True)
    return pipe


# ---------------------------------------------------------------------------------------------- table


def summarise(records: list[dict], metrics: list[str], seeds: list[int]) -> dict:
    """Per metric: means of base and trained, the per-seed mean difference (trained - base over the
    prompts), its mean and sample standard deviation over seeds, and the win rate over prompt x seed."""
    by_key = {(r["model"], r["prompt_id"], r["seed"]): r for r in records}
    keys = sorted({(r["prompt_id"], r["seed"]) for r in records})
    table = {}
    for metric in metrics:
        pairs = [(by_key[("base", *k)][metric], by_key[("trained", *k)][metric]) for k in keys]
        per_seed = []
        for seed in seeds:
            diffs = [by_key[("trained", p, s)][metric] - by_key[("base", p, s)][metric] for p, s in keys
                     if s == seed]
            per_seed.append(sum(diffs) / len(diffs))
        table[metric] = {
            "base": sum(b for b, _ in pairs) / len(pairs),
            "trained": sum(t for _, t in pairs) / len(pairs),
            "difference": sum(per_seed) / len(per_seed),
            "difference_std_over_seeds": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            "per_seed_difference": per_seed,
            "trained_wins": sum(t > b for b, t in pairs) / len(pairs),
            "n": len(pairs),
        }
    return table


def markdown(table: dict, settings: dict) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4g}"

    s = settings
    lines = [f"# pgdpo eval: base vs trained ({s['num_prompts']} prompts x {len(s['seeds'])} seeds "
             f"{s['seeds']})", "",
             f"base: `{s['pipeline']}`; trained: `{s['trained']}` ({s['trained_kind']}); {s['frames']} "
             f"frames {s['height']}x{s['width']}, {s['steps']} steps, guidance {s['guidance']}", "",
             "| metric | base | trained | trained - base | std over seeds | trained wins |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, row in table.items():
        lines.append(f"| {name} | {fmt(row['base'])} | {fmt(row['trained'])} | {fmt(row['difference'])} | "
                     f"{fmt(row['difference_std_over_seeds'])} | {row['trained_wins']:.0%} |")
    lines += ["", "trained - base: the mean over seeds of the per-seed mean difference over the prompts "
              "(same prompt, same seed); std over seeds: its sample standard deviation; trained wins: the "
              "share of prompt x seed where the trained video scores higher. temporal_flickering: 1 - mean "
              "absolute frame-to-frame pixel change (higher = steadier)."]
    return "\n".join(lines) + "\n"


def contact_sheet(path: str, videos: dict, prompts: list[dict], seed: int) -> str:
    """Per prompt (first seed) a row: base frames, trained frames (``videos``: the frames to show)."""
    from pgdpo.train.validation import write_grid

    rows = []
    for item in prompts:
        row = []
        for model in MODELS:
            row.append(videos[(model, item["prompt_id"], seed)])
        rows.append(row)
    height = rows[0][0].shape[1]
    scale = max(1, 96 // max(1, height))
    return write_grid(path, rows, [f"base (seed {seed})", f"trained (seed {seed})"],
                      [p["prompt"] for p in prompts], scale)


# ---------------------------------------------------------------------------------------------- run


def evaluate(*, pipeline: str, trained: str, prompts: str, out: str, seeds: list[int],
             rewards: list[str] = (), metrics: list[str] = (), clip: str | None = None, frames: int = 81,
             height: int = 480, width: int = 832, steps: int = 50, guidance: float = 5.0,
             negative_prompt: str | None = None, text_len: int = 512, video_format: str = "png",
             dtype: torch.dtype = torch.bfloat16, device: str = "auto", batch_size: int = 8,
             sheet_prompts: int = 8, progress: bool = True) -> dict | None:
    """``pgdpo eval`` (module docstring). Returns the table on rank 0 (None on the others)."""
    from pgdpo.train.data import generate as gen
    from pgdpo.train.data.score import call_hook, load_hooks, video_for_hooks

    if sheet_prompts < 1 or batch_size < 1:
        raise ValueError(f"--sheet-prompts and --batch-size must be >= 1, got {sheet_prompts}, {batch_size}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {seeds}")
    items = gen.read_prompts(prompts)
    _, task = gen.pipeline_task(pipeline)
    if task == "i2v" and any("image" not in p for p in items):
        raise ValueError(f"{prompts}: the image-to-video pipeline needs an 'image' for every prompt")
    trained_model = resolve_trained(trained)
    hooks = load_hooks(list(rewards), "--reward") + load_hooks(list(metrics), "--metric")
    names = [n for n, _ in hooks]
    for builtin in (FLICKER, CLIP):
        if builtin in names:
            raise ValueError(f"a hook is named {builtin!r}, the name of a built-in metric; rename it "
                             "(NAME=module:function)")
    if len(set(names)) != len(names):
        raise ValueError(f"two hooks have the same name in {names}; name them: NAME=module:function")
    out = Path(out)
    settings = {"pipeline": str(Path(pipeline).resolve()),
                "pipeline_weights": gen.weights_fingerprint(pipeline),
                "trained": str(trained_model[1].resolve()),
                "trained_weights": gen.weights_fingerprint(trained_model[1]),
                "trained_kind": trained_model[0], "task": task, "seeds": list(seeds), "frames": frames,
                "height": height, "width": width, "steps": steps, "guidance": guidance,
                "negative_prompt": negative_prompt, "text_len": text_len, "video_format": video_format,
                "dtype": str(dtype).removeprefix("torch."), "prompts_sha256": gen._digest(items),
                "num_prompts": len(items)}
    def video_name(index: int, seed: int) -> str:
        return f"{gen.VIDEOS}/{index:05d}_s{seed}" + (".npy" if video_format == "npy" else "")

    def model_settings(model: str) -> dict:  # the base videos do not depend on the trained model
        drop = ("trained", "trained_kind", "trained_weights") if model == "base" else ()
        return {**{k: v for k, v in settings.items() if k not in drop}, "model": model}

    ranks = gen.Ranks()
    finished = False
    try:
        for model in MODELS:
            gen.check_settings(out / model, model_settings(model))
        ranks.barrier()
        jobs = {model: [] for model in MODELS}
        for item in items:
            for seed in seeds:
                for model in MODELS:
                    job = {"prompt_id": item["prompt_id"], "prompt": item["prompt"], "seed": seed,
                           "video": video_name(item["index"], seed)}
                    for key in ("image", "negative_prompt"):
                        if key in item:
                            job[key] = item[key]
                    if item["index"] % ranks.world_size == ranks.rank:
                        jobs[model].append(job)
        for model in MODELS:
            folder = out / model
            if ranks.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / gen.SETTINGS).write_text(json.dumps(model_settings(model), indent=2) + "\n")
            ranks.barrier()
            if any(not (folder / job["video"]).exists() for job in jobs[model]):
                pipe = load_model_pipeline(model, pipeline, trained_model, dtype, ranks.device(device))
                gen.run_jobs(pipe, jobs[model], folder, settings, progress=progress and ranks.is_main,
                             desc=f"{model}: generating")
                del pipe  # one pipeline in memory at a time
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        ranks.barrier()
        if not ranks.is_main:
            finished = True
            return None

        # ---- rank 0: score every video, write the table and the contact sheet
        from tqdm.auto import tqdm

        scorer = ClipScorer(clip, ranks.device(device)) if clip else None
        metric_names = names + [FLICKER] + ([CLIP] if scorer else [])
        records, videos = [], {}
        all_jobs = [(model, item, seed) for model in MODELS for item in items for seed in seeds]
        bar = tqdm(total=len(all_jobs), desc="scoring", unit="video", disable=not progress)
        for start in range(0, len(all_jobs), batch_size):
            chunk = all_jobs[start:start + batch_size]
            batch = []
            for model, item, seed in chunk:
                rel = video_name(item["index"], seed)
                path = out / model / rel
                video = video_for_hooks(path)
                if seed == seeds[0] and item["index"] < sheet_prompts:  # frames only: videos are large
                    videos[(model, item["prompt_id"], seed)] = video[spaced_frames(video.shape[0])]
                record = {"model": model, "prompt_id": item["prompt_id"], "prompt": item["prompt"],
                          "seed": seed, "video": f"{model}/{rel}", FLICKER: temporal_flickering(video)}
                if scorer is not None:
                    record[CLIP] = scorer(video, item["prompt"])
                batch.append((record, video))
            # hooks get same-size videos in one call (all the videos of an eval have one size)
            stacked = torch.stack([v for _, v in batch])
            prompts_ = [r["prompt"] for r, _ in batch]
            where = [r["video"] for r, _ in batch]
            for name, fn in hooks:
                for (record, _), value in zip(batch, call_hook(name, fn, stacked, prompts_, where)):
                    record[name] = value
            records += [r for r, _ in batch]
            bar.update(len(batch))
        bar.close()
        table = summarise(records, metric_names, list(seeds))
        result = {"settings": settings, "metrics": table, "videos": records}
        _write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
        _write_text(out / "eval.md", markdown(table, settings))
        contact_sheet(str(out / "contact_sheet.png"), videos, items[:sheet_prompts], seeds[0])
        finished = True
        return table
    finally:
        ranks.close(synchronize=finished)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- command


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


DESCRIPTION = """\
Compare the base pipeline with a trained model on held-out prompts with fixed seeds: reward hooks,
temporal flickering, CLIP score (--clip), your own metric hooks; a markdown + JSON table of base vs
trained with the difference and its spread over seeds, and a contact sheet PNG.

  pgdpo eval --pipeline Wan2.1-T2V-1.3B-Diffusers --trained runs/wan13b --prompts heldout.txt \\
      --out runs/wan13b/eval --reward my_rewards:videoalign --clip clip-vit-large-patch14
  torchrun --nproc_per_node 8 -m pgdpo eval ...      (prompts split over the GPUs)

--trained: a run's output folder (its final/), a final/ or `pgdpo export` folder, or LoRA weights.
A hook is module:function (NAME=module:function to name it), called as fn(videos [N, F, H, W, 3] float
in [0, 1], prompts) -> N numbers, as validation.reward. Videos are kept in OUT/base, OUT/trained and
reused by a rerun with the same settings.
"""


def main(argv: list[str] | None = None) -> int:
    from pgdpo.train.data.generate import VIDEO_FORMATS, default_dtype

    p = argparse.ArgumentParser(prog="pgdpo eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, metavar="DIR", help="the base model: a local diffusers Wan "
                   "pipeline folder")
    p.add_argument("--trained", required=True, metavar="DIR", help="run folder, final/ or exported folder, "
                   "or LoRA weights folder")
    p.add_argument("--prompts", required=True, metavar="FILE", help="held-out prompts, .txt or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--reward", action="append", default=[], metavar="[NAME=]MODULE:FUNCTION")
    p.add_argument("--metric", action="append", default=[], metavar="[NAME=]MODULE:FUNCTION",
                   help="more per-video metrics, same signature as --reward")
    p.add_argument("--clip", metavar="DIR", help="local CLIPModel folder (with tokenizer and image "
                   "processor): adds clip_score")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--negative-prompt", metavar="TEXT")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--video-format", choices=VIDEO_FORMATS, default="png")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="videos per hook call (default 8)")
    p.add_argument("--sheet-prompts", type=int, default=8, metavar="N",
                   help="prompts (rows) in contact_sheet.png, the first N (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from pgdpo.train.data.format import DataError

    try:
        table = evaluate(pipeline=args.pipeline, trained=args.trained, prompts=args.prompts, out=args.out,
                         seeds=args.seeds, rewards=args.reward, metrics=args.metric, clip=args.clip,
                         frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                         guidance=args.guidance, negative_prompt=args.negative_prompt,
                         text_len=args.text_len, video_format=args.video_format,
                         dtype=default_dtype(args.dtype, args.device), device=args.device,
                         batch_size=args.batch_size, sheet_prompts=args.sheet_prompts,
                         progress=args.progress)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"pgdpo eval: error: {exc}", file=sys.stderr)
        return 1
    if table is not None:
        print((Path(args.out) / "eval.md").read_text(), end="")
        print(f"pgdpo eval: wrote {args.out}/eval.md, eval.json, contact_sheet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
