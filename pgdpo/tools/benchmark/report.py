"""Writes a benchmark record as JSON, a markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from .cases import FLOOR_TENSORS
from .providers import PROVIDERS

COLORS = {"fused": "#1b9e77", "eager": "#d95f02", "compile": "#7570b3"}


def write_all(record: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    paths["md"].write_text(markdown(record))
    plot(record, paths["png"])
    return paths


def _ms(fig: dict | None) -> str:
    if not fig:
        return "-"
    if "error" in fig:
        return "error"
    return f"{fig['median_ms']:.3g} ({fig['p10_ms']:.3g}-{fig['p90_ms']:.3g})"


def _ratio(median, p10) -> str:
    return "-" if median is None else f"{median:.2f}x ({p10:.2f}x)"


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _providers(record: dict) -> list[str]:
    return [p for p in PROVIDERS if p in record["config"]["providers"]]


def markdown(record: dict) -> str:
    m, v, g, cfg = record["machine"], record["versions"], record["git"], record["config"]
    provs = _providers(record)
    bw = record["bandwidth"]
    dev = m.get("gpu_model") or m["cpu_model"]
    cuda = cfg["device"].startswith("cuda")
    budget = "" if cfg["budget_s"] is None else f" or {cfg['budget_s']:g} s"
    lines = [
        f"# pgdpo loss benchmark: {dev} ({cfg['device']})",
        "",
        f"- created {record['created']}, {record['duration_s']:.0f} s; "
        f"commit `{(g.get('commit') or '?')[:12]}`{' (dirty)' if g.get('dirty') else ''}",
        f"- python {v['python']}, torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}; "
        f"{m['cpus_available']} CPUs available, torch threads {m['torch_threads']}; "
        f"load average {record['load_average_start']} -> {record['load_average_end']}",
        f"- options: {', '.join(f'{k}={val}' for k, val in cfg['options'].items())}",
        f"- timing: {cfg['timing']}; providers interleaved round by round; warm-up {cfg['warmup']}, "
        f"up to {cfg['repeats']} repeats{budget} "
        f"per (case, pass); inputs rotated over sets totalling > 2x the "
        f"{_bytes(cfg['rotation_cache_bytes'])} last-level cache; Inductor caches "
        f"{cfg.get('inductor_caches', '?')}",
        f"- copy bandwidth ({bw['method']}): {bw['start']['gbps_median']:.1f} GB/s at the start "
        f"(p10-p90 {bw['start']['gbps_p10']:.1f}-{bw['start']['gbps_p90']:.1f}), "
        f"{bw['end']['gbps_median']:.1f} GB/s at the end; floor uses {bw['gbps_for_floor']:.1f} GB/s",
        "- times: median (p10-p90) in ms; speed-ups: ratio of medians (ratio of p10s), > 1: the first is "
        "faster; "
        "floor = " + ", ".join(f"{p} {n} tensors" for p, n in FLOOR_TENSORS.items())
        + " of 2B*N*itemsize bytes over the copy bandwidth",
    ]
    for note in record.get("notes", []):
        lines.append(f"- note: {note}")
    summ = record["summary"]
    verdict = ("all available providers agree" if summ["all_agree"]
               else "MISMATCH: " + ", ".join(summ["mismatches"]))
    lines.append(f"- verification against the float64 reference: {verdict}")
    for name, reason in summ["unavailable"].items():
        lines.append(f"- {name}: unavailable: {reason}")
    lines += ["", "## Time", ""]
    head = ["case", "shape", "dtype", "pass", "floor ms"] + [f"{p} ms" for p in provs]
    ratio_keys = [k for k in ("fused_vs_eager", "fused_vs_compile", "compile_vs_eager")
                  if all(x in provs for x in k.split("_vs_"))]
    head += [k.replace("_vs_", " vs ") for k in ratio_keys]
    if "fused" in provs:
        head += ["fused GB/s", "fused time/floor"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in record["cases"]:
        for pass_ in cfg["passes"]:
            row = [c["name"], "x".join(map(str, c["shape"])), c["dtype"], pass_,
                   f"{c['floor'][pass_]['ms']:.3g}"]
            for p in provs:
                e = c["providers"][p]
                row.append(_ms(e.get("passes", {}).get(pass_)) if e["available"] else "unavailable")
            row += [_ratio(c["speedups"][pass_].get(k), c["speedups"][pass_].get(k + "_p10"))
                    for k in ratio_keys]
            if "fused" in provs:
                fig = c["providers"]["fused"].get("passes", {}).get(pass_, {})
                row += [f"{fig['gbps']:.3g}" if "gbps" in fig else "-",
                        f"{fig['time_over_floor']:.2f}" if "time_over_floor" in fig else "-"]
            lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Agreement, first call, memory", "",
              "Errors against the float64 reference on the same inputs "
              "(grad rel = max abs err / max |grad|). "
              "First call = wall time of the first forward + backward (for `compile`: the compile time). "
              "Extra memory = peak allocated during one forward + backward, minus the inputs and the "
              "returned gradient.", "",
              "| case | dtype | provider | backend | agrees | loss abs err | grad rel err | stats abs err "
              "| first call s | extra memory | n (fwdbwd) |" + (" back-to-back fwdbwd ms |" if cuda else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for c in record["cases"]:
        for p in provs:
            e = c["providers"][p]
            if not e["available"]:
                lines.append(f"| {c['name']} | {c['dtype']} | {p} | {e['backend']} | unavailable: "
                             f"{e.get('reason', '?')} | | | | | | |" + (" |" if cuda else ""))
                continue
            ver, mem = e["verify"], e.get("memory", {})
            extra = _bytes(mem["extra_bytes"]) if "extra_bytes" in mem else mem.get("reason", "-")
            fb = e["passes"].get("fwdbwd", {})
            n = fb.get("n", "-")
            b2b = (f" {fb['back_to_back_ms']:.3g} |" if "back_to_back_ms" in fb else " - |") if cuda else ""
            lines.append(
                f"| {c['name']} | {c['dtype']} | {p} | {e['backend']} | {'yes' if ver['ok'] else '**NO**'} "
                f"| {ver['loss_max_abs_err']:.2g} | {ver['grad_max_rel_err']:.2g} | "
                f"{ver['stats_max_abs_err']:.2g} ({ver['stats_worst']}) | {e['first_call_s']:.3g} | "
                f"{extra} | {n} |{b2b}")
    if cfg["device"].startswith("cpu") and cfg.get("memory", True):
        lines += ["", "CPU extra memory counts tensors from torch's CPU allocator (torch.profiler memory "
                  "events); scratch a C++ kernel takes with malloc/new is not seen."]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = _providers(record)
    passes = record["config"]["passes"]
    cases = record["cases"]
    labels = [f"{c['name']}\n{c['dtype']}" for c in cases]
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(6.0, 1.3 * len(cases) + 2), 3.2 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(1, len(provs))
    for ax, pass_ in zip(axes[:, 0], passes):
        for k, p in enumerate(provs):
            xs, ys, lo, hi = [], [], [], []
            for i, c in enumerate(cases):
                fig_ = c["providers"][p].get("passes", {}).get(pass_, {})
                if "median_ms" not in fig_:
                    continue
                xs.append(i + (k - (len(provs) - 1) / 2) * width)
                ys.append(fig_["median_ms"])
                lo.append(fig_["median_ms"] - fig_["p10_ms"])
                hi.append(fig_["p90_ms"] - fig_["median_ms"])
            if xs:
                ax.bar(xs, ys, width, label=p, color=COLORS.get(p), yerr=[lo, hi], capsize=2,
                       error_kw={"elinewidth": 0.8})
            else:  # keep it in the legend, saying why there are no bars
                ax.bar([], [], width, label=f"{p} (unavailable)", color=COLORS.get(p), alpha=0.3)
        for i, c in enumerate(cases):
            ms = c["floor"][pass_].get("ms")
            if ms:
                ax.hlines(ms, i - 0.45, i + 0.45, colors="k", linestyles="dashed", linewidth=0.8,
                          label="floor" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_ylabel(f"{pass_} ms (median, p10-p90)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(provs) + 1)
    dev = record["machine"].get("gpu_model") or record["machine"]["cpu_model"]
    commit = (record["git"].get("commit") or "?")[:10] + ("+dirty" if record["git"].get("dirty") else "")
    axes[0, 0].set_title(f"pgdpo loss: {dev}, torch {record['versions']['torch']}, {commit}; "
                         "bars: median, whiskers: p10-p90, dashed: floor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
