"""Host memory and time of ``pgdpo train``'s setup, per rank, for 1 and 2 processes (CPU, gloo).

    python -m bench.setup_memory           # all four setups; results in bench/results/setup-memory
    python -m bench.setup_memory --procs 2 --tuning lora

A ~300M-parameter Wan-shaped transformer (``WanTransformer3DModel``: 17 blocks, width 1024, ffn 4096,
text_dim 4096: 298.6M parameters, 1.19 GB in fp32) is saved once with diffusers' ``save_pretrained``
(``--model-dir``), then ``pgdpo train`` sets up on it under ``torchrun`` and each rank reports:

- ``baseline``: resident memory (VmRSS) after the imports and the process group, before the setup;
- ``setup_peak``: peak resident memory (VmHWM, reset to the baseline through ``/proc/self/clear_refs``)
  over the Trainer's setup (models built, sharded, filled; optimiser; data), and the setup time;
- ``steady``: VmRSS and VmHWM after ``--steps`` training steps (AdamW states exist from the first).

Figures are in units of the model's fp32 size above the baseline (the issue's yardstick; goal for the
2-rank LoRA setup: under 0.6). Tiny latents (16 tokens) keep the steps to seconds: the activations are
negligible, what is measured is the weights, the optimiser and the loading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Wan2.1-shaped, ~300M parameters (the 1.3B's fields with 8 heads x 128, ffn 4096, 17 blocks)
MODEL = {"num_attention_heads": 8, "ffn_dim": 4096, "num_layers": 17}
#: environment that changes the figures (glibc returns freed blocks >= this many bytes to the OS at once)
ENV = ("MALLOC_MMAP_THRESHOLD_",)
SETUPS = {
    "lora": ["--model.lora_rank", "16", "--method.reference", "lora"],
    "full": ["--method.reference", "copy"],
}


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (Linux ``clear_refs`` value 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def save_model(model_dir: Path) -> dict:
    from pgdpo.train.models import MODEL_CONFIGS, build_model, count_parameters

    config = {**MODEL_CONFIGS["wan2.1-t2v-1.3b"], **MODEL}
    folder = model_dir / "transformer"
    if not (folder / "config.json").is_file():
        print(f"saving a {MODEL} Wan transformer to {folder} ...", flush=True)
        build_model(config, seed=0).save_pretrained(folder, max_shard_size="10GB")
    n = count_parameters(build_model(config, device="meta"))
    return {"path": str(folder), "parameters": n, "fp32_bytes": 4 * n, "config": MODEL}


def worker(args) -> None:
    """One rank: baseline, setup (peak, time), steps (steady state); a JSON line to --report."""
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401 - the imports belong to the baseline
    import peft  # noqa: F401

    from pgdpo.train.cli import resolve
    from pgdpo.train.distributed import init_distributed
    from pgdpo.train.trainer import Trainer

    cfg, _ = resolve(args.train_args)
    init_distributed(cfg.distributed, cfg.device)  # the process group belongs to the baseline
    baseline = status_kb("VmRSS")
    resettable = reset_peak()
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    setup_peak = status_kb("VmHWM")
    it = trainer.dataset.stream()
    step_s = []
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        trainer.train_step(step, it)
        step_s.append(time.perf_counter() - t)
    record = {"rank": trainer.dist.rank, "world_size": trainer.dist.world_size, "baseline": baseline,
              "peak_resettable": resettable, "setup_peak": setup_peak, "setup_s": setup_s,
              "steady_rss": status_kb("VmRSS"), "steady_peak": status_kb("VmHWM"), "step_s": step_s}
    with open(args.report, "a") as f:
        f.write(json.dumps(record) + "\n")
    trainer.close()


def run_setup(model: dict, procs: int, tuning: str, steps: int, work: Path) -> list[dict]:
    from pgdpo.train.data.synth import synth_dataset

    data = work / "data"
    if not (data / "dataset.json").is_file():
        synth_dataset(data, pairs=8, latent_shape=(16, 1, 8, 8), text_len=8, text_dim=4096, progress=False)
    report = work / f"report-{procs}-{tuning}.jsonl"
    report.unlink(missing_ok=True)
    train_args = ["--config", str(REPO / "configs" / "demo.yaml"), "--output-dir", str(work / "run"),
                  "--overwrite", "--data.path", str(data), "--model.path", model["path"],
                  "--train.batch_size", str(procs), "--train.micro_batch_size", "1",
                  "--logging.trackers", "[]", "--logging.progress", "false", "--logging.plots", "false",
                  "--checkpoint.save_every", "0", "--optim.warmup_steps", "0", *SETUPS[tuning]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "bench.setup_memory", "--worker", "--report", str(report), "--steps", str(steps), "--",
           *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"{procs} process(es), {tuning}: {' '.join(cmd[-len(train_args):])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["rank"])


def markdown(result: dict) -> str:
    m = result["model"]
    lines = [f"# pgdpo train setup memory ({m['parameters'] / 1e6:.1f}M-parameter Wan, fp32 "
             f"{m['fp32_bytes'] / 1e9:.2f} GB)", "",
             f"machine: {result['machine'].get('cpu_model', '?')}, {result['machine'].get('cpus_available')} "
             f"CPUs, {(result['machine'].get('memory_bytes') or 0) / 2**30:.0f} GiB; "
             f"torch {result['versions'].get('torch')}, diffusers {result['versions'].get('diffusers')}; "
             f"commit {(result['git'].get('commit') or '?')[:10]}"
             f"{' (dirty)' if result['git'].get('dirty') else ''}",
             f"environment: {result.get('env')}",
             "", "Per rank, above the baseline (imports + process group), in units of the model's fp32 size "
             "(x) and GB. Goal (issue 11): 2-rank LoRA setup peak < 0.6x.", "",
             "| setup | procs | rank | baseline GB | setup peak | setup s | steady RSS | steady peak |",
             "|---|---|---|---|---|---|---|---|"]
    size = m["fp32_bytes"]
    def above(v, r):
        return f"{(v - r['baseline']) / size:.2f}x ({(v - r['baseline']) / 1e9:.2f} GB)"

    for run in result["runs"]:
        for r in run["ranks"]:
            lines.append(f"| {run['tuning']} | {run['procs']} | {r['rank']} | {r['baseline'] / 1e9:.2f} | "
                         f"{above(r['setup_peak'], r)} | {r['setup_s']:.1f} | {above(r['steady_rss'], r)} | "
                         f"{above(r['steady_peak'], r)} |")
    lines += ["", "lora: LoRA rank 16 on to_q/to_k/to_v/to_out.0, reference = adapters off (no copy); "
              "full: full fine-tuning with a frozen copy reference (fp32 on CPU). CPU compute is fp32, so "
              "the LoRA base is fp32 here (bf16 on GPU). Steady state: after the steps, with AdamW states. "
              "Without MALLOC_MMAP_THRESHOLD_, glibc keeps the freed FSDP2 all-gather buffers (blocks of "
              "< 32 MB) in its heap, so the steady RSS of 2 ranks includes up to about one model's worth of "
              "free memory; with MALLOC_MMAP_THRESHOLD_=1048576 it goes back to the OS.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.setup_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "pgdpo-bench-wan300m"),
                   help="where the ~300M model is saved (reused when present)")
    p.add_argument("--procs", type=int, nargs="*", default=[1, 2])
    p.add_argument("--tuning", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--steps", type=int, default=2, help="training steps before the steady-state reading")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "setup-memory"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    from pgdpo.tools.benchmark.machine import git_info, machine_info, versions

    git = git_info()  # the code measured is the code at the start
    model_dir = Path(args.model_dir)
    model = save_model(model_dir)
    runs = []
    for tuning in args.tuning:
        for procs in args.procs:
            ranks = run_setup(model, procs, tuning, args.steps, model_dir)
            runs.append({"tuning": tuning, "procs": procs, "ranks": ranks})
            for r in ranks:
                size = model["fp32_bytes"]
                peak, steady = r["setup_peak"] - r["baseline"], r["steady_rss"] - r["baseline"]
                print(f"  rank {r['rank']}: setup peak {peak / size:.2f}x above baseline, "
                      f"{r['setup_s']:.1f} s; steady RSS {steady / size:.2f}x", flush=True)
    model_out = {k: v for k, v in model.items() if k != "path"}
    import diffusers
    import peft
    import safetensors

    vers = {**versions(), "diffusers": diffusers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__}
    result = {"model": model_out, "runs": runs, "machine": machine_info(torch.device("cpu")),
              "versions": vers, "env": {k: os.environ.get(k) for k in ENV}, "git": git,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "setup_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "setup_memory.md").write_text(markdown(result))
    print(f"wrote {out / 'setup_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
