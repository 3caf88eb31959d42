"""PNG plots of bench reports and probe accuracies (matplotlib's Agg canvas; no display, no pyplot state)."""

from __future__ import annotations

from pathlib import Path

from ..convert.checkpoint_io import check_output_file
from .lengths import format_length
from .probes import ProbeResult, summarize

LINE_STYLES = ("-", "--", ":", "-.")
BENCH_PANELS = (
    ("prefill_tokens_per_s", "prefill tokens/s", True),
    ("decode_tokens_per_s", "decode tokens/s", True),
    ("decode_latency_ms_p50", "decode latency p50 (ms/step)", True),
    ("cache_bytes", "cache (MiB)", True),
)


def _figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def compact_number(value: float) -> str:
    """Axis labels people read at a glance: ``1500`` → ``1.5K``, ``16384`` → ``16K``, ``2e6`` → ``2M``, ``0.25``."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _length_axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_length(n).upper() for n in lengths])
    ax.minorticks_off()


def _log_value_axis(ax) -> None:
    """Log y axis labelled at 1, 2, 5 x 10^k as plain numbers (1K, 2K, 5K), not ``4×10⁰`` minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: compact_number(value)))
    ax.yaxis.set_minor_locator(NullLocator())


def plot_bench(report: dict, path: str | Path) -> Path:
    """One panel per measure against context length, one line per model and batch (shaded: min-max over the
    repeats); OOM points are left out.

    ``report`` is :meth:`BenchReport.to_dict` output (also what ``bench --json`` writes).
    """
    runs = report["runs"]
    contexts = sorted({r["context"] for r in runs})
    fig, axes = _figure(2, 2, 11, 7.5)
    models = list(dict.fromkeys(r["model"] for r in runs))
    batches = sorted({r["batch"] for r in runs})
    series = [(model, batch) for model in models for batch in batches]
    for ax, (field, label, log) in zip(axes.flat, BENCH_PANELS):
        for model, batch in series:  # colour: model; line style: batch
            points = [(r["context"], r[field]) for r in runs
                      if (r["model"], r["batch"]) == (model, batch) and r["status"] == "ok" and r[field] is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            ys = [y / 2**20 for y in ys] if field == "cache_bytes" else ys
            color = f"C{models.index(model) % 10}"
            ax.plot(xs, ys, marker="o", color=color,
                    linestyle=LINE_STYLES[batches.index(batch) % len(LINE_STYLES)], label=f"{model}, batch {batch}")
            spread = [(r["context"], r.get(f"{field}_min"), r.get(f"{field}_max")) for r in runs
                      if (r["model"], r["batch"]) == (model, batch) and r["status"] == "ok"]
            if spread and all(low is not None and high is not None for _, low, high in spread):
                ax.fill_between(*zip(*spread), color=color, alpha=0.15, linewidth=0)  # min-max over the repeats
        _length_axis(ax, contexts)
        if log:
            _log_value_axis(ax)
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)))
    fig.suptitle(f"{report.get('device_name', '')} {report.get('dtype', '')}, kernels: "
                 f"{', '.join(sorted(set(report.get('kernels', {}).get('ops', {}).values()))) or '-'}")
    path = check_output_file(path, inputs=[m.get("path") for m in report.get("models", {}).values()])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_probes(results: dict[str, list[ProbeResult]], path: str | Path) -> Path:
    """Accuracy against length, one panel per probe, one line per model (needle depths averaged)."""
    probes = sorted({r.probe for rows in results.values() for r in rows})
    if not probes:
        raise ValueError("no probe results to plot")
    fig, axes = _figure(1, len(probes), 4.5 * len(probes), 3.8)
    for ax, probe in zip(axes.flat, probes):
        lengths = sorted({r.length for rows in results.values() for r in rows if r.probe == probe})
        for name, rows in results.items():
            means = summarize([r for r in rows if r.probe == probe])
            points = sorted((length, acc) for (_, length), acc in means.items())
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        _length_axis(ax, lengths)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(probe)
        ax.grid(True, alpha=0.3)
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
