"""Scored generations -> preference pairs (best vs worst per prompt), as in the paper (sec. 4.1).

Input: a JSONL file, one line per generated video::

    {"prompt_id": "p0", "prompt": "a cat surfing", "video": "videos/p0_1.npy", "score": 0.71}

``prompt_id`` is optional (the prompt text is the group key then); ``image`` (the conditioning image of
image-to-video, a path) is optional and must be the same for all generations of a prompt; the score is
read from ``score`` or from any dotted key (``--score-key scores.Overall`` for VideoAlign's output).

Output: a JSONL file, one line per pair, which ``pgdpo data encode`` reads::

    {"prompt_id": "p0", "prompt": "a cat surfing", "chosen": {"video": "...", "score": 0.71},
     "rejected": {"video": "...", "score": 0.12}, "margin": 0.59, "num_generations": 4}

Per prompt the highest- and the lowest-scoring generations are chosen and rejected (the first in file
order among equal scores). Prompts with a single generation, with all scores equal (a tie: no
preference), or with ``margin < min_margin`` are dropped and counted.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .format import iter_jsonl


@dataclass
class PairsReport:
    """What :func:`make_pairs` kept and dropped."""

    generations: int = 0
    prompts: int = 0
    pairs: int = 0
    single_generation: int = 0
    ties: int = 0
    below_min_margin: int = 0
    dropped_prompt_ids: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.generations} generations of {self.prompts} prompts -> {self.pairs} pairs; dropped "
                f"{self.single_generation} prompt(s) with one generation, {self.ties} tie(s), "
                f"{self.below_min_margin} below the minimum margin")


def _score(record: dict, key: str, where: str) -> float:
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{where}: no score at key {key!r}")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: score {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: score {key!r} is {value}; scores must be finite")
    return float(value)


def read_scores(path: str | os.PathLike, score_key: str = "score") -> list[dict]:
    """Read a scored-generations JSONL file into ``[{"prompt_id", "prompt", "video", "score", "image"?}]``."""
    records = []
    for number, where, data in iter_jsonl(path, ValueError):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object per line, got {type(data).__name__}")
        for key in ("prompt", "video"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
        record = {"prompt_id": str(data.get("prompt_id", data["prompt"])), "prompt": data["prompt"],
                  "video": data["video"], "score": _score(data, score_key, where), "line": number}
        if data.get("image") is not None:
            record["image"] = str(data["image"])
        records.append(record)
    return records


def make_pairs(records: list[dict], min_margin: float = 0.0) -> tuple[list[dict], PairsReport]:
    """Best vs worst generation per prompt. Returns the pairs (in first-seen prompt order) and a report."""
    if min_margin < 0 or not math.isfinite(min_margin):
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin}")
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["prompt_id"], []).append(record)
    report = PairsReport(generations=len(records), prompts=len(groups))
    pairs = []
    for prompt_id, group in groups.items():
        prompts = {r["prompt"] for r in group}
        if len(prompts) > 1:
            raise ValueError(f"prompt_id {prompt_id!r} has different prompt texts: {sorted(prompts)[:3]}")
        images = {r.get("image") for r in group}
        if len(images) > 1:
            raise ValueError(f"prompt_id {prompt_id!r} has different conditioning images: "
                             f"{sorted(map(str, images))}")
        if len(group) < 2:
            report.single_generation += 1
            report.dropped_prompt_ids[prompt_id] = "one generation"
            continue
        best = max(group, key=lambda r: r["score"])  # max/min keep the first of equal scores
        worst = min(group, key=lambda r: r["score"])
        margin = best["score"] - worst["score"]
        if margin <= 0:
            report.ties += 1
            report.dropped_prompt_ids[prompt_id] = "tie"
            continue
        if margin < min_margin:
            report.below_min_margin += 1
            report.dropped_prompt_ids[prompt_id] = f"margin {margin:.4g} < {min_margin:g}"
            continue
        pair = {"prompt_id": prompt_id, "prompt": best["prompt"],
                "chosen": {"video": best["video"], "score": best["score"]},
                "rejected": {"video": worst["video"], "score": worst["score"]},
                "margin": margin, "num_generations": len(group)}
        if best.get("image") is not None:
            pair["image"] = best["image"]
        pairs.append(pair)
    report.pairs = len(pairs)
    return pairs, report


def write_pairs(pairs: list[dict], path: str | os.PathLike, *,
                paths_relative_to: str | os.PathLike | None = None) -> None:
    """Write pairs as JSONL (atomically: a temporary file renamed into place).

    ``paths_relative_to``: the folder the records' relative video and image paths are relative to (the
    scores file's, for ``pgdpo data pairs``); they are rewritten relative to ``path``'s folder, where
    ``pgdpo data encode`` looks for them, so the pairs file may be written anywhere."""
    if paths_relative_to is not None:
        pairs = [_rebased(pair, Path(paths_relative_to), Path(path).resolve().parent) for pair in pairs]
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    os.replace(tmp, path)


def _rebased(pair: dict, source: Path, target: Path) -> dict:
    def rebase(p: str) -> str:
        return p if os.path.isabs(p) else os.path.relpath((source / p).resolve(), target)

    out = {**pair, "chosen": {**pair["chosen"], "video": rebase(pair["chosen"]["video"])},
           "rejected": {**pair["rejected"], "video": rebase(pair["rejected"]["video"])}}
    if pair.get("image") is not None:
        out["image"] = rebase(pair["image"])
    return out


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Read a pairs JSONL file written by :func:`write_pairs` (checked: fields, scores)."""
    pairs = []
    for _, where, data in iter_jsonl(path, ValueError):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object per line")
        for side in ("chosen", "rejected"):
            if not isinstance(data.get(side), dict) or not isinstance(data[side].get("video"), str):
                raise ValueError(f"{where}: {side!r} must be an object with a 'video' path")
        if not isinstance(data.get("prompt"), str):
            raise ValueError(f"{where}: 'prompt' must be a string")
        data.setdefault("prompt_id", data["prompt"])
        pairs.append(data)
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs
