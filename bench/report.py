"""What every benchmark script shares: the commit it measured and writing its JSON report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def commit() -> str:
    """Short hash of the checkout holding this file, ``+dirty`` when tracked files differ from it (``unknown``
    outside git): a result measured on uncommitted code says so."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(report: dict[str, Any], path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
