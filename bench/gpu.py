"""The one prepared GPU run: every figure a lent GPU should produce, in one call, written as it comes.

    python -m bench.gpu --out DIR [--archive FILE.tar.gz] [--dry-run] [--budget-s 480]

Sections, in order (each one's files land in DIR as soon as it ends, ``DIR/summary.json`` and
``summary.md`` are rewritten after each, and ``--archive`` re-packs DIR after each, so a run killed at
its time limit still returns what was done):

1. ``env``: device, versions, copy bandwidth (a 1 GiB ``copy_``, bytes read + written).
2. ``tests``: the CUDA part of the test suite (tests/test_triton_kernels.py, tests/test_loss.py).
3. ``loss``: ``python -m bench`` (fused vs eager vs torch.compile; fwd, bwd, both; fp32 and bf16) for each
   shape class (SDXL, VC2, Wan 480p / 720p pair, a batch of 8 Wan pairs, ragged), sample weighting,
   and element weighting on the Wan 480p pair; ``bench.mixed_dtypes`` (bf16 pred/ref + fp32 target).
4. ``graph``: the Wan 480p bf16 pair, fwd + bwd, launched vs replayed from a CUDA graph.
5. ``sweep``: forward block / split and backward block per shape class; the winners in the form of the
   launcher's configuration (``sweep.json``: ``{shape: {"block", "split", "backward_block"}}``).
6. ``train``: one training step (3 timed) of Wan2.1-T2V-1.3B's real configuration with random weights,
   480x832, 81 frames (fewer on out-of-memory), bf16, SDPA flash attention, activation checkpointing,
   LoRA and full fine-tuning: step time, MFU, peak memory, the reference forward's share, and
   ``pgdpo plan``'s prediction for the same setting.

``--dry-run`` runs the same sections on CPU (Triton's interpreter, tiny shapes, a 2-block slice of the
1.3B model on a tiny video), as CI does (tests/test_bench_gpu.py).

What a GPU machine without network lacks (diffusers, where the image has only torch, Triton, accelerate,
peft and transformers) travels as wheels: ``bench/gpu_wheels.sh`` downloads them into ``.whl/``
(git-ignored) on a machine with network; copy that folder along with the checkout; this script installs them
from there with ``pip --no-index`` into a temporary folder. It
reaches no network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
#: the shape classes of the loss benchmark (bench suite names; the batch of 8 Wan 480p pairs explicit)
LOSS_SHAPES = ("wan480", "wan720", "16x16x21x60x104", "vc2", "sdxl", "ragged")
SWEEP_SHAPES = {"wan480": (2, 16, 21, 60, 104), "wan720": (2, 16, 21, 90, 160),
                "wan480x8": (16, 16, 21, 60, 104), "vc2": (2, 4, 16, 40, 64), "sdxl": (2, 4, 128, 128),
                "ragged": (6, 3, 13, 37, 41)}
#: dense bf16 peak (TFLOP/s) for the MFU figure, by device-name fragment
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H20": 148.0, "A100": 312.0}


def _small(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Figures and logs only: no model weights, checkpoints or datasets in the archive."""
    return None if info.size > 16 * 2**20 or info.name.endswith((".safetensors", ".distcp", ".pt")) else info


class Run:
    def __init__(self, out: Path, archive: Path | None, dry_run: bool, budget_s: float):
        self.out, self.archive, self.dry_run = out, archive, dry_run
        self.deadline = time.monotonic() + budget_s
        self.summary: dict = {"dry_run": dry_run, "sections": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in (os.environ.get("PYTHONPATH"), ) if p]), "PYTHONUNBUFFERED": "1"}
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, name: str, cmd: list[str], timeout: float) -> int | None:
        """Run ``cmd`` with its output in ``DIR/<name>.log``; None when it ran out of time."""
        timeout = max(1.0, min(timeout, self.left()))
        with open(self.out / f"{name}.log", "w") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            try:
                return subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                log.write(f"\n[bench.gpu] stopped after {timeout:.0f} s\n")
                return None

    def section(self, name: str, fn) -> None:
        start = time.monotonic()
        if self.left() < 5:
            status, detail = "skipped", "no time left"
        else:
            try:
                status, detail = "done", fn()
            except Exception as e:  # a section's failure must not lose the others' figures
                status, detail = "failed", f"{type(e).__name__}: {e}"
        self.summary["sections"][name] = dict(status=status, seconds=round(time.monotonic() - start, 1),
                                              detail=detail)
        self.write_summary()
        print(f"[bench.gpu] {name}: {status} in {time.monotonic() - start:.0f} s", file=sys.stderr,
              flush=True)

    def write_summary(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")
        lines = [f"# bench.gpu{' --dry-run' if self.dry_run else ''}", ""]
        for name, s in self.summary["sections"].items():
            detail = s["detail"] if isinstance(s["detail"], str) else json.dumps(s["detail"], default=str)
            lines.append(f"- **{name}**: {s['status']} ({s['seconds']} s): {detail[:2000]}")
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")
        if self.archive is not None:
            tmp = self.archive.with_name(self.archive.name + ".tmp")
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.out, arcname=self.out.name, filter=_small)
            tmp.replace(self.archive)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def ensure_wheels(run: Run) -> str:
    """diffusers importable: as installed, else from the carried ``.whl/`` folder (no index, no network)."""
    try:
        import diffusers  # noqa: F401

        return f"diffusers {diffusers.__version__} installed"
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return (f"diffusers is missing and {WHEELS} has no wheels: run bench/gpu_wheels.sh where pip reaches "
                f"PyPI and copy .whl/ along (the train section needs diffusers)")
    site = Path(tempfile.gettempdir()) / "pgdpo-gpu-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    run.env["PYTHONPATH"] = str(site) + os.pathsep + run.env["PYTHONPATH"]
    import diffusers

    return f"diffusers {diffusers.__version__} from {len(wheels)} carried wheel(s)"


def env_section(run: Run):
    import torch
    import triton

    info = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, wheels=ensure_wheels(run))
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip() or "unknown (no .git)"
    except OSError:
        info["commit"] = "unknown"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mb=getattr(p, "L2_cache_size", 0) / 1e6)
        n = 2**28  # 1 GiB of fp32
        src = torch.empty(n, device="cuda")
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        info["copy_tb_s"] = round(2 * 4 * n / sorted(times)[len(times) // 2] / 1e12, 3)
        del src, dst
    else:
        info["device"] = "cpu (dry run)" if run.dry_run else "cpu"
    (run.out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def tests_section(run: Run):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not large", "tests/test_triton_kernels.py",
           "tests/test_loss.py", "-p", "no:cacheprovider"]
    if run.dry_run:
        cmd.append("--collect-only")  # the CPU suite runs them in CI; here: that the command is right
    rc = run.command("tests", cmd, 240)
    return f"pytest exit {rc} (tests.log)"


def loss_section(run: Run):
    results = run.out / "loss"
    results.mkdir(exist_ok=True)
    done = []
    if run.dry_run:
        jobs = [("smoke", ["--smoke", "--device", "cpu", "--providers", "fused,eager", "--repeats", "3"])]
    else:
        jobs = [(f"{s}-sample", ["--device", "cuda", "--shapes", s, "--dtypes", "fp32,bf16", "--budget", "2",
                                 "--repeats", "100"]) for s in LOSS_SHAPES]
        jobs.insert(1, ("wan480-element", ["--device", "cuda", "--shapes", "wan480", "--dtypes", "fp32,bf16",
                                           "--weighting", "element", "--budget", "2", "--repeats", "100"]))
    for name, args in jobs:
        rc = run.command(f"loss-{name}", [sys.executable, "-m", "bench", *args, "--no-progress", "--out",
                                          str(results / name)], 150)
        done.append(f"{name}: {rc}")
        if rc is None:
            break
    mixed = ["--shape", "tiny-video", "--backend", "triton", "--repeats", "3"] if run.dry_run else \
        ["--shape", "wan480", "--backend", "triton", "--repeats", "50"]
    rc = run.command("loss-mixed", [sys.executable, "-m", "bench.mixed_dtypes", *mixed, "--out",
                                    str(results / "mixed")], 120)
    done.append(f"mixed: {rc}")
    return ", ".join(done)


def _loss_inputs(shape, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    n = math.prod(shape[1:])
    t = torch.randn(shape[0], n, generator=g).to(device)
    p = (t + 0.1 * torch.randn(shape[0], n, generator=g)).to(device, dtype).requires_grad_()
    r = (t + 0.1 * torch.randn(shape[0], n, generator=g)).to(device, dtype)
    return p, r, t.to(dtype)


def graph_section(run: Run):
    import torch

    from pgdpo import pgdpo_loss

    if run.dry_run or not torch.cuda.is_available():
        return "needs CUDA (skipped in the dry run)"
    p, r, t = _loss_inputs((2, 16, 21, 60, 104), torch.bfloat16, "cuda")

    def step():
        p.grad = None
        pgdpo_loss(p, r, t, backend="triton").backward()

    for _ in range(5):
        step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = pgdpo_loss(p, r, t, backend="triton")
        loss.backward()

    def timed(fn, reps=200):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / reps

    out = dict(shape="wan480 bf16 fwd+bwd", launched_us=round(timed(step), 2),
               graph_us=round(timed(graph.replay), 2))
    (run.out / "graph.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def sweep_section(run: Run):
    import torch

    from pgdpo import pgdpo_loss
    from pgdpo.kernels import pgdpo_loss as K

    device = "cuda" if not run.dry_run else "cpu"
    shapes = SWEEP_SHAPES if not run.dry_run else {"tiny-video": (4, 2, 3, 5, 7)}
    if run.dry_run:
        blocks, backward_blocks, splits = (16, 32), (16,), (None,)

        def bench(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    else:
        import triton.testing

        blocks, backward_blocks, splits = (1024, 2048, 4096), (1024, 2048, 4096), (None, 0.5, 2.0)

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=5, rep=20)

    results, winners = [], {}
    for name, shape in shapes.items():
        if run.left() < 30:
            break
        p, r, t = _loss_inputs(shape, torch.bfloat16, device)
        n = math.prod(shape[1:])
        default_split = K._forward_config(n, shape[0], p.device, 2048)[1] if not run.dry_run else 1
        best = None
        for weighting in ("sample", "element"):
            for block in blocks:
                for factor in splits:
                    split = None if factor is None else max(1, int(default_split * factor))
                    for bblock in backward_blocks:
                        def call(p=p, r=r, t=t, block=block, split=split, bblock=bblock, weighting=weighting):
                            p.grad = None
                            with K.launch_config(block=block, split=split, backward_block=bblock):
                                pgdpo_loss(p, r, t, backend="triton", weighting=weighting).backward()
                        ms = bench(call)
                        row = dict(shape=name, weighting=weighting, block=block, split=split,
                                   backward_block=bblock, ms=round(ms, 5))
                        results.append(row)
                        if weighting == "sample" and (best is None or ms < best["ms"]):
                            best = row
        winners[name] = {k: best[k] for k in ("block", "split", "backward_block")} | {"ms": best["ms"]}
        record = dict(winners=winners, results=results)
        (run.out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    return winners


def _train_args(run: Run, lora_rank: int, frames: int, folder: Path) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "wan2.1-t2v-1.3b.yaml"), "--output-dir", str(folder),
            "--model.path", "null", "--data.path", str(folder / "data"), "--data.synthesize", "true",
            "--data.synth_pairs", "4", "--max-steps", "2" if run.dry_run else "4", "--train.batch_size", "1",
            "--train.micro_batch_size", "1", "--logging.trackers", "[]", "--logging.plots", "false",
            "--logging.progress", "false", "--checkpoint.save_every", "0", "--validation.every", "0",
            "--model.lora_rank", str(lora_rank), "--data.frames", str(frames)]
    if lora_rank:  # reference = the policy with its adapters off (no second copy), as `pgdpo plan` assumes
        args += ["--method.reference", "lora"]
    if run.dry_run:  # the 2-block slice on a tiny video, fp32 compute path of the CPU
        args += ["--model.name", SLICE, "--data.height", "32", "--data.width", "32", "--data.text_len", "8",
                 "--model.attention", "null", "--device", "cpu"]
    return args


SLICE = "wan2.1-t2v-1.3b-2blocks"


def train_step_main(argv: list[str]) -> int:
    """``python -m bench.gpu --train-step ARGS``: ``pgdpo train ARGS`` with the 2-block slice of the 1.3B
    model registered (dry runs), in its own process (an out-of-memory leaves the caller's GPU clean)."""
    from pgdpo.cli import main as pgdpo_main
    from pgdpo.train.models import MODEL_CONFIGS

    MODEL_CONFIGS[SLICE] = {**MODEL_CONFIGS["wan2.1-t2v-1.3b"], "num_layers": 2}
    times = _time_reference_forward()
    try:
        return pgdpo_main(["train", *argv])
    finally:
        out = argv[argv.index("--output-dir") + 1]
        (Path(out) / "reference_times.json").write_text(json.dumps(times) + "\n")


def _time_reference_forward() -> list[float]:
    """Seconds of each reference forward (``PreferenceStep.reference_prediction``), synchronised: its share
    of the step is sum / (step_time_s of metrics.jsonl)."""
    import torch

    from pgdpo.train.step import PreferenceStep

    times: list[float] = []
    inner = PreferenceStep.reference_prediction

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(self, *args, **kwargs):
        sync()
        start = time.perf_counter()
        out = inner(self, *args, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
        return out

    PreferenceStep.reference_prediction = timed
    return times


def train_section(run: Run):
    out = {}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers missing (run bench/gpu_wheels.sh and bring its .whl/ folder along)"
    gpu = "h100"
    env = json.loads((run.out / "env.json").read_text()) if (run.out / "env.json").exists() else {}
    for key in ("H200", "H20", "A100"):  # H200 before H20: "NVIDIA H200" contains "H20"
        if key in env.get("device", ""):
            gpu = key.lower()
            break
    for label, rank in (("lora", 64), ("full", 0)):
        for frames in ((81, 41, 21) if not run.dry_run else (5,)):
            folder = run.out / f"train-{label}"
            rc = run.command(f"train-{label}-f{frames}", [sys.executable, "-m", "bench.gpu", "--train-step",
                                                            *_train_args(run, rank, frames, folder)], 240)
            recs = []
            if (folder / "metrics.jsonl").exists():
                recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in recs if "step_time_s" in r]
            for heavy in ("final", "data", *[c.name for c in folder.glob("checkpoint-*")]):
                shutil.rmtree(folder / heavy, ignore_errors=True)  # weights and data: not figures
            if rc == 0 and steps:
                timed = steps[1:] or steps  # the first step compiles / warms up
                med = sorted(r["step_time_s"] for r in timed)[len(timed) // 2]
                tflops = sorted(r.get("tflops_per_device", 0.0) for r in timed)[len(timed) // 2]
                peak = None if run.dry_run else next(
                    (v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() == gpu), None)
                ref = []
                if (folder / "reference_times.json").exists():
                    ref = json.loads((folder / "reference_times.json").read_text())
                # one reference forward per micro-batch, micro-batches = steps here (batch 1)
                ref_share = (sorted(ref[1:] or ref)[len(ref[1:] or ref) // 2] / med) if ref else None
                out[label] = dict(frames=frames, step_time_s=med, tflops_per_device=tflops,
                                  reference_share=round(ref_share, 3) if ref_share else None,
                                  mfu=round(tflops / peak, 3) if peak and tflops else None,
                                  peak_mem_gb=max(r.get("peak_mem_gb", 0) for r in timed), steps=len(steps))
                break
            out[label] = dict(frames=frames, error=f"exit {rc} (train-{label}-f{frames}.log)")
            if run.left() < 60:
                break
        plan = [sys.executable, "-m", "pgdpo", "plan", "--config",
                str(ROOT / "configs" / "wan2.1-t2v-1.3b.yaml"), "--gpus", "1", "--gpu", gpu,
                "--train.batch_size", "1", "--data.frames", str(out[label]["frames"]), "--json"]
        if rank:
            plan += ["--model.lora_rank", str(rank), "--method.reference", "lora"]
        if run.dry_run:
            plan += ["--data.height", "32", "--data.width", "32", "--data.text_len", "8"]
        run.command(f"plan-{label}", plan, 60)
        try:
            text = (run.out / f"plan-{label}.log").read_text()
            plan = out[label]["plan"] = json.loads(text[text.index("{"):])
            per_video = plan["flops"]["per_video"]
            out[label].update(plan_step_s=plan["time"]["step_s"], plan_total_gib=round(plan["total_gib"], 2),
                              plan_reference_share=round(per_video["reference forward"]
                                                         / sum(per_video.values()), 3))
        except (ValueError, OSError, KeyError, TypeError):
            out[label]["plan"] = "unreadable (see the log)"
        (run.out / "train.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    return {k: {kk: vv for kk, vv in v.items() if kk != "plan"} for k, v in out.items()}


SECTIONS = (("env", env_section), ("tests", tests_section), ("loss", loss_section), ("graph", graph_section),
            ("sweep", sweep_section), ("train", train_section))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--train-step"]:
        return train_step_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the results (created)")
    p.add_argument("--archive", type=Path, help="a .tar.gz of --out, re-packed after each section")
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes, a 2-block "
                                                          "model slice: checks the script runs through")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop starting work after this many seconds (default 480)")
    p.add_argument("--sections", help=f"comma-separated subset of {', '.join(n for n, _ in SECTIONS)}")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before pgdpo.kernels is imported
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --dry-run to check the script on CPU")
    wanted = set(args.sections.split(",")) if args.sections else {n for n, _ in SECTIONS}
    unknown = wanted - {n for n, _ in SECTIONS}
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}")
    run = Run(args.out, args.archive, args.dry_run, args.budget_s)
    for name, fn in SECTIONS:
        if name in wanted:
            run.section(name, lambda fn=fn: fn(run))
    failed = [n for n, s in run.summary["sections"].items() if s["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
