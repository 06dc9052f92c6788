"""PNG plots of a run (matplotlib, Agg backend, imported only here and only when plotting).

forward_throughput.png: forward GFLOP/s vs sequence length, one line per implementation, one
    panel per (dtype, causal, B, H, D) group, with the measured GEMM peak as a dashed line.
speedup.png: speed-up vs torch SDPA, one panel per suite, grouped bars per case.
"""

from __future__ import annotations

import os
import time

from .common import BASELINE, SHORT_DTYPES, Result

COLORS = {"fusedattn": "#1f77b4", "torch-sdpa": "#ff7f0e", "naive-torch": "#2ca02c",
          "torch-sdpa-flash": "#d62728", "torch-sdpa-efficient": "#8c564b", "torch-sdpa-cudnn": "#e377c2",
          "fusedattn-cpu": "#9467bd"}
SUITE_TITLES = {
    "fwd": "fwd: attention forward",
    "bwd": "bwd: attention backward alone",
    "decode": "decode: 1 query token vs a KV cache (GB/s of K/V)",
    "block": "block: TransformerBlock forward + backward",
    "lm": "lm: TransformerLM.generate (tokens/s)",
}


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(name: str) -> str:
    return COLORS.get(name, "#7f7f7f")


def _dtype(result: Result) -> str:
    return SHORT_DTYPES.get(result.dtype, result.dtype)


def plot_forward(plt, results: list[Result], peaks, subtitle: str, path: str) -> bool:
    """Forward GFLOP/s vs L per implementation; False when there are no fwd results."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if r.suite == "fwd" and r.throughput is not None:
            key = (r.dtype, bool(r.causal), r.params["B"], r.params["H"], r.params["D"])
            groups.setdefault(key, []).append(r)
    if not groups:
        return False
    count = len(groups)
    columns = min(count, 2)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(max(8.5, 6.4 * columns), 4.6 * rows + 1.0), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    for ax, ((dtype, causal, batch, heads, head_dim), group) in zip(axes.flat, groups.items()):
        impls = list(dict.fromkeys(r.impl for r in group))
        for impl in impls:
            points = sorted((r.params["L"], r.throughput) for r in group if r.impl == impl)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl, color=_color(impl),
                    linewidth=2 if impl == "fusedattn" else 1.4)
        peak = peaks.flops(dtype)
        ax.axhline(peak, linestyle="--", color="black", linewidth=1, label="GEMM peak (measured in the run)")
        seqlens = sorted({r.params["L"] for r in group})
        peak_dtype = dtype if dtype in getattr(peaks, "gemm", {}) else "float32"
        ax.annotate(f"{SHORT_DTYPES.get(peak_dtype, peak_dtype)} GEMM: {peak:.0f} GFLOP/s", (seqlens[0], peak),
                    textcoords="offset points", xytext=(2, 3), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens)
        ax.set_xticklabels([str(s) for s in seqlens])
        ax.minorticks_off()
        ax.set_ylim(0, max(peak, max(r.throughput for r in group)) * 1.12)
        ax.set_xlabel("sequence length L (= Lq = Lk)")
        ax.set_ylabel("GFLOP/s  (4·B·H·L²·D / time)")
        ax.set_title(f"{SHORT_DTYPES.get(dtype, dtype)}, {'causal' if causal else 'non-causal'}, "
                     f"B={batch} H={heads} D={head_dim}", fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    try:  # one legend for all panels, below them (matplotlib >= 3.7)
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
    except ValueError:
        axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Attention forward throughput vs sequence length (higher is better)\n{subtitle}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedups(plt, results: list[Result], subtitle: str, path: str) -> bool:
    """Speed-up vs torch SDPA per case, one panel per suite; False when nothing has a speed-up."""
    suites = list(dict.fromkeys(r.suite for r in results if r.speedup_vs_sdpa is not None))
    if not suites:
        return False
    cases_per_suite = {}
    for suite in suites:
        cases = []
        for r in results:
            if r.suite == suite:
                label = f"{r.shape}\n{_dtype(r)}{' causal' if r.causal and suite in ('fwd', 'bwd') else ''}"
                if label not in cases:
                    cases.append(label)
        cases_per_suite[suite] = cases
    widest = max(len(c) for c in cases_per_suite.values())
    fig, axes = plt.subplots(len(suites), 1, figsize=(max(9.0, 1.5 * widest + 3), 3.3 * len(suites) + 1.0),
                             squeeze=False, layout="constrained")
    for ax, suite in zip(axes[:, 0], suites):
        rows = [r for r in results if r.suite == suite]
        impls = [i for i in dict.fromkeys(r.impl for r in rows) if i != BASELINE]
        cases = cases_per_suite[suite]
        width = min(0.8 / max(len(impls), 1), 0.3)
        top = 1.0
        for index, impl in enumerate(impls):
            xs, ys = [], []
            for r in rows:
                if r.impl == impl and r.speedup_vs_sdpa is not None:
                    label = f"{r.shape}\n{_dtype(r)}{' causal' if r.causal and suite in ('fwd', 'bwd') else ''}"
                    xs.append(cases.index(label) + (index - (len(impls) - 1) / 2) * width)
                    ys.append(r.speedup_vs_sdpa)
            bars = ax.bar(xs, ys, width=width * 0.95, label=impl, color=_color(impl))
            ax.bar_label(bars, labels=[f"{y:.2f}×" for y in ys], fontsize=7, padding=1)
            top = max([top] + ys)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="torch SDPA (= 1)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_xlim(-0.6, len(cases) - 0.4 if len(cases) > 1 else 0.6)
        ax.set_ylim(0, top * 1.18)
        ax.set_ylabel("speed-up vs SDPA (×)")
        ax.set_title(SUITE_TITLES.get(suite, suite), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"Speed-up vs torch SDPA per suite (SDPA time / implementation time; higher is better)\n"
                 f"{subtitle}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: list[Result], peaks, machine: str, out_dir: str, torch_version: str) -> list[str]:
    """Writes the PNGs into out_dir; returns their paths ([] with a message without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        print("matplotlib is not installed: no plots (pip install matplotlib, or fusedattn[bench])")
        return []
    subtitle = (f"{machine}\ntorch {torch_version}, {time.strftime('%Y-%m-%d %H:%M')}, "
                f"medians of interleaved runs")
    paths = []
    forward = os.path.join(out_dir, "forward_throughput.png")
    if plot_forward(plt, results, peaks, subtitle, forward):
        paths.append(forward)
    speedup = os.path.join(out_dir, "speedup.png")
    if plot_speedups(plt, results, subtitle, speedup):
        paths.append(speedup)
    return paths
