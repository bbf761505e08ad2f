"""The documentation's examples run: every ```python block of README.md, bench/README.md and the pages of docs/ —
the blocks of one file in order, as one script in a fresh interpreter (a page reads top to bottom, like a
notebook) — and every `saefast ...` line of a ```bash block parses with the real command-line parser.

Files run in a temporary working directory; a traceback names the markdown file and the line there. Fences that
are not meant to run say so with their language (``text``, ``console``, ``bash``); an unlabelled or unknown fence
fails, so that an example cannot silently stop being run. (The site itself: ``mkdocs build --strict`` in
``make test``.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md")))

LANGUAGES = {"python", "bash", "console", "text"}
"""Fence languages the documentation may use: ``python`` runs, ``bash`` is parsed, the others are shown as is."""

TIMEOUT_S = 300
"""Per file: a hang guard. The examples are sized to take seconds (the harvest guide loads SmolLM2: ~30 s)."""

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[^`\s]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its file, the line of its first code line (1-based), its language and its code."""

    path: Path
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, dedented (a fence may sit inside a list item)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        ticks = opening["ticks"]
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{ticks}\s*$", lines[j]):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: the fence opened here is never closed")
        code = textwrap.dedent("\n".join(lines[i + 1:j]))
        blocks.append(Block(path, i + 2, opening["lang"].lower(), code + "\n"))
        i = j + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in fenced_blocks(path)]
PYTHON_FILES = [path for path in DOCS if any(block.lang == "python" for block in fenced_blocks(path))]
BASH_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "bash"]


def test_the_documentation_has_examples():
    assert ROOT / "README.md" in PYTHON_FILES and len(PYTHON_FILES) >= 6


def test_every_fence_names_a_known_language():
    bad = [f"{block.where}: ```{block.lang}" for block in ALL_BLOCKS if block.lang not in LANGUAGES]
    assert not bad, f"fences must be one of {sorted(LANGUAGES)} (```python runs, ```text does not): {bad}"


RUNNER = """\
import json, sys
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for block in blocks:
    # Padding with blank lines makes a traceback name the markdown file and the example's own line there.
    exec(compile("\\n" * (block["line"] - 1) + block["code"], block["path"], "exec"), namespace)
"""


@pytest.mark.parametrize("path", PYTHON_FILES, ids=[str(path.relative_to(ROOT)) for path in PYTHON_FILES])
def test_python_examples_run(path: Path, tmp_path: Path):
    blocks = [{"path": str(block.path), "line": block.line, "code": block.code}
              for block in fenced_blocks(path) if block.lang == "python"]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(blocks))
    work = tmp_path / "cwd"
    work.mkdir()
    # One thread: the examples are tiny, and on a busy machine (2 shared cores in CI) OpenMP's waiting threads
    # made their steps up to 40x slower with two. Set OMP_NUM_THREADS to run them otherwise.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MPLBACKEND": "Agg"}
    where = path.relative_to(ROOT)
    try:
        result = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: the examples did not finish within {TIMEOUT_S} s")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        pytest.fail(f"{where}: an example failed (exit status {result.returncode}):\n{tail}", pytrace=False)


def _saefast_lines(block: Block) -> list[tuple[int, list[str]]]:
    """``(file line, argv after 'saefast')`` of each command line of a bash block that runs saefast."""
    commands = []
    for offset, line in enumerate(block.code.splitlines()):
        words = shlex.split(line, comments=True)
        if words and Path(words[0]).name == "saefast":
            commands.append((block.line + offset, words[1:]))
    return commands


BASH_COMMANDS = [(block, line, argv) for block in BASH_BLOCKS for line, argv in _saefast_lines(block)]


@pytest.mark.parametrize("block,line,argv", BASH_COMMANDS,
                         ids=[f"{block.path.relative_to(ROOT)}:{line}" for block, line, _ in BASH_COMMANDS])
def test_bash_example_parses(block: Block, line: int, argv: list[str], capsys):
    """A documented ``saefast`` command line uses flags and values that the parser accepts (nothing runs)."""
    from saefast.cli import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{block.path.relative_to(ROOT)}:{line}: `saefast {shlex.join(argv)}` does not parse:\n"
                    f"{capsys.readouterr().err}", pytrace=False)
