"""The documentation's examples run: every ```python block of README.md and bench/README.md, each in a fresh
interpreter, and every `saefast ...` line of a ```bash block parses with the real command-line parser.

README.md has one set-up block (:data:`PREAMBLE`, shown in the README at the start of its API section): every
Python block after it in README.md runs after it; the blocks before it (and those of bench/README.md) stand alone.
Blocks run in a temporary working directory, with tracebacks that name the README file and its own line numbers.
Fences that are not meant to run say so with their language (``text``, ``console``, ``bash``); an unlabelled or
unknown fence fails, so that an example cannot silently stop being run.
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
DOCS = (ROOT / "README.md", ROOT / "bench" / "README.md")

PREAMBLE = """\
import torch
import saefast as sf
from saefast.data.synthetic import SyntheticSparseData

data = SyntheticSparseData(d_in=64, n_features=256, active=8, noise=0.01, seed=0)
x, x_test = data.sample(4096), data.sample(1024)    # training rows and held-out rows, [N, d_in]
batches = list(x.split(256))                        # any iterable of [N, d_in] tensors (or (x, y) tuples)
cfg = sf.SAEConfig(d_in=64, n_latents=512, k=16)
"""
"""The set-up the README's examples assume; it must appear verbatim as a ```python block of README.md."""

LANGUAGES = {"python", "bash", "console", "text"}
"""Fence languages the documentation may use: ``python`` runs, ``bash`` is parsed, the others are shown as is."""

TIMEOUT_S = 240
"""Per block: a hang guard. The blocks are sized to take seconds (the harvest example loads SmolLM2: ~30 s)."""

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
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "python"]
BASH_BLOCKS = [block for block in ALL_BLOCKS if block.lang == "bash"]


def _preamble_line() -> int | None:
    """The README.md line of the set-up block, or None when it is missing (test_preamble_is_shown says so)."""
    for block in PYTHON_BLOCKS:
        if block.path == DOCS[0] and block.code == PREAMBLE:
            return block.line
    return None


def test_the_documentation_has_examples():
    assert len([block for block in PYTHON_BLOCKS if block.path == DOCS[0]]) >= 5


def test_every_fence_names_a_known_language():
    bad = [f"{block.where}: ```{block.lang}" for block in ALL_BLOCKS if block.lang not in LANGUAGES]
    assert not bad, f"fences must be one of {sorted(LANGUAGES)} (```python runs, ```text does not): {bad}"


def test_preamble_is_shown_in_the_readme():
    assert _preamble_line() is not None, "README.md must show tests/test_readme.py's PREAMBLE as a ```python block"


RUNNER = """\
import json, sys
spec = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
if spec["preamble"] is not None:
    exec(compile(spec["preamble"], "<README.md set-up block>", "exec"), namespace)
# Padding with blank lines makes a traceback name the README and the example's own line there.
exec(compile("\\n" * (spec["line"] - 1) + spec["code"], spec["path"], "exec"), namespace)
"""


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[block.where for block in PYTHON_BLOCKS])
def test_python_example_runs(block: Block, tmp_path: Path):
    preamble_line = _preamble_line()
    preamble = None
    if block.path == DOCS[0] and preamble_line is not None and block.line > preamble_line:
        preamble = PREAMBLE
    spec = tmp_path / "block.json"
    spec.write_text(json.dumps({"path": str(block.path), "line": block.line, "code": block.code,
                                "preamble": preamble}))
    work = tmp_path / "cwd"
    work.mkdir()
    # One thread: the examples are tiny, and on a busy machine (2 shared cores in CI) OpenMP's waiting threads
    # made their steps up to 40x slower with two. Set OMP_NUM_THREADS to run them otherwise.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MPLBACKEND": "Agg"}
    try:
        result = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the example did not finish within {TIMEOUT_S} s")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        pytest.fail(f"{block.where}: the example failed (exit status {result.returncode}):\n{tail}", pytrace=False)


def _saefast_lines(block: Block) -> list[tuple[int, list[str]]]:
    """``(README line, argv after 'saefast')`` of each command line of a bash block that runs saefast."""
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
