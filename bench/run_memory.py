"""Every byte of a whole ``pgdpo train`` run, per rank: the measured peak beside the sum of its named terms.

    MALLOC_MMAP_THRESHOLD_=1048576 python -m bench.run_memory       # results in bench/results/run-memory
    python -m bench.run_memory --out bench/results/run-memory-default-malloc   # glibc's defaults
    python -m bench.run_memory --checkpointing true false            # both, for the difference

A 304M-parameter Wan-shaped transformer (Wan2.1 1.3B's width with 6 blocks: 1.23 GB in fp32) is saved
once with diffusers' ``save_pretrained`` (``--model-dir``); then a whole run on it under ``torchrun``
(2 processes, gloo, FSDP2): setup, validation at step 0, 2 steps of a LoRA policy (rank 16) with the
adapters-off reference, a checkpoint, validation at the end, the final export. Data: the demo's shapes
(latents [16, 5, 8, 8], 80 tokens per video, 16 text tokens), one pair per rank per step.

Each rank reports, above its ``baseline`` (VmRSS after the imports and the process group):

- the peak resident memory (VmHWM, reset through ``/proc/self/clear_refs`` at each phase's start) of each
  phase: setup, validation, steps, checkpoint, export; the run's peak is the largest;
- where in the step the peak was: a sampler thread reads VmRSS every millisecond and the transformer
  blocks' forward pre-hooks mark forward, reference forward (no grad) and recompute (inside backward);
- the terms of :mod:`pgdpo.train.memory` for this model and layout, and their sum.

Figures in units of the model's fp32 size (the issue's yardstick; target for checkpointing on: <= 1.10x
on every rank). ``MALLOC_MMAP_THRESHOLD_=1048576`` gives every buffer of 1 MiB or more its own mapping,
returned when freed, so that the peaks are live memory plus the small-chunk heap the trainer trims
(:mod:`pgdpo.train.host_memory`). With glibc's defaults (the threshold rises as buffers are freed) the
heap holds more and the peaks read a few hundredths higher (``results/run-memory-default-malloc``; the
script says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.setup_memory import ENV, reset_peak, status_kb

REPO = Path(__file__).resolve().parent.parent
#: Wan2.1 1.3B's width (12 heads x 128, ffn 8960, text_dim 4096) with 6 blocks: 304.4M parameters
MODEL = {"num_layers": 6}
LORA = {"rank": 16, "targets": ("to_q", "to_k", "to_v", "to_out.0")}
#: the demo's video shape: latents [16, 5, 8, 8] -> 80 tokens per video
DATA = {"height": 64, "width": 64, "frames": 17, "text_len": 16}
PHASES = ("setup", "validation", "step", "checkpoint", "export")


def save_model(model_dir: Path) -> dict:
    from pgdpo.train.models import MODEL_CONFIGS, build_model, count_parameters

    config = {**MODEL_CONFIGS["wan2.1-t2v-1.3b"], **MODEL}
    folder = model_dir / "transformer"
    if not (folder / "config.json").is_file():
        print(f"saving a {MODEL} Wan transformer to {folder} ...", flush=True)
        build_model(config, seed=0).save_pretrained(folder, max_shard_size="10GB")
    n = count_parameters(build_model(config, device="meta"))
    return {"path": str(folder), "parameters": n, "fp32_bytes": 4 * n, "config": MODEL}


class Sampler:
    """VmRSS every ``interval`` s in a thread (torch ops release the GIL), and labelled events."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.samples, self.events = interval, [], []
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._lock = threading.Lock()  # one statm file object, read by the thread and by mark()
        self._fd = open("/proc/self/statm")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with self._lock:
            self._fd.seek(0)
            return int(self._fd.read().split()[1]) * self._page

    def _run(self):
        last = -1
        while not self._stop.wait(self.interval):
            r = self.rss()
            if abs(r - last) >= 1 << 20:  # keep the trace small: changes of a MiB or more
                self.samples.append((time.perf_counter(), r))
                last = r

    def mark(self, label: str) -> None:
        self.events.append((time.perf_counter(), label, self.rss()))

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def trace(self, t0: float, t1: float) -> list[list]:
        """``[seconds from t0, event, VmRSS at it, largest VmRSS until the next event]`` in [t0, t1]."""
        events = [e for e in self.events if t0 <= e[0] <= t1]
        out = []
        for i, (t, label, rss) in enumerate(events):
            end = events[i + 1][0] if i + 1 < len(events) else t1
            top = max([r for ts, r in self.samples if t <= ts <= end] + [rss])
            out.append([round(t - t0, 4), label, rss, top])
        return out

    def where(self, t0: float, t1: float) -> dict | None:
        """The largest sample in [t0, t1] and the last event before it."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return None
        t, r = max(inside, key=lambda s: s[1])
        before = [e for e in self.events if e[0] <= t]
        return {"rss": r, "after_event": before[-1][1] if before else None,
                "seconds_after_event": t - before[-1][0] if before else None}


def model_terms(arch: dict, layout: dict, tokens: int, options: dict, writer: bool) -> tuple[dict, int]:
    """The step's terms (:func:`pgdpo.train.memory.step_peak_terms`) and the export's, in bytes, of a
    rank of the run ``layout`` (``Layout.as_dict()``) describes."""
    from pgdpo.train import memory
    from pgdpo.train.export import MAX_SHARD_SIZE
    from pgdpo.train.models import spec_for

    lora = bool(layout["lora_rank"])
    table = memory.parameter_table(arch, layout["lora_rank"], tuple(layout["lora_targets"]))
    dims = spec_for(arch).transformer_dims()
    terms = memory.step_peak_terms(
        table, ranks=layout["shard_degree"] if layout["strategy"] == "fsdp" else 1,
        precision=options["precision"], lora=lora, reference=layout["reference"], dim=dims["dim"],
        ffn_dim=dims["ffn_dim"], videos=2 * layout["micro_batch_size"], tokens=tokens,
        text_len=options["text_len"], checkpoint_every=layout["checkpoint_every"],
        sp_degree=layout["sp_degree"], reference_sharded=options["reference_sharded"],
        reshard_after_forward=options["reshard_after_forward"], backend=options.get("backend", "nccl"))
    export = memory.export_bytes(memory.counts(table, lora=lora), lora=lora, max_shard_size=MAX_SHARD_SIZE,
                                 writer=writer)
    return terms, export


def rerender(path: Path, out: Path) -> None:
    """Recompute the terms of a saved result with the current formulas (the measurements unchanged) and
    write its JSON and markdown to ``out``."""
    from pgdpo.tools.benchmark.machine import git_info
    from pgdpo.train.models import MODEL_CONFIGS

    result = json.loads(path.read_text())
    arch = {**MODEL_CONFIGS["wan2.1-t2v-1.3b"], **result["model"]["config"]}
    for run_ in result["runs"]:
        for r in run_["ranks"]:
            # runs from before pgdpo's in-place gloo all-gather (no "backend" recorded) held a third
            # block-sized buffer (gloo's staging): the nccl terms model them
            options = r.get("options") or {"reference_sharded": True, "reshard_after_forward": True,
                                           "text_len": DATA["text_len"], "precision": "fp32"}
            r["terms"], r["export_term"] = model_terms(arch, r["layout"], r["tokens"], options,
                                                       writer=r["rank"] == 0)
        run_["summary"] = [summarize(r, result["model"]["fp32_bytes"]) for r in run_["ranks"]]
    result["terms_from"] = {"git": git_info(), "note": "terms recomputed by --rerender from the layout the "
                            "run recorded; the measurements are the run's"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "run_memory.md").write_text(markdown(result))


def worker(args) -> None:
    """One rank: the whole run through ``Trainer.train``, each phase's peak; a JSON line to --report."""
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401 - the imports belong to the baseline
    import peft  # noqa: F401

    import pgdpo.train.trainer as trainer_module
    from pgdpo.train.cli import resolve
    from pgdpo.train.distributed import init_distributed
    from pgdpo.train.layout import model_architecture, resolve_layout
    from pgdpo.train.models import adapter_for

    cfg, _ = resolve(args.train_args)
    dist = init_distributed(cfg.distributed, cfg.device)  # the process group belongs to the baseline
    layout = resolve_layout(cfg, dist.world_size)
    arch = model_architecture(cfg)
    baseline = status_kb("VmRSS")
    sampler = Sampler().start()
    phases: dict[str, dict] = {}

    def measure(name, fn, *a, **k):
        if not reset_peak():
            raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs): the peaks need it")
        sampler.mark(f"{name} start")
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            t1 = time.perf_counter()
            peak = status_kb("VmHWM")
            sampler.mark(f"{name} end")
            row = phases.setdefault(name, {"peak": 0, "count": 0, "seconds": 0.0})
            row["count"] += 1
            row["seconds"] += t1 - t0
            if peak >= row["peak"]:
                row.update(peak=peak, where=sampler.where(t0, t1))
                if name == "step":
                    row["trace"] = sampler.trace(t0, t1)

    trainer = measure("setup", trainer_module.Trainer, cfg)
    after_setup = status_kb("VmRSS")
    step_fn, save_fn, finish_fn = trainer.train_step, trainer.save, trainer.finish_pending_save
    trainer.train_step = lambda *a, **k: measure("step", step_fn, *a, **k)
    trainer.save = lambda *a, **k: measure("checkpoint", save_fn, *a, **k)
    trainer.finish_pending_save = lambda *a, **k: measure("checkpoint", finish_fn, *a, **k)
    if trainer.validator is not None:
        run_fn = trainer.validator.run
        trainer.validator.run = lambda *a, **k: measure("validation", run_fn, *a, **k)
    export_fn = trainer_module.export_model
    trainer_module.export_model = lambda *a, **k: measure("export", export_fn, *a, **k)

    # the collectives FSDP2 issues (torch.distributed's own functions, wrapped to mark the trace; on gloo
    # its all-gathers are pgdpo's in-place broadcasts, one per rank)
    for fn_name in ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                    "reduce_scatter_tensor", "broadcast"):
        collective = getattr(torch.distributed, fn_name, None)
        if collective is None:
            continue

        def marked(output, *a, _fn=collective, _name=fn_name, **k):
            sampler.mark(f"{_name} {output.numel() * output.element_size() / 1e6:.1f} MB")
            return _fn(output, *a, **k)
        setattr(torch.distributed, fn_name, marked)

    blocks = adapter_for(trainer.model).blocks(trainer.model)
    for i, block in enumerate(blocks):
        def pre(module, inputs, i=i):
            graph = getattr(torch._C, "_current_graph_task_id", lambda: -1)()
            kind = ("recompute" if graph != -1 else "forward" if torch.is_grad_enabled()
                    else "no-grad forward")
            sampler.mark(f"block {i} {kind}")
        block.register_forward_pre_hook(pre)
    try:
        trainer.train()
    finally:
        trainer_module.export_model = export_fn
        sampler.stop()

    spec = layout.spec
    latent = spec.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
    precision = "fp32" if dist.device.type == "cpu" else cfg.model.precision  # CPU computes in fp32
    options = {"reference_sharded": cfg.distributed.reference_sharded,
               "reshard_after_forward": cfg.distributed.reshard_after_forward, "text_len": cfg.data.text_len,
               "precision": precision, "backend": torch.distributed.get_backend()}
    terms, export = model_terms(arch, layout.as_dict(), spec.tokens_per_sample(latent), options, dist.is_main)
    record = {"rank": dist.rank, "world_size": dist.world_size, "baseline": baseline,
              "after_setup": after_setup, "phases": phases, "terms": terms, "export_term": export,
              "checkpointing": layout.checkpoint_every, "tokens": spec.tokens_per_sample(latent),
              "layout": layout.as_dict(), "options": options}
    with open(args.report, "a") as f:
        f.write(json.dumps(record) + "\n")
    trainer.close()


def run(model: dict, procs: int, checkpointing: str, work: Path) -> list[dict]:
    report = work / f"run-report-{procs}-{checkpointing}.jsonl"
    report.unlink(missing_ok=True)
    train_args = ["--config", str(REPO / "configs" / "demo.yaml"), "--output-dir", str(work / "run"),
                  "--overwrite", "--model.path", model["path"], "--model.precision", "fp32",
                  "--model.lora_rank", str(LORA["rank"]), "--model.lora_targets", ",".join(LORA["targets"]),
                  "--method.reference", "lora", "--model.gradient_checkpointing", checkpointing,
                  "--data.path", "{output_dir}/data", "--data.synthesize", "true", "--data.synth_pairs", "8",
                  *[x for k, v in DATA.items() for x in (f"--data.{k}", str(v))],
                  "--train.batch_size", str(procs), "--train.micro_batch_size", "1", "--max-steps", "2",
                  "--save-every", "2", "--validation.every", "2", "--validation.num_prompts", str(procs),
                  "--validation.num_seeds", "1", "--validation.steps", "2",
                  "--logging.trackers", "[]", "--logging.progress", "false", "--logging.plots", "false",
                  "--optim.warmup_steps", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "bench.run_memory", "--worker", "--report", str(report), "--", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"{procs} processes, checkpointing {checkpointing}: {' '.join(train_args)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = work / f"run-{procs}-{checkpointing}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the run failed; its output: {log}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["rank"])


def summarize(rank: dict, size: int) -> dict:
    """The rank's figures in units of the fp32 model, above its baseline."""
    base = rank["baseline"]
    phases = {k: (v["peak"] - base) / size for k, v in rank["phases"].items()}
    peak_phase = max(phases, key=phases.get)
    terms = {k: v / size for k, v in rank["terms"].items()}
    return {"peak": phases[peak_phase], "peak_phase": peak_phase,
            "peak_where": rank["phases"][peak_phase].get("where"), "phases": phases,
            "after_setup": (rank["after_setup"] - base) / size, "terms": terms, "sum": sum(terms.values()),
            "export_term": rank["export_term"] / size}


def markdown(result: dict) -> str:
    m = result["model"]
    size = m["fp32_bytes"]
    lines = [f"# pgdpo train: a whole run's memory, per rank ({m['parameters'] / 1e6:.1f}M-parameter Wan, "
             f"{m['config']['num_layers']} blocks, fp32 {size / 1e9:.2f} GB)", "",
             f"machine: {result['machine'].get('cpu_model', '?')}, {result['machine'].get('cpus_available')} "
             f"CPUs, {(result['machine'].get('memory_bytes') or 0) / 2**30:.0f} GiB; "
             f"torch {result['versions'].get('torch')}, diffusers {result['versions'].get('diffusers')}, "
             f"peft {result['versions'].get('peft')}; commit {(result['git'].get('commit') or '?')[:10]}"
             f"{' (dirty)' if result['git'].get('dirty') else ''}; environment: {result.get('env')}", "",
             "2 processes (torchrun, gloo, FSDP2), LoRA rank 16 (to_q/k/v/out.0) with the adapters-off "
             "reference, model loaded from a saved diffusers folder, CPU compute in fp32; setup, validation "
             "(step 0 and end), 2 steps of one pair per rank (80 tokens per video), a checkpoint, the final "
             "LoRA export. Units: the model's fp32 size (x) above the rank's baseline (imports + process "
             "group). Terms: pgdpo.train.memory (formulas over the parameter counts)"
             + (f"; recomputed at commit {(result['terms_from']['git'].get('commit') or '?')[:10]} from "
                "the layout the run recorded (the measurements are the run's)"
                if result.get("terms_from") else "")
             + ".", ""]
    for run in result["runs"]:
        ranks = [summarize(r, size) for r in run["ranks"]]
        lines += [f"## activation checkpointing {run['checkpointing']}", "",
                  "| term | " + " | ".join(f"rank {r['rank']}" for r in run["ranks"]) + " |",
                  "|---|" + "---|" * len(ranks)]
        for term in ranks[0]["terms"]:
            lines.append(f"| {term} | " + " | ".join(f"{s['terms'][term]:.3f}" for s in ranks) + " |")
        lines.append("| **sum of the terms** | " + " | ".join(f"**{s['sum']:.3f}**" for s in ranks) + " |")
        lines.append("| **measured peak** | " + " | ".join(
            f"**{s['peak']:.3f}** ({s['peak_phase']})" for s in ranks) + " |")
        lines.append("| measured - sum (not in the terms) | " + " | ".join(
            f"{s['peak'] - s['sum']:+.3f}" for s in ranks) + " |")
        lines.append("| peak location | " + " | ".join(
            f"{(s['peak_where'] or {}).get('after_event')}" for s in ranks) + " |")
        lines.append("| resident after setup (shard) | "
                     + " | ".join(f"{s['after_setup']:.3f}" for s in ranks) + " |")
        for phase in PHASES:
            if phase in ranks[0]["phases"]:
                lines.append(f"| peak in {phase} | " + " | ".join(f"{s['phases'][phase]:.3f}" for s in ranks)
                             + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "pgdpo-bench-wan304m-6blocks"),
                   help="where the model is saved (reused when present)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--checkpointing", nargs="*", default=["auto"], choices=["auto", "true", "false"],
                   help="model.gradient_checkpointing of each run (auto: on for this model)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "run-memory"))
    p.add_argument("--rerender", metavar="JSON",
                   help="recompute the terms of a saved run_memory.json with the current formulas; write "
                        "to --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.add_argument("train_args", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args)
        return 0
    if args.rerender:
        rerender(Path(args.rerender), Path(args.out))
        print(f"wrote {Path(args.out) / 'run_memory.md'}")
        return 0
    import torch

    from pgdpo.tools.benchmark.machine import git_info, machine_info, versions

    if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        print("note: MALLOC_MMAP_THRESHOLD_ is not set: glibc's heap holds more of the freed buffers; the "
              "peaks include what it keeps between the trainer's trims", flush=True)
    git = git_info()
    model_dir = Path(args.model_dir)
    model = save_model(model_dir)
    runs = []
    for checkpointing in args.checkpointing:
        ranks = run(model, args.procs, checkpointing, model_dir)
        runs.append({"checkpointing": checkpointing, "resolved_checkpoint_every": ranks[0]["checkpointing"],
                     "ranks": ranks, "summary": [summarize(r, model["fp32_bytes"]) for r in ranks]})
        for s, r in zip(runs[-1]["summary"], ranks):
            print(f"  rank {r['rank']}: peak {s['peak']:.3f}x ({s['peak_phase']}, after "
                  f"{(s['peak_where'] or {}).get('after_event')}), sum of terms {s['sum']:.3f}x", flush=True)
    import diffusers
    import peft
    import safetensors

    vers = {**versions(), "diffusers": diffusers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__}
    result = {"model": {k: v for k, v in model.items() if k != "path"}, "runs": runs,
              "machine": machine_info(torch.device("cpu")), "versions": vers,
              "env": {k: os.environ.get(k) for k in ENV}, "git": git,
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "run_memory.md").write_text(markdown(result))
    print(f"wrote {out / 'run_memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
