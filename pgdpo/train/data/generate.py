"""Sample K candidate videos per prompt from a local diffusers Wan pipeline (``pgdpo data generate``).

The first step of the paper's data pipeline (sec. 4.1): the base model generates several videos per
prompt, a reward model scores them (``pgdpo data score``), and the best and the worst become a pair
(``pgdpo data pairs``). Written into ``--out``:

- ``videos/NNNNN_KK.npy`` (uint8 ``[F, H, W, 3]``) or ``videos/NNNNN_KK/`` (a folder of PNG frames),
  the formats :mod:`pgdpo.train.data.media` reads, ``NNNNN`` the prompt's line index and ``KK`` the
  candidate; each is written to a temporary name and renamed when complete;
- ``generations.jsonl``: one line per video, in prompt order::

      {"prompt_id": "p00000", "prompt": "...", "video": "videos/00000_00.npy", "seed": 1000,
       "candidate": 0, "image": "/abs/img.png" (i2v)}

- ``generate.json``: the settings. Video ``(i, k)`` is sampled from ``torch.Generator("cpu")`` seeded
  ``seed + i * K + k`` (one video per pipeline call), so a video depends on its prompt and seed only:
  not on the process count, the order, or an interruption.

Under ``torchrun`` prompt ``i`` goes to rank ``i % world_size``, each rank with its own pipeline on its
own GPU (``cuda:LOCAL_RANK``); rank 0 writes the manifest when all are done (a gloo barrier). Resume: a
video whose file exists is not generated again; a run with other settings in the same folder is refused.

Prompts: a ``.txt`` file (one prompt per non-blank line) or ``.jsonl`` (``{"prompt": ..., "prompt_id"?,
"image"? (i2v, relative to the prompts file), "negative_prompt"?}`` per line).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import die_with_launcher
from .format import iter_jsonl

MANIFEST = "generations.jsonl"
SETTINGS = "generate.json"
VIDEOS = "videos"
VIDEO_FORMATS = ("png", "npy")
#: diffusers pipeline class -> (task, the parts it needs: subfolder -> file that must be in it)
PIPELINES = {
    "WanPipeline": ("t2v", {"transformer": "config.json", "vae": "config.json",
                            "text_encoder": "config.json", "tokenizer": None,
                            "scheduler": "scheduler_config.json"}),
    "WanImageToVideoPipeline": ("i2v", {"transformer": "config.json", "vae": "config.json",
                                        "text_encoder": "config.json", "tokenizer": None,
                                        "scheduler": "scheduler_config.json",
                                        "image_encoder": "config.json",
                                        "image_processor": "preprocessor_config.json"}),
}


# ---------------------------------------------------------------------------------------------- prompts


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """``[{"index", "prompt_id", "prompt", "image"?, "negative_prompt"?}]`` from a .txt or .jsonl file.

    A bad line (not JSON, no ``prompt`` string, a repeated ``prompt_id``, a missing image) is a
    ``ValueError`` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".jsonl":
        for _, where, data in iter_jsonl(path, ValueError):
            if not isinstance(data, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
            rows.append((where, data))
    else:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append((f"{path}:{number}", {"prompt": line.strip()}))
    prompts, seen = [], {}
    for index, (where, data) in enumerate(rows):
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
        prompt_id = str(data.get("prompt_id", f"p{index:05d}"))
        if prompt_id in seen:
            raise ValueError(f"{where}: prompt_id {prompt_id!r} already used at {seen[prompt_id]}")
        seen[prompt_id] = where
        record = {"index": index, "prompt_id": prompt_id, "prompt": prompt}
        if data.get("image") is not None:
            image = Path(str(data["image"]))
            image = image if image.is_absolute() else path.resolve().parent / image
            if not image.is_file():
                raise ValueError(f"{where}: image {str(image)!r} not found")
            record["image"] = str(image)
        if data.get("negative_prompt") is not None:
            if not isinstance(data["negative_prompt"], str):
                raise ValueError(f"{where}: 'negative_prompt' must be a string")
            record["negative_prompt"] = data["negative_prompt"]
        prompts.append(record)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------------------------------------- pipeline


def pipeline_task(folder: str | os.PathLike) -> tuple[str, str]:
    """``(pipeline class, task)`` of a diffusers pipeline folder, after checking every part it needs is
    there (an error naming the folder and the missing part otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--pipeline {str(folder)!r}: not a local folder (only local folders are "
                                "loaded; nothing is fetched from a hub)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"--pipeline {str(folder)!r}: no model_index.json (expected a diffusers "
                                "pipeline folder written by save_pretrained)")
    try:
        spec = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{index}: not valid JSON ({exc})") from None
    name = spec.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{index}: pipeline class {name!r} is not supported; expected one of "
                         f"{sorted(PIPELINES)}")
    task, parts = PIPELINES[name]
    for part, required_file in parts.items():
        entry = spec.get(part)
        if not entry or entry[0] is None:
            raise ValueError(f"{index}: the {name} has no {part!r} (every part is needed: "
                             f"{', '.join(parts)})")
        sub = folder / part
        if not sub.is_dir():
            raise FileNotFoundError(f"--pipeline {str(folder)!r}: missing part {part}/ (listed in "
                                    "model_index.json)")
        if required_file and not (sub / required_file).is_file():
            raise FileNotFoundError(f"--pipeline {str(folder)!r}: part {part}/ has no {required_file}")
    if task == "i2v":
        if importlib.util.find_spec("ftfy") is None:  # diffusers' Wan I2V prompt cleaning calls it unguarded
            raise ValueError(f"--pipeline {str(folder)!r}: diffusers' {name} needs the ftfy package to clean "
                             "prompts (pip install ftfy; it is in pgdpo's train extra)")
    return name, task


def load_pipeline(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                  transformer: torch.nn.Module | None = None):
    """The diffusers Wan pipeline of a local folder (checked by :func:`pipeline_task`), its VAE in fp32 (as
    diffusers' Wan examples load it), the rest in ``dtype``; ``transformer`` replaces the folder's."""
    import diffusers

    name, _ = pipeline_task(folder)
    vae = diffusers.AutoencoderKLWan.from_pretrained(str(Path(folder) / "vae"), local_files_only=True,
                                                     torch_dtype=torch.float32)
    extra = {"transformer": transformer} if transformer is not None else {}
    pipe = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                     vae=vae, **extra)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- videos


def video_path(prompt_index: int, candidate: int, video_format: str) -> str:
    """The manifest's (relative) path of video ``candidate`` of prompt ``prompt_index``."""
    name = f"{VIDEOS}/{prompt_index:05d}_{candidate:02d}"
    return name + ".npy" if video_format == "npy" else name


def write_video(path: str | os.PathLike, frames: np.ndarray) -> None:
    """uint8 ``[F, H, W, 3]`` to ``path`` (``.npy``, else a folder of PNG frames), atomically: written
    under a temporary name and renamed, so an existing ``path`` is always a complete video."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)
        os.replace(tmp, path)
        return
    from PIL import Image

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / f"{i:05d}.png")
    os.rename(tmp, path)


def to_uint8(frames) -> np.ndarray:
    """A pipeline's ``output_type="np"`` video (float ``[F, H, W, 3]`` in [0, 1]) as uint8."""
    return (np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def sample_video(pipe, job: dict, settings: dict) -> np.ndarray:
    """One video (uint8 ``[F, H, W, 3]``) of ``job`` (prompt, seed, image?, negative_prompt?)."""
    kwargs = {}
    if job.get("image") is not None:
        from PIL import Image

        with Image.open(job["image"]) as image:
            kwargs["image"] = image.convert("RGB")
    negative = job.get("negative_prompt", settings.get("negative_prompt"))
    out = pipe(prompt=job["prompt"], negative_prompt=negative, height=settings["height"],
               width=settings["width"], num_frames=settings["frames"], num_inference_steps=settings["steps"],
               guidance_scale=settings["guidance"], max_sequence_length=settings["text_len"],
               generator=torch.Generator("cpu").manual_seed(job["seed"]), output_type="np", **kwargs)
    return to_uint8(out.frames[0])


def run_jobs(pipe, jobs: list[dict], out: str | os.PathLike, settings: dict, *, progress: bool = True,
             desc: str = "generating") -> tuple[int, int]:
    """Generate every job whose ``video`` (relative to ``out``) does not exist yet. Returns
    ``(generated, skipped)``."""
    from tqdm.auto import tqdm

    out = Path(out)
    todo = [job for job in jobs if not (out / job["video"]).exists()]
    (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    for job in tqdm(todo, desc=desc, unit="video", disable=not progress):
        write_video(out / job["video"], sample_video(pipe, job, settings))
    return len(todo), len(jobs) - len(todo)


# ---------------------------------------------------------------------------------------------- ranks


class Ranks:
    """This process's place under torchrun (RANK / WORLD_SIZE / LOCAL_RANK); a gloo group for barriers
    only (the pipelines never talk to each other)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1:
            die_with_launcher()
            if not dist.is_initialized():
                # Barriers only, between phases whose length differs by rank (a rank's share of the videos,
                # rank 0 scoring them all): far longer waits than the default 30-minute timeout allows.
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> torch.device:
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        return torch.device(device)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, synchronize: bool = False) -> None:
        """Destroy the group; ``synchronize`` (after a normal finish): first wait for every rank, so that no
        rank tears down its gloo connections while rank 0 still works (that aborts a process at exit)."""
        if self.world_size > 1:
            if dist.is_initialized():
                if synchronize:
                    dist.barrier()
                dist.destroy_process_group()


def _digest(prompts: list[dict]) -> str:
    text = json.dumps([{k: v for k, v in p.items() if k != "index"} for p in prompts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(folder: str | Path) -> str:
    """A digest of the weight files under ``folder`` (relative path, size, modification time): a model
    retrained or re-exported into the same folder gets another one, so finished videos of the old weights
    are not reused for the new (hashing the contents of a 14B model would take minutes)."""
    folder = Path(folder)
    weights = (".safetensors", ".bin", ".pt")
    files = sorted(p for p in folder.rglob("*") if p.suffix in weights and p.is_file())
    listing = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def check_settings(out: Path, settings: dict) -> bool:
    """Refuse to resume into ``out`` if its ``generate.json`` holds other settings; True if it exists."""
    path = out / SETTINGS
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); remove it or use --overwrite") from None
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{out} holds videos generated with other settings ({diff}); use another --out, "
                         "or --overwrite to start again")
    return True


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Records as JSONL, atomically (a temporary file renamed into place)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def generate(*, pipeline: str | os.PathLike, prompts: str | os.PathLike, out: str | os.PathLike,
             per_prompt: int = 4, frames: int = 81, height: int = 480, width: int = 832, steps: int = 50,
             guidance: float = 5.0, seed: int = 0, negative_prompt: str | None = None, text_len: int = 512,
             video_format: str = "png", dtype: torch.dtype = torch.bfloat16, device: str = "auto",
             overwrite: bool = False, progress: bool = True) -> dict:
    """``pgdpo data generate``: see the module docstring. Returns a summary (this rank's counts; the
    manifest path on rank 0)."""
    if per_prompt < 1:
        raise ValueError(f"--per-prompt must be >= 1, got {per_prompt}")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"--video-format must be one of {VIDEO_FORMATS}, got {video_format!r}")
    for name, value in (("frames", frames), ("height", height), ("width", width), ("steps", steps),
                        ("text-len", text_len)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    items = read_prompts(prompts)
    _, task = pipeline_task(pipeline)
    if task == "i2v":
        missing = [p for p in items if "image" not in p]
        if missing:
            raise ValueError(f"{prompts}: the image-to-video pipeline needs an 'image' for every prompt; "
                             f"prompt {missing[0]['prompt_id']!r} has none (use a .jsonl prompts file)")
    out = Path(out)
    settings = {"pipeline": str(Path(pipeline).resolve()), "pipeline_weights": weights_fingerprint(pipeline),
                "task": task, "per_prompt": per_prompt,
                "frames": frames, "height": height, "width": width, "steps": steps, "guidance": guidance,
                "seed": seed, "negative_prompt": negative_prompt, "text_len": text_len,
                "video_format": video_format, "dtype": str(dtype).removeprefix("torch."),
                "prompts_sha256": _digest(items), "num_prompts": len(items)}
    ranks = Ranks()
    try:
        if ranks.is_main and overwrite:
            for name in (VIDEOS, MANIFEST, SETTINGS):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        ranks.barrier()
        check_settings(out, settings)  # every rank: they all stop together on a mismatch
        ranks.barrier()
        if ranks.is_main:
            (out / VIDEOS).mkdir(parents=True, exist_ok=True)
            (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        jobs = []
        for item in items:
            for k in range(per_prompt):
                job = {"prompt_id": item["prompt_id"], "prompt": item["prompt"],
                       "video": video_path(item["index"], k, video_format),
                       "seed": seed + item["index"] * per_prompt + k, "candidate": k}
                for key in ("image", "negative_prompt"):
                    if key in item:
                        job[key] = item[key]
                jobs.append((item["index"], job))
        mine = [job for index, job in jobs if index % ranks.world_size == ranks.rank]
        generated = skipped = 0
        if any(not (out / job["video"]).exists() for job in mine):
            pipe = load_pipeline(pipeline, dtype=dtype, device=ranks.device(device))
            generated, skipped = run_jobs(pipe, mine, out, settings, progress=progress and ranks.is_main,
                                          desc=f"generating (rank {ranks.rank}/{ranks.world_size})"
                                          if ranks.world_size > 1 else "generating")
        else:
            skipped = len(mine)
        ranks.barrier()
        summary = {"generated": generated, "skipped": skipped, "videos": len(jobs), "rank": ranks.rank,
                   "world_size": ranks.world_size,
                   "prompts": sorted({i for i, _ in jobs if i % ranks.world_size == ranks.rank})}
        if ranks.is_main:
            records = [job for _, job in jobs]
            absent = [r["video"] for r in records if not (out / r["video"]).exists()]
            if absent:
                raise ValueError(f"{out}: {len(absent)} video(s) missing after generation, e.g. {absent[0]}")
            write_jsonl(out / MANIFEST, records)
            summary["manifest"] = str(out / MANIFEST)
        ranks.barrier()
        return summary
    finally:
        ranks.close()


# ---------------------------------------------------------------------------------------------- command


def add_parser(sub, formatter_class) -> None:
    """``pgdpo data generate``'s options (registered by :mod:`pgdpo.train.data.cli`)."""
    p = sub.add_parser("generate", help="K videos per prompt from a local Wan pipeline (candidates to score)",
                       formatter_class=formatter_class,
                       description="Sample --per-prompt videos per prompt from a local diffusers WanPipeline "
                       "(t2v) or WanImageToVideoPipeline (i2v) folder. Video k of prompt i uses seed "
                       "--seed + i*K + k (recorded). Under torchrun the prompts are split over the ranks, "
                       "one pipeline per GPU. A rerun resumes: finished videos are kept.",
                       epilog=f"written: OUT/{VIDEOS}/NNNNN_KK (png frames folder or .npy), OUT/{MANIFEST} "
                       '(one line per video: {"prompt_id", "prompt", "video", "seed", "candidate", '
                       f'"image"?}}), OUT/{SETTINGS}.\n'
                       "prompts: .txt (one per line) or .jsonl ({\"prompt\", \"prompt_id\"?, \"image\"? "
                       "(i2v), \"negative_prompt\"?}).\n"
                       "next: pgdpo data score --in OUT/generations.jsonl --out OUT/scored.jsonl "
                       "--reward my_rewards:videoalign")
    p.add_argument("--pipeline", required=True, metavar="DIR", help="local diffusers Wan pipeline folder")
    p.add_argument("--prompts", required=True, metavar="FILE", help="prompts, .txt or .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it exists)")
    p.add_argument("--per-prompt", type=int, default=4, metavar="K", help="videos per prompt (default 4, "
                   "the paper's)")
    p.add_argument("--frames", type=int, default=81, help="frames per video, 4k+1 (default 81)")
    p.add_argument("--height", type=int, default=480, help="default 480")
    p.add_argument("--width", type=int, default=832, help="default 832")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--seed", type=int, default=0, help="base seed (video k of prompt i: seed + i*K + k)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="for every prompt without its own")
    p.add_argument("--text-len", type=int, default=512, help="prompt tokens (Wan: 512)")
    p.add_argument("--video-format", choices=VIDEO_FORMATS, default="png",
                   help="png: a folder of lossless frames per video (default, compact); npy: one uint8 array")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="transformer and text encoder dtype (default bf16 on GPU, fp32 on CPU; VAE fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if there is a GPU), cpu, cuda:N")
    p.add_argument("--overwrite", action="store_true", help="delete the folder's videos and start again")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_dtype(name: str | None, device: str) -> torch.dtype:
    """``--dtype``, or bf16 where the pipeline runs on a GPU and fp32 on the CPU."""
    if name is not None:
        return DTYPES[name]
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if on_gpu else torch.float32


def run(args) -> int:
    summary = generate(pipeline=args.pipeline, prompts=args.prompts, out=args.out, per_prompt=args.per_prompt,
                       frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
                       text_len=args.text_len, video_format=args.video_format,
                       dtype=default_dtype(args.dtype, args.device), device=args.device,
                       overwrite=args.overwrite, progress=args.progress)
    if summary["world_size"] > 1:
        print(f"pgdpo data generate: rank {summary['rank']}/{summary['world_size']}: prompts "
              f"{summary['prompts']}, {summary['generated']} video(s) generated, {summary['skipped']} "
              "already there", flush=True)
    if "manifest" in summary:
        print(f"pgdpo data generate: {summary['videos']} videos ({summary['generated']} generated here, "
              f"{summary['skipped']} already there); wrote {summary['manifest']}")
    return 0
