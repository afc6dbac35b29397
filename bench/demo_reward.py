"""``python -m bench.demo_reward``: the README's main job, measured (issue 27).

Runs ``pgdpo train --config configs/demo.yaml --compare dpo`` (from the shipped base model
``models/demo-base``), times each run, and writes ``<out>/demo.json`` and ``<out>/demo.md``: the validation
reward on held-out prompts (mean over ``validation.num_seeds`` noise seeds) of the base model, PG-DPO and
DPO; the likelihood changes (policy vs reference diffusion MSE on chosen / rejected, mean of the last 20
steps); the wall time of each run; machine, versions and commit. ``--short`` is the CI-sized form (fewer
steps); extra ``--key value`` arguments are passed on as config overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
#: the CI-sized form: the same job, fewer steps and validation samples
SHORT = ["--max-steps", "100", "--validation.every", "100"]


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def roughness(videos_file: str) -> float:
    """Mean absolute difference of neighbouring pixels of the RGB samples (``[N, F, H, W, 3]`` in [0, 1]):
    the data's clips about 0.07, the preview of pure noise about 0.34. A sample-quality proxy the motion
    reward does not have (it scores the direction of the orange mass's centre, blob or noise)."""
    from safetensors.torch import load_file

    v = load_file(videos_file)["videos"]
    down = (v[:, :, 1:] - v[:, :, :-1]).abs().mean()
    across = (v[:, :, :, 1:] - v[:, :, :, :-1]).abs().mean()
    return float((down + across) / 2)


def run(out: str, extra: list[str], compare: str | None = "dpo") -> dict:
    """One timed ``pgdpo train`` (with ``--compare``) in a fresh process; returns the measured figures."""
    from pgdpo.train.compare import tail_means, validation_rewards

    cmd = [sys.executable, "-m", "pgdpo", "train", "--config", str(DEMO), "--output-dir", out, "--overwrite",
           "--logging.progress", "false", *extra]
    if compare:
        cmd += ["--compare", compare]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs = {"pgdpo": out, **({compare: os.path.join(out, f"compare-{compare}")} if compare else {})}
    result = {"command": " ".join(cmd[1:]), "process_wall_s": round(wall, 1), "runs": {}}
    for method, folder in runs.items():
        first, last = validation_rewards(folder)
        with open(os.path.join(folder, "samples", "validation.jsonl")) as f:
            records = [json.loads(line) for line in f]
        result["runs"][method] = {
            "reward_base": first, "reward_final": last, "reward_change": last - first,
            "reward_by_seed_base": records[0].get("reward_by_seed"),
            "reward_by_seed_final": records[-1].get("reward_by_seed"),
            "tail_means": tail_means(folder)}
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
        result["runs"][method]["train_loop_s"] = round(sum(r.get("step_time_s", 0.0) for r in steps), 1)
        first_step, last_step = records[0]["step"], records[-1]["step"]
        result["runs"][method]["roughness_base"] = roughness(
            os.path.join(folder, "samples", f"step-{first_step:06d}", "videos.safetensors"))
        result["runs"][method]["roughness_final"] = roughness(
            os.path.join(folder, "samples", f"step-{last_step:06d}", "videos.safetensors"))
        result["runs"][method]["roughness_data"] = roughness(os.path.join(folder, "samples",
                                                                          "data_chosen.safetensors"))
    result["stdout_tail"] = proc.stdout[-2500:]
    return result


def markdown(record: dict) -> str:
    lines = [f"# The README's main job, measured ({record['date']})", "",
             f"commit `{record['commit']}`; {record['machine']}; torch {record['torch']}, diffusers "
             f"{record['diffusers']}, python {record['python']}; OMP_NUM_THREADS={record['threads']}; "
             f"load average at the start {record['load_start']}, at the end {record['load_end']}", "",
             f"    {record['result']['command']}", "",
             "Process wall time (the run(s), data, validation, plots): "
             f"{record['result']['process_wall_s']} s",
             "", "| run | val. reward base | final | change | per seed (final) | MSE chosen vs ref | "
             "MSE rejected vs ref | accuracy | roughness base -> final (data) | train-loop s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in record["result"]["runs"].items():
        t = r["tail_means"]
        dc = t["mse_policy_chosen"] - t["mse_ref_chosen"]
        dr = t["mse_policy_rejected"] - t["mse_ref_rejected"]
        seeds = ", ".join(f"{x:+.3f}" for x in r["reward_by_seed_final"] or [])
        lines.append(f"| {method} | {r['reward_base']:+.3f} | {r['reward_final']:+.3f} | "
                     f"{r['reward_change']:+.3f} | {seeds} | {t['mse_policy_chosen']:.4f} ({dc:+.4f}) | "
                     f"{t['mse_policy_rejected']:.4f} ({dr:+.4f}) | {t['accuracy']:.3f} | "
                     f"{r['roughness_base']:.3f} -> {r['roughness_final']:.3f} ({r['roughness_data']:.3f}) | "
                     f"{r['train_loop_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import diffusers
    import torch

    from pgdpo.tools.benchmark.machine import cpu_model

    parser = argparse.ArgumentParser(prog="python -m bench.demo_reward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/demo-cpu", help="folder for demo.json / demo.md")
    parser.add_argument("--run-dir", default="runs/bench-demo", help="the training runs' output folder")
    parser.add_argument("--short", action="store_true", help="the CI-sized form: " + " ".join(SHORT))
    parser.add_argument("--no-compare", action="store_true", help="PG-DPO only (no DPO run)")
    args, extra = parser.parse_known_args(argv)
    extra = (SHORT if args.short else []) + extra
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    commit = _commit()  # the code that runs (read before the runs: a commit during them is not it)
    result = run(args.run_dir, extra, None if args.no_compare else "dpo")
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()}",
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "python": platform.python_version(), "threads": os.environ.get("OMP_NUM_THREADS", "unset"),
              "load_start": load_start,
              "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "short": args.short, "overrides": extra, "result": result}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
