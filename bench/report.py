"""What every benchmark script shares: the commit it measured and writing its JSON report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def commit() -> str:
    """Short hash of the checkout holding this file (``unknown`` outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(report: dict[str, Any], path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
