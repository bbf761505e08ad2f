"""What the commands share about run directories: ``run.json`` (what ``saefast train`` was asked to do, and how it
ended), ``eval.json`` (what ``saefast eval`` measured), and the error bad input raises."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..files import atomic_write_bytes


class CLIError(ValueError):
    """Bad command-line input (reported as one line, exit status 2)."""


RUN_FORMAT, RUN_VERSION, RUN_FILE = "saefast-run", 1, "run.json"
"""``OUT/run.json``: what ``saefast train`` was asked to do, and how it ended."""

EVAL_FILE = "eval.json"
"""Where ``saefast eval`` keeps a run's latest evaluations (inside the run directory)."""

SECTIONS = ("spliced", "probing", "scr")
"""The sections of ``eval.json`` besides the store metrics at its top level."""


def stderr_line(line: str) -> None:
    """Print one line to standard error at once (progress and skip notices, apart from the results on stdout)."""
    print(line, file=sys.stderr, flush=True)


def read_run(out: Path) -> dict[str, Any] | None:
    """``OUT/run.json`` if it is one of ours (any other JSON, or none, gives None)."""
    try:
        run = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) and run.get("format", RUN_FORMAT) == RUN_FORMAT and "kind" in run else None


def read_evaluation(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/eval.json`` (None when the run has not been evaluated); a damaged file is named in the error."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError as err:
        raise CLIError(f"{path} is not valid JSON ({err}); run saefast eval --model {run_dir} again") from err
    if not isinstance(result, dict):
        raise CLIError(f"{path} does not hold an evaluation (a JSON object)")
    return result


def record_evaluation(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Merge ``result`` into ``RUN/eval.json`` atomically: a store evaluation (top-level metrics) replaces the
    recorded top-level metrics, and each section in ``result`` replaces its recorded one; the rest is kept."""
    path = Path(run_dir) / EVAL_FILE
    merged = read_evaluation(run_dir) or {}
    if "explained_variance" in result:
        merged = {key: value for key, value in merged.items() if key in SECTIONS}
    merged.update(result)
    atomic_write_bytes(path, json.dumps(merged, indent=2).encode())
    return path
