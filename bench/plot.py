"""Plot a concurrency sweep of bench/run.py: req/s and p99 latency against connections, one PNG.

    python bench/run.py --sweep 1,10,50,100,200,400 --duration 5 --json bench/results/sweep.json
    python bench/plot.py bench/results/sweep.json -o docs/performance-sweep.png

Two panels, one line per proxy (balancerpool, balancerpool-mypyc, haproxy, nginx), log x axis; with
--direct, the `direct` row (load generator straight at a backend, no proxy) is added as a grey dashed
reference. Rows that were skipped or had errors are left out, with a warning; points that bench/run.py
flagged as measured on a busy machine (other processes or steal above its thresholds) get a hollow
marker. Needs matplotlib (`pip install matplotlib`, or the `bench` extra); it draws with the Agg
backend, no display needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

#: Line order and colours; anything else in the file is drawn after these in matplotlib's colours.
STYLES: dict[str, dict[str, Any]] = {
    "balancerpool": {"color": "#d62728", "marker": "o", "linewidth": 2.2},
    "balancerpool-mypyc": {"color": "#ff7f0e", "marker": "D", "linewidth": 2.2},
    "haproxy": {"color": "#1f77b4", "marker": "s"},
    "nginx": {"color": "#2ca02c", "marker": "^"},
    "direct": {"color": "#7f7f7f", "marker": ".", "linestyle": "--", "linewidth": 1.0},
}
LABELS = {
    "balancerpool-mypyc": "balancerpool, compiled with mypyc",
    "direct": "direct (no proxy: load-side ceiling)",
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported here: matplotlib is an optional dependency)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise SystemExit("bench/plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


#: bench/run.py's thresholds for a disturbed run (NOISE_OTHER, NOISE_STEAL).
NOISE_OTHER = 0.05
NOISE_STEAL = 0.02


def series(results: list[dict[str, Any]]) -> dict[str, list[tuple[int, float, float, bool]]]:
    """(connections, req/s, p99 ms, disturbed) per target, sorted by connections; invalid rows left out."""
    lines: dict[str, list[tuple[int, float, float, bool]]] = {}
    for row in results:
        name, count = row["name"], row.get("connections")
        if row.get("skipped"):
            print(f"warning: {name} at {count} connections was skipped; not plotted", file=sys.stderr)
            continue
        if row.get("non_2xx_3xx") or any((row.get("socket_errors") or {}).values()):
            print(f"warning: {name} at {count} connections had errors; not plotted", file=sys.stderr)
            continue
        if count is None or row.get("rps") is None or row.get("p99_ms") is None:
            continue
        disturbed = (row.get("others_busy") or 0) > NOISE_OTHER or (row.get("core_steal") or 0) > NOISE_STEAL
        lines.setdefault(name, []).append((int(count), float(row["rps"]), float(row["p99_ms"]), disturbed))
    return {name: sorted(points) for name, points in lines.items()}


def plot(data: dict[str, Any], out: Path, direct: bool = False) -> None:
    plt = pyplot()
    lines = series(data["results"])
    if not direct:
        lines.pop("direct", None)
    if not lines:
        raise SystemExit("no valid rows to plot")
    order = [name for name in STYLES if name in lines] + [name for name in lines if name not in STYLES]
    any_noisy = False
    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in order:
        counts = [point[0] for point in lines[name]]
        style = {"linewidth": 1.6, "markersize": 5, **STYLES.get(name, {})}
        label = LABELS.get(name, name)
        rps_ax.plot(counts, [point[1] for point in lines[name]], label=label, **style)
        p99_ax.plot(counts, [point[2] for point in lines[name]], label=label, **style)
        noisy = [point for point in lines[name] if point[3]]
        if noisy:
            hollow = {**style, "linestyle": "none", "markerfacecolor": "white", "markersize": 7}
            rps_ax.plot([point[0] for point in noisy], [point[1] for point in noisy], **hollow)
            p99_ax.plot([point[0] for point in noisy], [point[2] for point in noisy], **hollow)
            any_noisy = True
    ticks = sorted({point[0] for points in lines.values() for point in points})
    for ax in (rps_ax, p99_ax):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(tick) for tick in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent keep-alive connections (log scale)")
        ax.grid(True, which="major", alpha=0.3)
    rps_ax.set_ylabel("requests / s")
    rps_ax.set_ylim(bottom=0)
    rps_ax.set_title("Throughput (higher is better)")
    rps_ax.yaxis.set_major_formatter(
        plt.FuncFormatter(lambda value, _: f"{value / 1000:.0f}k" if value else "0")
    )
    p99_ax.set_yscale("log")
    p99_ax.set_ylabel("p99 latency, ms (log scale)")
    p99_ax.set_title("p99 latency (lower is better)")
    p99_ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
    p99_ax.legend(loc="upper left", fontsize=9)
    machine = data.get("machine", {})
    params = data.get("params", {})
    fig.suptitle(
        f"One proxy core ({params.get('pinning', 'pinning unknown')}); "
        f"{machine.get('cpu_model', '?')}, {machine.get('nproc', '?')} CPUs; "
        f"{params.get('load_generator', '?')}, {params.get('duration_s', '?')} s per point; "
        f"{str(data.get('timestamp', ''))[:10]}",
        fontsize=9,
    )
    if any_noisy:
        fig.text(
            0.5,
            0.005,
            "hollow marker: measured on a busy machine (other processes took CPU)",
            ha="center",
            fontsize=8,
        )
    fig.tight_layout(rect=(0, 0.03 if any_noisy else 0, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="JSON written by bench/run.py --sweep")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/performance-sweep.png"))
    parser.add_argument("--direct", action="store_true", help="add the `direct` (no proxy) reference line")
    args = parser.parse_args()
    data = json.loads(args.sweep.read_text())
    plot(data, args.output, direct=args.direct)
    return 0


if __name__ == "__main__":
    sys.exit(main())
