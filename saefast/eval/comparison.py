"""Comparing trained runs as the paper does: single SAE, expanded SAE, bagging and boosting, over seeds.

Runs are grouped by what they are (family, members J, latents, k) and every metric is reported over the group's
seeds as mean ± the half-width of its 95 % Student-t interval (:mod:`.confidence`). Stability compares the seeds'
dictionaries pairwise, so it is the mean over the pairs. A claim "A beats B" is made only where the two intervals do
not overlap; otherwise the comparison says "not distinguishable".

Families: an ensemble's is its combine (``bagging``, ``boosting``). An SAE is the ``single`` SAE when it has the
ensembles' member size and k, and an ``expanded`` SAE when it has ``J·M`` latents: ``expanded (J·k)`` with ``J·k``
active (the ensemble's L0) or ``expanded (k)`` with ``k`` active; it is drawn at ``J`` members.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .confidence import compare_intervals, format_ci, mean_ci

FAMILY_ORDER = ("single", "expanded (J·k)", "expanded (k)", "SAE", "bagging", "boosting")

METRICS: tuple[tuple[str, str, bool], ...] = (
    ("explained_variance", "EV", True),
    ("stability", "stability", True),
    ("diversity", "diversity", True),
    ("ce_loss_score", "CE score", True),
    ("kl_score", "KL score", True),
    ("probing_1", "probe k=1", True),
    ("probing_5", "probe k=5", True),
    ("probing_20", "probe k=20", True),
    ("scr_20", "SCR S@20", True),
)
"""(key, column title, higher is better) of the comparison's headline metrics."""


@dataclass
class RunRecord:
    """One trained run: what it is, its seed, its metrics, and its decoder rows ``[latents, d]`` (for stability)."""

    path: str
    family: str
    members: int
    latents: int
    k: int | None
    seed: int
    values: dict[str, float] = field(default_factory=dict)
    decoder: torch.Tensor | None = None
    member_seeds: list[int] = field(default_factory=list)
    """The init seed of each member (an SAE: its seed); seeds shared between runs of a group inflate stability."""


def headline_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one ``eval.json``: EV (store), the spliced CE/KL scores, the probing accuracy at
    k = 1, 5, 20 averaged over datasets (and its raw-activation baseline), and SCR's S at N = 20 (and the mean over
    N). Missing evaluations are simply absent."""
    out: dict[str, float] = {}
    if "explained_variance" in evaluation:
        out["explained_variance"] = float(evaluation["explained_variance"])
        out["l0"] = float(evaluation["l0"])
    spliced = evaluation.get("spliced") or {}
    for key in ("ce_loss_score", "kl_score", "ce_increase"):
        if key in spliced:
            out[key] = float(spliced[key])
    probing = evaluation.get("probing") or {}
    for k, value in (probing.get("mean_accuracy") or {}).items():
        out[f"probing_{k}"] = float(value)
    if "mean_baseline" in probing:
        out["probing_raw"] = float(probing["mean_baseline"])
    for name, result in (probing.get("datasets") or {}).items():
        for k, value in result["accuracy"].items():
            out[f"probing_{name}_{k}"] = float(value)
    scr = evaluation.get("scr") or {}
    scores = {n: s for n, s in (scr.get("S") or {}).items() if s is not None and s == s}
    for n, value in scores.items():
        out[f"scr_{n}"] = float(value)
    if scores:
        out["scr_mean"] = sum(scores.values()) / len(scores)
    return out


def assign_families(records: Sequence[RunRecord]) -> None:
    """Name each SAE record's family (see the module docstring) from the ``(J, M, k)`` of the ensembles among
    ``records``; sets its ``members`` to the matching ``J`` (1 for the single SAE)."""
    ensembles = sorted({(r.members, r.latents, r.k) for r in records if r.family in ("bagging", "boosting")},
                       key=lambda e: (e[0], e[1], e[2] or 0))
    for record in records:
        if record.family != "SAE":
            continue
        for members, latents, k in ensembles:
            if record.latents == latents and record.k == k:
                record.family, record.members = "single", 1
                break
            if record.latents == members * latents:
                if k is not None and record.k == members * k:
                    record.family, record.members = "expanded (J·k)", members
                    break
                if record.k == k:
                    record.family, record.members = "expanded (k)", members
                    break


def _group_key(record: RunRecord) -> tuple[int, int, int, int]:
    order = FAMILY_ORDER.index(record.family) if record.family in FAMILY_ORDER else len(FAMILY_ORDER)
    return order, record.members, record.latents, record.k or 0


def compare_records(records: Sequence[RunRecord], level: float = 0.95) -> dict[str, Any]:
    """Name the SAE records' families (:func:`assign_families`), group ``records`` (see the module docstring) and
    summarise every metric per group as mean ± CI over seeds; stability from the seeds' decoders pairwise
    (``metrics.relaxed_stability``, symmetric), diversity per run. Returns ``{"groups": [...], "claims": [...],
    "level": level}``; each group has ``family``, ``members``, ``latents``, ``k``, ``seeds``, ``runs`` and
    ``metrics`` ``{key: {"mean", "ci", "n", "values"}}``."""
    if not records:
        raise ValueError("compare needs at least one run")
    assign_families(records)
    groups: list[dict[str, Any]] = []
    for _, members in itertools.groupby(sorted(records, key=_group_key), key=_group_key):
        runs = list(members)
        values: dict[str, list[float]] = {}
        for run in runs:
            if run.decoder is not None:
                run.values.setdefault("diversity", metrics.diversity(run.decoder))
            for name, value in run.values.items():
                values.setdefault(name, []).append(value)
        decoders = [run.decoder for run in runs if run.decoder is not None]
        if len(decoders) >= 2:
            values["stability"] = [metrics.relaxed_stability(a, b, symmetric=True)
                                   for a, b in itertools.combinations(decoders, 2)]
        summary = {}
        for name, series in values.items():
            series = [value for value in series if math.isfinite(value)]  # an undefined score (0/0) is left out
            if series and (len(series) == len(runs) or name == "stability"):
                mean, half = mean_ci(series, level) if len(series) > 1 else (series[0], float("nan"))
                summary[name] = {"mean": mean, "ci": half, "n": len(series), "values": series}
        first = runs[0]
        groups.append({"family": first.family, "members": first.members, "latents": first.latents, "k": first.k,
                       "seeds": sorted(run.seed for run in runs), "runs": [run.path for run in runs],
                       "metrics": summary, "warning": _shared_inits(runs)})
    return {"groups": groups, "claims": _claims(groups, level), "level": level}


def _shared_inits(runs: Sequence[RunRecord]) -> str | None:
    """Why the group's seeds are not independent, if they are not: two runs whose members start from the same
    init (an ensemble of seed s initialises member j as SAE(seed=s + j), so seeds 0 and 1 share J − 1 members)."""
    for a, b in itertools.combinations(runs, 2):
        shared = sorted(set(a.member_seeds) & set(b.member_seeds))
        if shared:
            return (f"{a.path} and {b.path} share member init seeds {shared[:4]}{'…' if len(shared) > 4 else ''}: "
                    f"their stability is inflated; space the seeds by more than the number of members")
    return None


def _claims(groups: list[dict[str, Any]], level: float) -> list[dict[str, Any]]:
    """Each ensemble against the expanded SAEs with the same J, and against the single SAE, metric by metric."""
    claims = []
    baselines = [g for g in groups if g["family"].startswith("expanded") or g["family"] == "single"]
    for group in groups:
        if group["family"] not in ("bagging", "boosting"):
            continue
        for other in baselines:
            if other["family"] != "single" and other["members"] != group["members"]:
                continue
            for key, _, higher in METRICS:
                a, b = group["metrics"].get(key), other["metrics"].get(key)
                if not a or not b or a["n"] < 2 or b["n"] < 2:
                    continue
                verdict = compare_intervals(a["values"], b["values"], level)
                if verdict != "not distinguishable":
                    verdict = ("A better" if (verdict == "A > B") == higher else "B better")
                claims.append({"A": f"{group['family']} J={group['members']}",
                               "B": f"{other['family']}" + (f" J={other['members']}" if other["members"] > 1
                                                            else ""),
                               "metric": key, "verdict": verdict})
    return claims


def _cell(summary: dict[str, Any] | None, digits: int = 3) -> str:
    if not summary:
        return "-"
    if summary["n"] < 2 or summary["ci"] != summary["ci"]:
        return f"{summary['mean']:.{digits}f}"
    return format_ci(summary["mean"], summary["ci"], digits)


def _columns(report: dict[str, Any]) -> list[tuple[str, str]]:
    present = {name for group in report["groups"] for name in group["metrics"]}
    return [(key, title) for key, title, _ in METRICS if key in present]


def _table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The comparison's header and one row of cells per group (mean ± CI over seeds; ``-``: not measured)."""
    columns = _columns(report)
    header = ["model", "J", "latents", "k", "seeds", *(title for _, title in columns)]
    rows = [[g["family"], str(g["members"]), str(g["latents"]), str(g["k"]), str(len(g["seeds"])),
             *(_cell(g["metrics"].get(key)) for key, _ in columns)] for g in report["groups"]]
    return header, rows


def format_comparison(report: dict[str, Any]) -> str:
    """The comparison as a fixed-width text table (mean ± 95 % CI over seeds; ``-``: not measured)."""
    header, rows = _table(report)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def comparison_markdown(report: dict[str, Any]) -> str:
    """The comparison as markdown: the table, then every claim the intervals allow (and the undecided ones)."""
    header, rows = _table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                            range(len(header))) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines.append("")
    lines.append(f"Mean ± half-width of the {report['level']:.0%} Student-t interval over seeds (stability: over "
                 "pairs of seeds). A is better than B only where the intervals do not overlap.")
    if report["claims"]:
        lines += ["", "| A | B | metric | verdict |", "|---|---|---|---|"]
        lines += [f"| {c['A']} | {c['B']} | {c['metric']} | {c['verdict']} |" for c in report["claims"]]
    return "\n".join(lines) + "\n"


def plot_comparison(report: dict[str, Any], path: str | Path) -> None:
    """The metrics against the number of members, like the demo's ``members.png``: a line with 95 % error bars per
    ensemble family and per expanded SAE (at its J), the single SAE as a horizontal line with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(report)
    if not columns:
        raise ValueError("no metric to plot: evaluate the runs first (saefast eval)")
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), constrained_layout=True,
                             squeeze=False)
    axes = grid.reshape(-1)
    for spare in axes[len(columns):]:
        spare.set_visible(False)
    styles = {"bagging": ("o", "-"), "boosting": ("s", "-"), "expanded (J·k)": ("^", ":"),
              "expanded (k)": ("v", ":"), "SAE": ("x", "--")}
    members = sorted({g["members"] for g in report["groups"] if g["family"] != "single"})
    for ax, (key, title) in zip(axes, columns):
        for family, (marker, line) in styles.items():
            points = [g for g in report["groups"] if g["family"] == family and key in g["metrics"]]
            if not points:
                continue
            xs = [g["members"] for g in points]
            means = [g["metrics"][key]["mean"] for g in points]
            errors = [0.0 if g["metrics"][key]["ci"] != g["metrics"][key]["ci"] else g["metrics"][key]["ci"]
                      for g in points]
            ax.errorbar(xs, means, yerr=errors, marker=marker, linestyle=line, capsize=3, label=family)
        for g in report["groups"]:
            if g["family"] == "single" and key in g["metrics"]:
                summary = g["metrics"][key]
                ax.axhline(summary["mean"], color="grey", linestyle="--", linewidth=1, label="single SAE")
                if summary["ci"] == summary["ci"]:
                    ax.axhspan(summary["mean"] - summary["ci"], summary["mean"] + summary["ci"], color="grey",
                               alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("members J")
        if members:
            ax.set_xticks(members)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean ± {report['level']:.0%} CI over seeds", fontsize=10)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
