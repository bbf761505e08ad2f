"""The report as a markdown table and a bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = ("× encoder GEMM: ms over the dense encoder GEMM x·W_encᵀ (writing the N × J·M pre-activations) "
           "measured in the same rounds; × peak-FLOP floor: ms over 2·N·d·J·M / measured peak FLOP/s, what the call "
           "would cost if everything but the encoder GEMM were free and the GEMM ran at the measured peak "
           "(– : the case has no encoder GEMM, or the report predates the column)")
"""The legend under the table's header line: what the two floor columns divide by."""


def _ratio(value: float | None) -> str:
    return f"{value:,.2f}" if value else "–"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per (shape, case, backend), under a header line (device, versions,
    peaks) and the :data:`COLUMNS` legend. "× encoder GEMM" is ``ms / floor_ms`` (how far above the measured dense
    encoder GEMM alone the backend is); "× peak-FLOP floor" is the row's ``ratio_to_flop_floor``, ``ms /
    floor_flop_ms`` with ``floor_flop_ms = 2·N·d·J·M / peak_flops``. A report written before a column existed (a
    re-read old JSON) shows "–" in it."""
    lines = [f"{report['device']}, torch {report['torch']}, commit {report['commit']}, preset {report['preset']}; "
             f"measured peaks {report['peak_flops'] / 1e9:.0f} GFLOP/s, {report['peak_bytes_per_s'] / 1e9:.1f} GB/s",
             "", COLUMNS + ".",
             "", "| shape | case | backend | ms | tokens/s | × eager loop | × encoder GEMM | × peak-FLOP floor "
             "| nominal % of peak FLOP/s | peak mem (MB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["results"]:
        mem = f"{row['peak_mem_bytes'] / 2**20:,.0f}" if row.get("peak_mem_bytes") else "–"
        if row["ok"]:
            tokens = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "–"
            floor = row["ms"] / row["floor_ms"] if row.get("floor_ms") else None
            cells = [f"{row['ms']:,.1f}", tokens, _ratio(row.get("speedup_vs_eager_loop")), _ratio(floor),
                     _ratio(row.get("ratio_to_flop_floor")), f"{100 * row['fraction_of_peak_flops']:.0f}", mem]
        else:
            cells = ["error: " + row["error"].replace("|", "\\|"), "", "", "", "", "", ""]
        lines.append(f"| {row['shape']['name']} | {row['case']} | {row['backend']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Bar chart of the speedup over the eager loop, one group per (shape, case) (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["shape"]["name"], r["case"]) for r in report["results"]))
    backends = list(dict.fromkeys(r["backend"] for r in report["results"] if r["ok"]))  # the ones with a number
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4), constrained_layout=True)
    for b, backend in enumerate(backends):
        values = []
        for shape, case in groups:
            row = next((r for r in report["results"] if (r["shape"]["name"], r["case"], r["backend"])
                        == (shape, case, backend)), None)
            values.append(row["speedup_vs_eager_loop"] if row and row["ok"] and row["speedup_vs_eager_loop"] else 0)
        ax.bar([g + b * width for g in range(len(groups))], values, width, label=backend)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{c}\n{s}" for s, c in groups], fontsize=8)
    ax.axhline(1, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup over the eager per-member loop")
    ax.set_title(f"{report['device']} · preset {report['preset']} · commit {report['commit']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)