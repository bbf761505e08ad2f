"""What every benchmark script shares: the commit it measured and writing its JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saefast.bench import git_revision


def commit() -> str:
    """The measured code's revision: :func:`saefast.bench.git_revision` (``+dirty`` for uncommitted changes)."""
    return git_revision()


def write_json(report: dict[str, Any], path: str | None) -> None:
    """Write ``report`` as indented JSON to ``path`` (nothing when None)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
