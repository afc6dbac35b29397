"""The ``pgdpo`` command: one sub-command per job, each implemented by ``main(argv)`` in its module."""

from __future__ import annotations

import importlib
import sys

#: sub-command -> (module providing ``main(argv: list[str]) -> int``, one-line help)
COMMANDS = {
    "demo": ("pgdpo.tools.demo", "fused PG-DPO loss against the eager reference on this machine: a table"),
    "train": ("pgdpo.train.cli", "preference training from a YAML config (torchrun / accelerate aware)"),
    "export": ("pgdpo.train.export", "a checkpoint as a model diffusers loads (save_pretrained / LoRA)"),
    "plan": ("pgdpo.tools.plan", "will a config fit? memory per GPU and step time, before you start"),
    "data": ("pgdpo.train.data.cli", "datasets: `generate` candidates, `score`, `pairs`, `encode`, `synth`"),
    "eval": ("pgdpo.tools.evaluate", "base vs trained model on held-out prompts: rewards, flickering, CLIP"),
    "toy": ("pgdpo.tools.toy", "the likelihood-displacement lab: DPO vs ARS vs IPR vs PG-DPO on a toy model"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: pgdpo COMMAND [ARGS...]   (pgdpo COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pgdpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
