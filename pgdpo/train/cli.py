"""``pgdpo train``: command-line front end of :mod:`pgdpo.train.trainer`."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import io
import os
import signal
import sys
import typing

from ..loss.options import METHODS as LOSS_METHODS
from .checkpoint import CheckpointError
from .compare import compare_config, format_comparison, merge_samples
from .config import ConfigError, TrainConfig, load_config, parse_value, yaml_word
from .data.format import DataError
from .trainer import train

DESCRIPTION = """\
Preference training (PG-DPO, DPO, ARS, IPR, SFT) of a video diffusion model from a YAML config.

Single process:   pgdpo train --config configs/demo.yaml --output-dir runs/demo
Several:          torchrun --nproc_per_node 8 -m pgdpo train --config configs/wan2.1-t2v-1.3b.yaml
                  (or: accelerate launch --num_processes 8 -m pgdpo train --config ...)
Continue a run:   pgdpo train --config ... --output-dir runs/demo --resume latest
Side by side:     pgdpo train --config configs/demo.yaml --output-dir runs/demo --compare dpo

Any config key can be overridden with --section.key VALUE (or --section.key=VALUE), e.g.
--optim.lr 1e-5 --method.name dpo --train.batch_size 8; a misspelt key or a bad value is an error
naming it. Values are read as YAML (1e-5, true, [a, b], null).

Output (in --output-dir): metrics.jsonl (one JSON object per step: loss, L_dpo, L_ipr, alpha and gamma
mean/min/max, reward margin, implicit accuracy, policy and reference MSE on chosen and rejected, lr,
grad norm, tokens/s, peak memory), checkpoint-<step>/ (sharded DCP; the newest --checkpoint.keep_last
kept; each with a manifest.json of checksums that --resume verifies), tensorboard/, config.yaml, at the
end loss.png, alpha_gamma.png, likelihood.png, and with validation.every N: samples/step-*/prompt-*.gif
(at step 0, every N steps, at the end) and samples/before_after.png.
"""


def _schema_lines() -> list[str]:
    lines = []

    def walk(cls, prefix: str, obj) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", value)
                continue
            choices = f.metadata.get("choices")
            extra = f"  one of {'|'.join(map(yaml_word, choices))}" if choices else ""
            shown = list(value) if isinstance(value, tuple) else value
            lines.append(f"  --{prefix}{f.name} (default: {shown}){extra}")

    walk(TrainConfig, "", TrainConfig())
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgdpo train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="config keys (--section.key VALUE):\n" + "\n".join(_schema_lines()))
    p.add_argument("--config", "-c", metavar="FILE.yaml",
                   help="YAML config (see configs/); without it the defaults are used")
    p.add_argument("--output-dir", help="where metrics, checkpoints and plots go (config: output_dir)")
    p.add_argument("--max-steps", type=int, help="optimiser steps to train to (config: train.max_steps)")
    p.add_argument("--save-every", type=int,
                   help="checkpoint every N steps; 0 = only at the end (config: checkpoint.save_every)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest complete checkpoint in --output-dir ('latest'; a fresh "
                        "start when there is none) or from a checkpoint folder (config: checkpoint.resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --output-dir (its checkpoints are deleted when the first "
                        "new one is written); without it a previous run is moved to previous-<n>/ (config: "
                        "checkpoint.overwrite)")
    p.add_argument("--compare", metavar="METHOD", choices=tuple(LOSS_METHODS),
                   help="after the run, train the same config with method METHOD (e.g. dpo) into "
                        "<output-dir>/compare-METHOD/ and print both side by side: accuracy, reward margin, "
                        "chosen/rejected MSE vs the reference (likelihood displacement)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def parse_overrides(extra: list[str]) -> list[tuple[str, object]]:
    """``["--optim.lr", "1e-5", "--method.name=dpo"]`` -> ``[("optim.lr", 1e-5), ("method.name", "dpo")]``."""
    out, i = [], 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: config overrides are --section.key VALUE")
        key = token[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra) or (extra[i + 1].startswith("--") and len(extra[i + 1]) > 2):
                raise ConfigError(f"--{key} needs a value")
            text = extra[i + 1]
            i += 2
        out.append((key.replace("-", "_"), parse_value(text)))
    return out


def resolve(argv: list[str]) -> tuple[TrainConfig, argparse.Namespace]:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = parse_overrides(extra)
    named = (("output_dir", args.output_dir), ("train.max_steps", args.max_steps),
             ("checkpoint.save_every", args.save_every), ("checkpoint.resume", args.resume))
    overrides += [(k, v) for k, v in named if v is not None]
    if args.overwrite:
        overrides.append(("checkpoint.overwrite", True))
    return load_config(args.config, overrides), args


def _report(exc: BaseException) -> None:
    rank = os.environ.get("RANK")
    where = f" [rank {rank}]" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"pgdpo train{where}: error: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, args = resolve(argv)
    except ConfigError as exc:
        _report(exc)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>` prints every thread's stack (a hung rank, say)
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (ValueError, OSError, io.UnsupportedOperation):  # stderr without a file descriptor
            pass

    try:
        summary = train(config)
        if args.compare and not summary.get("signal"):
            other = compare_config(config, args.compare)
            print(f"pgdpo train --compare: now the same run with method {args.compare} in "
                  f"{other.output_dir}", flush=True)
            summary = train(other)
            if int(os.environ.get("RANK", "0")) == 0:
                print(format_comparison([(config.method.name, config.output_dir),
                                         (args.compare, other.output_dir)]), flush=True)
                grid = merge_samples(config.output_dir, other.output_dir)
                if grid:
                    print(f"  samples of both: {grid}", flush=True)
    except (ConfigError, DataError, CheckpointError) as exc:
        _report(exc)
        return 2
    return 128 + summary["signal"] if summary.get("signal") else 0


if __name__ == "__main__":
    sys.exit(main())
