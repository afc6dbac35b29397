"""``pgdpo data``: make preference datasets.

    pgdpo data generate --pipeline WAN_DIR --prompts prompts.txt --per-prompt 4 --out GEN
    pgdpo data score  --in GEN/generations.jsonl --out scored.jsonl --reward module:function
    pgdpo data pairs  --scores gens.jsonl --out pairs.jsonl [--min-margin 0.1] [--score-key scores.Overall]
    pgdpo data encode --pairs pairs.jsonl --pipeline WAN_DIR --out DATASET [--task i2v] [--frames 81 ...]
    pgdpo data synth  --out DATASET --pairs 64 --latent-shape 16,21,60,104 --text-len 512 --text-dim 4096
    pgdpo data check  DATASET [--deep]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import generate, score
from .encode import encode_dataset, load_encoders
from .format import DTYPES, DataError, dtype_name, validate_dataset
from .pairs import make_pairs, read_scores, write_pairs
from .synth import KINDS, synth_dataset

_EPILOG = """\
pipeline (docs/pipeline.md):
  1. pgdpo data generate : K videos per prompt from the base model (local diffusers Wan pipeline)
  2. pgdpo data score    : reward hooks (e.g. VideoAlign) -> scored generations (JSONL)
  3. pgdpo data pairs    : scored generations (JSONL) -> best-vs-worst pairs (JSONL)
  4. pgdpo data encode   : pairs + videos -> latent dataset (VAE latents, text embeddings; shards)
  5. pgdpo train         : reads the dataset folder
  6. pgdpo eval          : base vs trained on held-out prompts (rewards, flickering, CLIP score)
`pgdpo data synth` makes a synthetic dataset in the same format; `pgdpo data check` validates one.
Run `pgdpo data COMMAND --help` for each command's options and file formats.
"""


def _dtype(name: str):
    try:
        return DTYPES[dtype_name(name)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="pgdpo data",
                                     description="Preference datasets for PG-DPO training.",
                                     epilog=_EPILOG, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_parser(sub, raw)
    score.add_parser(sub, raw)

    p = sub.add_parser("pairs", help="scored generations -> best-vs-worst preference pairs",
                       formatter_class=raw,
                       description="Turn a scored-generations JSONL file into chosen/rejected pairs: per "
                       "prompt the highest- vs the lowest-scoring generation (paper sec. 4.1).",
                       epilog='input line:  {"prompt_id": "p0", "prompt": "...", "video": "videos/p0_1.npy", '
                       '"score": 0.71, "image": "img/p0.png" (optional, i2v)}\n'
                       'output line: {"prompt_id": "p0", "prompt": "...", '
                       '"chosen": {"video": ..., "score": ...}, '
                       '"rejected": {...}, "margin": 0.59, "num_generations": 4}\n'
                       "Prompts with one generation, all-equal scores (ties) or margin < --min-margin are "
                       "dropped; the counts are printed.")
    p.add_argument("--scores", required=True, metavar="FILE.jsonl",
                   help="scored generations, one JSON per line")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the pairs")
    p.add_argument("--min-margin", type=float, default=0.0, metavar="X",
                   help="drop pairs whose score margin (best - worst) is below X "
                   "(default 0: only ties dropped)")
    p.add_argument("--score-key", default="score", metavar="KEY",
                   help="dotted key of the score in each line (default 'score'; e.g. 'scores.Overall')")

    p = sub.add_parser("encode", help="videos + prompts -> latent dataset (VAE, text encoder)",
                       formatter_class=raw,
                       description="Encode the pairs of a `pgdpo data pairs` file with a local diffusers VAE "
                       "(AutoencoderKLWan, or AutoencoderKL per frame) and a local text encoder + tokenizer "
                       "(UMT5/T5/CLIP), writing a dataset folder. Nothing is downloaded.",
                       epilog="videos: .npy or .safetensors arrays [frames, height, width, 3] (uint8 0..255 "
                       "or float 0..1), or a folder of frame images (name order). Decode mp4 first, e.g. "
                       "`ffmpeg -i v.mp4 v/%05d.png`. Wan needs 4k+1 frames and height/width multiples of "
                       "16.\ni2v: the image is the pair's 'image' file if present, else the chosen video's "
                       "first frame; needs a CLIPVisionModel (--image-encoder) and its CLIPImageProcessor.")
    p.add_argument("--pairs", required=True, metavar="FILE.jsonl", help="output of `pgdpo data pairs`")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to create")
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v")
    p.add_argument("--videos", metavar="DIR", help="root of relative video/image paths (default: the pairs "
                   "file's folder)")
    p.add_argument("--pipeline", metavar="DIR", help="a local diffusers pipeline folder (vae/, "
                   "text_encoder/, tokenizer/, image_encoder/, image_processor/): defaults for the "
                   "folders below")
    p.add_argument("--vae", metavar="DIR", help="VAE folder (save_pretrained)")
    p.add_argument("--text-encoder", metavar="DIR", help="text encoder folder (UMT5EncoderModel for Wan)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the text encoder folder)")
    p.add_argument("--image-encoder", metavar="DIR", help="i2v: CLIPVisionModel folder")
    p.add_argument("--image-processor", metavar="DIR",
                   help="i2v: CLIPImageProcessor folder (default: the image encoder's)")
    p.add_argument("--text-len", type=int, default=512, help="tokens per prompt, padded/truncated (Wan: 512)")
    p.add_argument("--frames", type=int, help="keep the first N frames of every video (4k+1 for Wan)")
    p.add_argument("--height", type=int, help="resize videos to this height (with --width)")
    p.add_argument("--width", type=int, help="resize videos to this width (with --height)")
    p.add_argument("--dtype", type=_dtype, default="bfloat16", help="storage dtype (default bfloat16)")
    p.add_argument("--compute-dtype", type=_dtype, default="float32", help="dtype the encoders run in")
    p.add_argument("--device", default="cpu", help="device the encoders run on (cpu, cuda, cuda:1, ...)")
    p.add_argument("--shard-size", type=int, default=64, help="pairs per shard file (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset files in a non-empty --out")

    p = sub.add_parser("synth", help="synthetic dataset (seeded random latents)",
                       formatter_class=raw,
                       description="Write a synthetic dataset: chosen ~ N(0,1), rejected = sqrt(1-d^2) "
                       "chosen + d noise (d = --difference), random zero-padded text embeddings; i2v adds "
                       "the Wan mask + first-frame condition and random CLIP tokens. Seeded, pair by pair.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--pairs", type=int, required=True, metavar="N")
    p.add_argument("--task", choices=("t2v", "i2v"), default="t2v")
    p.add_argument("--latent-shape", type=_ints, default=[16, 3, 8, 8], metavar="C,F,H,W",
                   help="per-video latent shape (Wan 480p x 81 frames: 16,21,60,104; default 16,3,8,8)")
    p.add_argument("--text-len", type=int, default=16, metavar="L", help="text tokens (Wan: 512)")
    p.add_argument("--text-dim", type=int, default=32, metavar="D", help="text width (Wan: 4096)")
    p.add_argument("--image-len", type=int, default=257, help="i2v: CLIP tokens (Wan: 257)")
    p.add_argument("--image-dim", type=int, default=1280, help="i2v: CLIP width (Wan: 1280)")
    p.add_argument("--difference", type=float, default=0.5, metavar="D",
                   help="chosen/rejected difference in [0, 1] (0: identical; score margin = D)")
    p.add_argument("--kind", choices=KINDS, default="random",
                   help="random (the above) or motion: an orange blob moving the prompt's way in chosen, "
                   "jittering in rejected (the demo's learnable preference; --difference is ignored); "
                   "motion-mix: the same pairs with chosen and rejected swapped in half of them (the SFT "
                   "data of the demo's base model: its first clips move or jitter)")
    p.add_argument("--first-index", type=int, default=0, metavar="I",
                   help="write pairs I .. I+N-1 of the seeded sequence (a held-out set: I past the "
                   "training pairs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", type=_dtype, default="float32", help="storage dtype (default float32)")
    p.add_argument("--shard-size", type=int, default=64, help="pairs per shard file (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset files in a non-empty --out")

    p = sub.add_parser("check", help="validate a dataset folder (meta, index, shard checksums and headers)",
                       description="Check dataset.json, every index.jsonl line, every shard's checksum "
                       "(recorded in dataset.json when it was written) and header; --deep also reads every "
                       "tensor and checks it is finite. Exit 1 naming the bad file (and pair).")
    p.add_argument("dataset", metavar="DIR")
    p.add_argument("--deep", action="store_true", help="read every tensor too")
    p.add_argument("--json", action="store_true", help="print the dataset meta as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"pgdpo data {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.command in ("generate", "score"):
        return {"generate": generate, "score": score}[args.command].run(args)
    if args.command == "pairs":
        pairs, report = make_pairs(read_scores(args.scores, args.score_key), args.min_margin)
        write_pairs(pairs, args.out, paths_relative_to=os.path.dirname(os.path.abspath(args.scores)))
        print(f"{report.summary()}; wrote {args.out}")
        return 0
    if args.command == "encode":
        encoders = load_encoders(vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer,
                                 image_encoder=args.image_encoder, image_processor=args.image_processor,
                                 pipeline=args.pipeline, task=args.task, dtype=args.compute_dtype,
                                 device=args.device)
        meta = encode_dataset(args.pairs, args.out, encoders, task=args.task, videos_root=args.videos,
                              text_len=args.text_len, frames=args.frames, height=args.height,
                              width=args.width, dtype=args.dtype, shard_size=args.shard_size,
                              overwrite=args.overwrite)
        print(f"wrote {meta.num_pairs} pairs in {meta.num_shards} shard(s) to {args.out} "
              f"(latent {meta.latent_shape}, text {meta.text_len}x{meta.text_dim}, {meta.dtype})")
        return 0
    if args.command == "synth":
        if len(args.latent_shape) != 4:
            raise ValueError(f"--latent-shape needs 4 values C,F,H,W, got {args.latent_shape}")
        meta = synth_dataset(args.out, pairs=args.pairs, task=args.task, latent_shape=args.latent_shape,
                             text_len=args.text_len, text_dim=args.text_dim, difference=args.difference,
                             seed=args.seed, image_len=args.image_len, image_dim=args.image_dim,
                             dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite,
                             kind=args.kind, first_index=args.first_index)
        print(f"wrote {meta.num_pairs} synthetic {meta.task} pairs in {meta.num_shards} shard(s) "
              f"to {args.out}")
        return 0
    if args.command == "check":
        meta = validate_dataset(args.dataset, deep=args.deep, progress=True)
        if args.json:
            print(json.dumps(meta.to_json(), indent=2))
        else:
            print(f"{args.dataset}: OK -- {meta.num_pairs} {meta.task} pairs in {meta.num_shards} shard(s), "
                  f"latent {meta.latent_shape}, text {meta.text_len}x{meta.text_dim}, {meta.dtype}")
        return 0
    raise AssertionError(args.command)
