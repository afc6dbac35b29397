"""Score generated videos with reward hooks (``pgdpo data score``): generations.jsonl -> scored.jsonl.

A hook is ``"module:function"`` (or ``"name=module:function"``), called exactly as the trainer's
``validation.reward``: ``function(videos, prompts)`` with ``videos`` float ``[N, F, H, W, 3]`` in ``[0, 1]``
and the ``N`` prompt strings, returning ``N`` numbers (a list or a tensor). Wrap VideoAlign, HPS-v2, an
aesthetic predictor, ... in such a function.

Every input line is copied with ``"scores": {name: value, ...}`` (one entry per hook; the name is the
function's unless given) and ``"score"``: the value of ``score_key`` (default the first hook), the
one ``pgdpo data pairs`` ranks by. Relative ``video`` / ``image`` paths are rewritten relative to the
output file's folder, so the scored file works wherever it is written. Videos are read with
:func:`pgdpo.train.data.media.read_video` and scored ``batch_size`` at a time (consecutive videos of the
same size); each batch's lines are appended and flushed, and a rerun skips the videos already scored
(a torn last line from a crash is dropped).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ..validation import load_reward
from .format import iter_jsonl
from .media import read_video


def load_hooks(specs: list[str], what: str = "--reward") -> list[tuple[str, object]]:
    """``[(name, callable)]`` of ``"[name=]module:function"`` specs (names must differ)."""
    hooks, names = [], set()
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = spec.rpartition(":")[2], spec
        if not name:
            raise ValueError(f"{what} {spec!r}: empty name")
        if name in names:
            raise ValueError(f"{what}: two hooks are named {name!r}; name them: NAME=module:function")
        names.add(name)
        hooks.append((name, load_reward(target, what=what)))
    return hooks


def call_hook(name: str, fn, videos: torch.Tensor, prompts: list, where: list[str]) -> list[float]:
    """``fn(videos, prompts)`` as ``N`` finite floats (an error naming the hook and the video otherwise)."""
    scores = torch.as_tensor(fn(videos, prompts), dtype=torch.float64).reshape(-1).tolist()
    if len(scores) != len(where):
        raise ValueError(f"reward {name!r} returned {len(scores)} scores for {len(where)} videos")
    for score, video in zip(scores, where):
        if not math.isfinite(score):
            raise ValueError(f"reward {name!r} scored {video} {score}; scores must be finite")
    return scores


def video_for_hooks(path: str | os.PathLike) -> torch.Tensor:
    """A video file as the hooks take it: float ``[F, H, W, 3]`` in ``[0, 1]``."""
    return ((read_video(path).permute(1, 2, 3, 0) + 1.0) / 2.0).clamp(0.0, 1.0)


def _read_done(out: Path, names: list[str], score_key: str) -> set[str]:
    """Videos already scored in ``out`` (the torn last line of a crash is cut off)."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        out.write_bytes(data[: data.rfind(b"\n") + 1])  # a torn line from a crash
    done = set()
    for _, where, record in iter_jsonl(out, ValueError):
        scored = sorted(record.get("scores", {}))
        if scored != sorted(names) or record.get("score_key") != score_key:
            raise ValueError(f"{where}: scored with hooks {scored} (score key {record.get('score_key')!r}), "
                             f"not {sorted(names)} ({score_key!r}); use another --out or --overwrite")
        done.add(record["video"])
    return done


def score_generations(generations: str | os.PathLike, out: str | os.PathLike, rewards: list[str], *,
                      score_key: str | None = None, batch_size: int = 8,
                      videos_root: str | os.PathLike | None = None, overwrite: bool = False,
                      progress: bool = True) -> dict:
    """Score every video of ``generations`` with the ``rewards`` hooks into ``out`` (see the module
    docstring). Returns ``{"scored", "skipped", "videos"}``."""
    from tqdm.auto import tqdm

    if not rewards:
        raise ValueError("give at least one --reward module:function")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    hooks = load_hooks(rewards)
    names = [name for name, _ in hooks]
    score_key = score_key or names[0]
    if score_key not in names:
        raise ValueError(f"--score-key {score_key!r} is none of the hooks' names {names}")
    generations, out = Path(generations), Path(out)
    if not generations.is_file():
        raise FileNotFoundError(f"--in {str(generations)!r}: file not found")
    root = Path(videos_root) if videos_root is not None else generations.resolve().parent
    out_dir = out.resolve().parent

    def resolve(path: str) -> Path:
        return Path(path) if os.path.isabs(path) else root / path

    records = []
    for _, where, data in iter_jsonl(generations, ValueError):
        if not isinstance(data, dict) or not isinstance(data.get("video"), str) or not data["video"]:
            raise ValueError(f"{where}: expected a JSON object with a 'video' path")
        if not isinstance(data.get("prompt"), str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        record = dict(data)
        for key in ("video", "image"):
            if isinstance(record.get(key), str) and not os.path.isabs(record[key]):
                record[key] = os.path.relpath(resolve(record[key]), out_dir)
        records.append((resolve(data["video"]), record))
    if overwrite:
        out.unlink(missing_ok=True)
    done = _read_done(out, names, score_key)
    todo = [(path, record) for path, record in records if record["video"] not in done]
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="scoring", unit="video", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        start = 0
        while start < len(todo):
            videos, batch = [], []
            for path, record in todo[start:start + batch_size]:
                video = video_for_hooks(path)
                if videos and video.shape != videos[0].shape:
                    break  # a batch holds videos of one size
                videos.append(video)
                batch.append(record)
            stacked = torch.stack(videos)
            prompts = [r["prompt"] for r in batch]
            where = [r["video"] for r in batch]
            columns = {name: call_hook(name, fn, stacked, prompts, where) for name, fn in hooks}
            for i, record in enumerate(batch):
                record["scores"] = {name: columns[name][i] for name in names}
                record["score"] = record["scores"][score_key]
                record["score_key"] = score_key
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
            start += len(batch)
            bar.update(len(batch))
    bar.close()
    return {"scored": len(todo), "skipped": len(records) - len(todo), "videos": len(records)}


# ---------------------------------------------------------------------------------------------- command


def add_parser(sub, formatter_class) -> None:
    """``pgdpo data score``'s options (registered by :mod:`pgdpo.train.data.cli`)."""
    p = sub.add_parser("score", help="score generated videos with reward hooks (module:function)",
                       formatter_class=formatter_class,
                       description="Score every video of a generations JSONL file (`pgdpo data generate`) "
                       "with one or more reward hooks, the same signature as validation.reward: "
                       "fn(videos [N, F, H, W, 3] float in [0, 1], prompts) -> N scores. Resumes.",
                       epilog='output line: the input line + "scores": {NAME: value, ...}, "score": the '
                       '--score-key hook\'s value, "score_key".\n'
                       "next: pgdpo data pairs --scores scored.jsonl --out pairs.jsonl")
    p.add_argument("--in", dest="generations", required=True, metavar="FILE.jsonl",
                   help="generations manifest (prompt, video per line)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="scored generations (appended)")
    p.add_argument("--reward", action="append", required=True, metavar="[NAME=]MODULE:FUNCTION",
                   help="a reward hook; repeat for several (each kept under its NAME, default the "
                   "function's name)")
    p.add_argument("--score-key", metavar="NAME", help="the hook whose score ranks (default: the first)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per hook call (default 8)")
    p.add_argument("--videos", metavar="DIR", help="root of relative video paths (default: the input "
                   "file's folder)")
    p.add_argument("--overwrite", action="store_true", help="score everything again")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    summary = score_generations(args.generations, args.out, args.reward, score_key=args.score_key,
                                batch_size=args.batch_size, videos_root=args.videos,
                                overwrite=args.overwrite, progress=args.progress)
    print(f"pgdpo data score: {summary['videos']} videos ({summary['scored']} scored now, "
          f"{summary['skipped']} already scored); wrote {args.out}")
    return 0
