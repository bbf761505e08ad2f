"""Labelled text for example-level evaluations — sparse probing and spurious-correlation removal (SCR) — built
offline and deterministically from files that Debian installs.

Probing datasets (:data:`PROBING_DATASETS`, :func:`probing_dataset`), each ``per_class`` texts per class:

* ``"fortune-topics"`` (:func:`fortune_topics`) — the topic of an English fortune: the file it comes from among
  :data:`TOPIC_CATEGORIES` (Debian's ``fortunes``).
* ``"fortune-languages"`` (:func:`fortune_languages`) — the language of a fortune: English (the category files at
  the root of ``/usr/share/games/fortunes``), German (``de/``), Spanish (``es/*.fortunes``), Italian (``it/``),
  Portuguese (``brasil``); packages ``fortunes``, ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-br``.
* ``"code-languages"`` (:func:`code_languages`) — the language of a snippet of source code: Python (the standard
  library), C (``/usr/include``), Perl (``/usr/share/perl/5.*``), shell scripts, and Makefiles when the machine
  has enough of them (:func:`default_code_sources`).

SCR (:func:`scr_dataset`): two English fortune categories (the target) crossed with whether the entry ends with an
attribution line such as ``"\\t\\t-- Mark Twain"`` (the spurious attribute), ``per_cell`` entries per cell, so the
two attributes are independent in the returned set; an evaluation subsamples it to correlate them.

Sampling: a class's pool is deduplicated, and texts found in more than one class are dropped (their label would be
ambiguous); ``per_class`` texts are then drawn from it with ``random.Random`` seeded by ``seed`` and the class name,
so a class's sample does not change when another class is added. Output: class by class, in sorted class order.
Missing files raise :class:`DatasetUnavailable`, whose one-line message names the command that installs them.
"""

from __future__ import annotations

import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .text import DEFAULT_FORTUNE_CATEGORIES, FORTUNES_ROOT, fortune_categories, fortune_entries

PROBING_DATASETS = ("fortune-topics", "fortune-languages", "code-languages")
"""The names :func:`probing_dataset` accepts."""

FORTUNE_PACKAGES = ("fortunes", "fortunes-min", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-br")
"""The Debian packages of the fortune datasets (the Makefile's ``DEBIAN_PACKAGES``)."""

INSTALL_FORTUNES = "apt-get install " + " ".join(FORTUNE_PACKAGES)
"""The command that installs every fortune file these datasets read."""

MIN_CHARS, MAX_CHARS = 20, 300
"""Length bounds of a fortune entry, whitespace-normalised: long enough to carry a topic, short enough for a
probe's context window."""

TOPIC_CATEGORIES: tuple[str, ...] = (*DEFAULT_FORTUNE_CATEGORIES, "art", "work")
"""The classes of ``fortune-topics``: the default categories plus two topically distinct ones that have > 300
entries of 20–300 characters (Debian fortunes 1:1.99.1: art 396, work 554)."""

# Root files of the fortune directory that are not English prose: Portuguese (fortunes-br, its own class), Latin
# puns, and pictures.
_NOT_ENGLISH_ROOT_FILES = frozenset({"brasil", "translate-me", "ascii-art"})
# Files of the language directories that are pictures (de/asciiart, it/banner) or mix two languages per entry.
_NOT_PROSE_FILES = frozenset({"asciiart", "banner", "translations"})

CODE_SKIP_LINES = 20
"""Lines skipped at the top of every source file (licence headers)."""
CODE_MIN_CHARS, CODE_TARGET_CHARS, CODE_MAX_CHARS = 100, 200, 400
"""Bounds of a code snippet; a snippet ends at a blank line once it has ``CODE_TARGET_CHARS`` characters."""
CODE_CHUNKS_PER_FILE = 3
"""At most this many snippets per file, so that no class is dominated by one file."""
CODE_MAX_FILE_BYTES = 1 << 20
"""Larger files (generated tables and the like) are skipped."""
CODE_POOL_FACTOR = 4
"""The scan of a language stops once it holds this many times ``per_class`` snippets."""

# Directories never searched for code: installed third-party packages and bytecode caches.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})
_SHELL_SHEBANG = re.compile(r"#!\s*(?:/usr)?/bin/(?:ba)?sh\b|#!\s*/usr/bin/env\s+(?:ba)?sh\b")
# An attribution line: "--", "―" or "—", then text that is not more dashes (so "----" rules are not attributions).
_ATTRIBUTION = re.compile(r"\s*(?:--|―|—)\s*[^\s\-―—]")
_ATTRIBUTION_CONTINUATIONS = 4  # indented lines continuing an attribution: 4 at most in computers and science
_POD_START = re.compile(r"=[a-zA-Z]")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts and the class of each, for probing: ``labels[i]`` is the class name of ``texts[i]``."""

    name: str
    texts: list[str]
    labels: list[str]
    source: str
    """One line: where the texts come from (packages, paths), for reports."""

    @property
    def classes(self) -> list[str]:
        """The class names, sorted."""
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class SpuriousTexts:
    """Texts with a binary target and a binary spurious attribute (``0``/``1`` each), for SCR."""

    name: str
    texts: list[str]
    target: list[int]
    spurious: list[int]
    target_names: tuple[str, str]
    """Names of target 0 and target 1."""
    spurious_names: tuple[str, str]
    """Names of spurious 0 and spurious 1."""
    source: str

    def cell(self, target: int, spurious: int) -> list[int]:
        """Indices of the texts whose target is ``target`` and spurious attribute is ``spurious``."""
        return [i for i, (t, s) in enumerate(zip(self.target, self.spurious)) if t == target and s == spurious]

    def __len__(self) -> int:
        return len(self.texts)


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are missing. ``str(err)`` is one line that ends with the command installing them, which
    is also :attr:`install`."""

    def __init__(self, message: str, install: str):
        super().__init__(" ".join(f"{message}: {install}".split()))
        self.install = install


def _check_size(per_class: int, what: str = "per_class") -> None:
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 2:
        raise ValueError(f"{what} must be an int >= 2 (a probe needs a train and a test example), got {per_class!r}")


def sample_classes(name: str, pools: Mapping[str, Iterable[str]], per_class: int, seed: int,
                   source: str) -> LabelledTexts:
    """``per_class`` texts of every class of ``pools`` (class → candidate texts), drawn with ``seed``.

    Pools are deduplicated and texts in more than one pool dropped; a pool left with fewer than ``per_class``
    texts raises ``ValueError`` naming the class. Output order: classes sorted, each in its drawn order.
    """
    _check_size(per_class)
    unique = {label: list(dict.fromkeys(texts)) for label, texts in pools.items()}
    owners: dict[str, int] = {}
    for texts in unique.values():
        for text in texts:
            owners[text] = owners.get(text, 0) + 1
    texts_out: list[str] = []
    labels_out: list[str] = []
    for label in sorted(unique):
        pool = [text for text in unique[label] if owners[text] == 1]
        if len(pool) < per_class:
            raise ValueError(f"{name}: class {label!r} has {len(pool)} texts, fewer than per_class={per_class}")
        # Seeded per class (a string seed is hashed with SHA-512: stable across runs and Python versions).
        texts_out.extend(random.Random(f"{seed}:{label}").sample(pool, per_class))
        labels_out.extend([label] * per_class)
    return LabelledTexts(name, texts_out, labels_out, source)


# ---------------------------------------------------------------------------------------------------- fortunes


def _fortune_files(directory: Path, suffix: str = "", skip: Iterable[str] = ()) -> list[Path]:
    """The fortune text files of ``directory`` (not recursive), sorted: regular files, never symlinks (the
    ``.u8`` names and the root's links into ``it/`` would count entries twice), no ``.dat`` indexes."""
    if not directory.is_dir():
        return []
    skip = set(skip)
    return sorted(path for path in directory.iterdir()
                  if path.is_file() and not path.is_symlink() and path.suffix not in (".dat", ".u8")
                  and path.name.endswith(suffix) and path.name not in skip)


def _normalised_entries(files: Iterable[Path]) -> list[str]:
    """The whitespace-normalised entries of ``files`` within the length bounds, in file order."""
    return [entry for file in files for entry in fortune_entries(file) if MIN_CHARS <= len(entry) <= MAX_CHARS]


def fortune_topics(per_class: int = 300, seed: int = 0, root: str | os.PathLike = FORTUNES_ROOT) -> LabelledTexts:
    """Topic of English fortunes: ``per_class`` entries (20–300 characters) of each of :data:`TOPIC_CATEGORIES`,
    labelled by category."""
    _check_size(per_class)
    directory = Path(root).expanduser()
    missing = [name for name in TOPIC_CATEGORIES if not (directory / name).is_file()]
    if missing:
        raise DatasetUnavailable(f"fortune-topics needs Debian's fortunes ({directory} lacks {', '.join(missing)})",
                                 "apt-get install fortunes")
    pools = {name: _normalised_entries([directory / name]) for name in TOPIC_CATEGORIES}
    return sample_classes("fortune-topics", pools, per_class, seed,
                          f"Debian fortunes: {directory}/{{{','.join(TOPIC_CATEGORIES)}}}, entries of "
                          f"{MIN_CHARS}-{MAX_CHARS} characters, labelled by file")


def fortune_language_files(root: str | os.PathLike = FORTUNES_ROOT) -> dict[str, list[Path]]:
    """The fortune files of each language (``english``, ``german``, ``italian``, ``portuguese``, ``spanish``);
    a language whose package is missing has no files.

    English: the category files at the root, except ``brasil`` (Portuguese) and the non-prose ``translate-me`` and
    ``ascii-art``. German: ``de/``. Spanish: ``es/*.fortunes`` (not ``es/off/``). Italian: ``it/``. Pictures
    (``de/asciiart``, ``it/banner``) and ``de/translations`` (English and German in one entry) are left out.
    """
    directory = Path(root).expanduser()
    brasil = directory / "brasil"
    return {
        "english": _fortune_files(directory, skip=_NOT_ENGLISH_ROOT_FILES),
        "german": _fortune_files(directory / "de", skip=_NOT_PROSE_FILES),
        "italian": _fortune_files(directory / "it", skip=_NOT_PROSE_FILES),
        "portuguese": [brasil] if brasil.is_file() and not brasil.is_symlink() else [],
        "spanish": _fortune_files(directory / "es", suffix=".fortunes"),
    }


_LANGUAGE_PACKAGES = {"english": "fortunes", "german": "fortunes-de", "italian": "fortunes-it",
                      "portuguese": "fortunes-br", "spanish": "fortunes-es"}


def fortune_languages(per_class: int = 300, seed: int = 0,
                      root: str | os.PathLike = FORTUNES_ROOT) -> LabelledTexts:
    """Language of fortunes: ``per_class`` entries (20–300 characters) of each language, drawn from all the files
    of that language (:func:`fortune_language_files`); an entry found in two languages is dropped."""
    _check_size(per_class)
    files = fortune_language_files(root)
    missing = [_LANGUAGE_PACKAGES[language] for language, paths in files.items() if not paths]
    if missing:
        raise DatasetUnavailable(f"fortune-languages needs Debian's {', '.join(missing)}", INSTALL_FORTUNES)
    pools = {language: _normalised_entries(paths) for language, paths in files.items()}
    directory = Path(root).expanduser()
    return sample_classes("fortune-languages", pools, per_class, seed,
                          f"Debian {', '.join(sorted(set(_LANGUAGE_PACKAGES.values())))}: english = {directory}/* "
                          f"({len(files['english'])} files), german = de/, italian = it/, portuguese = brasil, "
                          f"spanish = es/*.fortunes; entries of {MIN_CHARS}-{MAX_CHARS} characters")


# --------------------------------------------------------------------------------------------------------- SCR


def has_attribution(raw_entry: str) -> bool:
    """Whether a fortune entry, as in its file, ends with an attribution: a line that starts (after whitespace)
    with ``--``, ``―`` or ``—`` followed by text, after at least one line of content, and followed at most by
    indented continuation lines of the attribution (``"\\t\\t-- Ken Olsen (President of Digital\\n\\t\\t
    Equipment Corporation)"``)."""
    lines = [line for line in raw_entry.splitlines() if line.strip()]
    # From the last line up, over at most _ATTRIBUTION_CONTINUATIONS continuation lines; line 0 is content.
    for position in range(len(lines) - 1, max(0, len(lines) - 2 - _ATTRIBUTION_CONTINUATIONS), -1):
        if _ATTRIBUTION.match(lines[position]):
            return True
        if not lines[position][:1].isspace():  # an unindented line is content, not a continuation
            return False
    return False


def scr_dataset(target: tuple[str, str] = ("computers", "science"), per_cell: int = 200, seed: int = 0,
                root: str | os.PathLike = FORTUNES_ROOT) -> SpuriousTexts:
    """SCR data: English fortunes of the two categories ``target`` (target 0 and 1) × whether the entry ends with
    an attribution line (spurious 0 = no, 1 = yes, :func:`has_attribution`), ``per_cell`` entries per cell.

    The attribution is detected on the entry as in its file, then the entry is whitespace-normalised (attribution
    text kept: it is what the spurious attribute is) and kept if it has 20–300 characters. Entries found in both
    categories are dropped. A cell with fewer than ``per_cell`` entries raises ``ValueError`` naming it. Order:
    cells (0, 0), (0, 1), (1, 0), (1, 1), each in its drawn order.
    """
    _check_size(per_cell, "per_cell")
    if isinstance(target, str) or len(target) != 2 or target[0] == target[1]:
        raise ValueError(f"target must be two different fortune categories, got {target!r}")
    directory = Path(root).expanduser()
    available = fortune_categories(directory) if directory.is_dir() else []
    unknown = [name for name in target if name not in available]
    if unknown and not (directory / "computers").is_file():  # Debian's fortunes is not installed
        raise DatasetUnavailable(f"the SCR dataset needs Debian's fortunes ({directory} lacks {', '.join(unknown)})",
                                 "apt-get install fortunes")
    if unknown:
        raise ValueError(f"unknown fortune categories {unknown}; available in {directory}: {', '.join(available)}")
    # category → normalised entry → attributed?
    entries: list[dict[str, int]] = []
    for name in target:
        found: dict[str, int] = {}
        for raw in fortune_entries(directory / name, normalise=False):
            text = " ".join(raw.split())
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                found.setdefault(text, int(has_attribution(raw)))
        entries.append(found)
    shared = entries[0].keys() & entries[1].keys()
    texts: list[str] = []
    targets: list[int] = []
    spurious: list[int] = []
    for label, found in enumerate(entries):
        for attributed in (0, 1):
            pool = [text for text, flag in found.items() if flag == attributed and text not in shared]
            if len(pool) < per_cell:
                raise ValueError(f"SCR cell ({target[label]}, {'attributed' if attributed else 'unattributed'}) "
                                 f"has {len(pool)} entries, fewer than per_cell={per_cell}")
            texts.extend(random.Random(f"{seed}:{target[label]}:{attributed}").sample(pool, per_cell))
            targets.extend([label] * per_cell)
            spurious.extend([attributed] * per_cell)
    return SpuriousTexts(f"fortune-scr-{target[0]}-{target[1]}", texts, targets, spurious, (target[0], target[1]),
                         ("unattributed", "attributed"),
                         f"Debian fortunes: {directory}/{{{target[0]},{target[1]}}}, entries of {MIN_CHARS}-"
                         f"{MAX_CHARS} characters; spurious = ends with an attribution line ('-- Name')")


# -------------------------------------------------------------------------------------------------------- code


@dataclass(frozen=True)
class CodeSource:
    """Where the snippets of one language come from, and how to read them."""

    language: str
    roots: tuple[str, ...]
    """Directories searched recursively (symlinked files skipped, so no file counts twice)."""
    suffixes: tuple[str, ...] = ()
    """A file whose name ends with one of these is of this language."""
    names: tuple[str, ...] = ()
    """A file with exactly one of these names is of this language."""
    shell_shebang: bool = False
    """Also files with no dot in their name whose first line is a ``sh``/``bash`` shebang."""
    comment_prefixes: tuple[str, ...] = ("#",)
    """A line starting (after whitespace) with one of these is a comment; mostly-comment snippets are dropped."""
    skip_pod: bool = False
    """Perl: leave out POD documentation (``=head1`` … ``=cut``) and everything after ``__END__``/``__DATA__``."""
    skip_docstrings: bool = False
    """Python: leave out the lines of triple-quoted strings (docstrings are prose, not code)."""
    description: str = ""
    """For the dataset's ``source`` line and error messages."""
    install: str = ""
    """The command that installs the files."""
    required: bool = True
    """``False``: the class is kept only if it yields ``per_class`` snippets, else left out (and said so)."""

    def claims(self, name: str) -> bool:
        """Whether a file name makes the file a candidate (a shebang candidate is confirmed on reading)."""
        return name.endswith(self.suffixes) or name in self.names or (self.shell_shebang and "." not in name)


def _versioned_dirs(pattern: str) -> list[Path]:
    """Directories matching the glob ``pattern``, resolved, newest version first (``python3.11`` > ``python3.9``)."""
    found = {Path(os.path.realpath(path)) for path in Path("/").glob(pattern.lstrip("/")) if path.is_dir()}

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.name))

    return sorted(found, key=version, reverse=True)


def default_code_sources() -> tuple[CodeSource, ...]:
    """The code of this machine: Python's standard library (``/usr/lib/python3.N``, newest; else the running
    interpreter's), C headers (``/usr/include``), Perl modules (``/usr/share/perl/5.*``, newest), shell scripts
    (``/usr/bin``, ``/usr/sbin``, ``/usr/lib/git-core``, ``/usr/share``, ``/etc``) and Makefiles (``Makefile``,
    ``*.mk`` under ``/usr/share``, ``/usr/lib``, ``/usr/src``; kept only if there are enough)."""
    python = [p for p in _versioned_dirs("/usr/lib/python3.*") if re.fullmatch(r"python3\.\d+", p.name)]
    python_root = str(python[0]) if python else sysconfig.get_paths()["stdlib"]
    perl = _versioned_dirs("/usr/share/perl/5.*")
    return (
        CodeSource("python", (python_root,), suffixes=(".py",), skip_docstrings=True,
                   description=f"Python stdlib {python_root} (*.py)", install="apt-get install libpython3-stdlib"),
        CodeSource("c", ("/usr/include",), suffixes=(".h",), comment_prefixes=("//", "/*", "*"),
                   description="C headers /usr/include (*.h)", install="apt-get install libc6-dev"),
        CodeSource("perl", tuple(str(p) for p in perl[:1]), suffixes=(".pm",), skip_pod=True,
                   description=f"Perl modules {perl[0] if perl else '/usr/share/perl/5.*'} (*.pm)",
                   install="apt-get install perl"),
        CodeSource("shell", ("/usr/bin", "/usr/sbin", "/usr/lib/git-core", "/usr/share", "/etc"), suffixes=(".sh",),
                   shell_shebang=True, description="shell scripts (*.sh or a sh/bash shebang) in /usr/bin, "
                   "/usr/sbin, /usr/lib/git-core, /usr/share, /etc", install="apt-get install git"),
        CodeSource("makefile", ("/usr/share", "/usr/lib", "/usr/src"), suffixes=(".mk",), names=("Makefile",),
                   description="Makefiles (Makefile, *.mk) in /usr/share, /usr/lib, /usr/src",
                   install="apt-get install dpkg-dev", required=False),
    )


def _walk_files(root: str, cache: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """``(path, name)`` of every regular, non-symlinked file under ``root`` (cached per call of the dataset:
    ``/usr/share`` serves two languages). Directory entries give the file type without a ``stat`` per file."""
    if root not in cache:
        files: list[tuple[str, str]] = []
        pending = [root]
        while pending:
            try:
                with os.scandir(pending.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            if entry.name not in _SKIPPED_DIRS:
                                pending.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            files.append((entry.path, entry.name))
            except OSError:  # unreadable directories (/etc has some) hold nothing we can use
                continue
        cache[root] = files
    return cache[root]


def _read_code(path: str, source: CodeSource) -> str | None:
    """The text of a candidate file, or ``None`` when it is too large, not UTF-8, unreadable, or (a shebang
    candidate) not a shell script."""
    name = os.path.basename(path)
    try:
        if os.stat(path).st_size > CODE_MAX_FILE_BYTES:
            return None
        with open(path, "rb") as handle:
            if not (name.endswith(source.suffixes) or name in source.names):
                # Checked on the first line before reading the rest: most dotless files are not scripts.
                if not _SHELL_SHEBANG.match(handle.readline(256).decode("latin-1")):
                    return None
                handle.seek(0)
            return handle.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _code_lines(text: str, source: CodeSource) -> list[str | None]:
    """The lines of a file after the licence header; ``None`` marks a line no snippet may include (Perl POD,
    Python docstrings)."""
    lines = text.splitlines()
    kept: list[str | None] = []
    inside = False  # in POD or in a triple-quoted string
    for line in lines:
        if source.skip_pod:
            if line.startswith(("__END__", "__DATA__")):  # the rest is data or documentation, not code
                kept.extend([None] * (len(lines) - len(kept)))
                break
            if _POD_START.match(line):
                inside = not line.startswith("=cut")
                kept.append(None)
                continue
        if source.skip_docstrings:
            # An odd number of triple quotes opens or closes a string; good enough to keep prose out of the
            # Python class (a quote inside a string can confuse it, which only changes which snippets are cut).
            quotes = line.count('"""') + line.count("'''")
            if inside or quotes:
                kept.append(None)
                inside = inside != (quotes % 2 == 1)
                continue
        kept.append(None if inside else line)
    return kept[CODE_SKIP_LINES:]


def code_snippets(text: str, source: CodeSource, limit: int | None = None) -> list[str]:
    """Snippets of consecutive lines of one file (after its first :data:`CODE_SKIP_LINES` lines), in file order.

    A snippet grows line by line and ends at a blank line once it has :data:`CODE_TARGET_CHARS` characters, or
    before the line that would take it past :data:`CODE_MAX_CHARS`; whitespace is kept, leading and trailing
    blank lines stripped. Kept: :data:`CODE_MIN_CHARS`–:data:`CODE_MAX_CHARS` characters, at least two non-blank
    lines, at most half of them comments (``source.comment_prefixes``). ``limit``: stop after that many snippets.
    """
    snippets: list[str] = []
    block: list[str] = []
    length = 0  # of "\n".join(block)
    content_length = 0  # of the block without its trailing blank lines

    def close() -> None:
        nonlocal length, content_length
        while block and not block[-1].strip():
            block.pop()
        snippet = "\n".join(block)
        content = [line.strip() for line in block if line.strip()]
        comments = sum(line.startswith(source.comment_prefixes) for line in content)
        if CODE_MIN_CHARS <= len(snippet) <= CODE_MAX_CHARS and len(content) >= 2 and comments * 2 <= len(content):
            snippets.append(snippet)
        block.clear()
        length = content_length = 0

    for line in _code_lines(text, source):
        if limit is not None and len(snippets) >= limit:
            break
        if line is None:
            close()
            continue
        blank = not line.strip()
        if not block and blank:
            continue  # no leading blank lines
        if block and length + 1 + len(line) > CODE_MAX_CHARS:
            close()
            if blank:
                continue
        length += len(line) + (1 if block else 0)
        block.append(line)
        if not blank:
            content_length = length
        elif content_length >= CODE_TARGET_CHARS:  # a paragraph boundary after enough text
            close()
    close()
    return snippets[:limit]


def _language_pool(source: CodeSource, per_class: int, seed: int,
                   cache: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Candidate snippets of one language: files in a seeded shuffle of their sorted list (so the scan does not
    always start in the same directories), at most :data:`CODE_CHUNKS_PER_FILE` each, stopping at
    :data:`CODE_POOL_FACTOR` × ``per_class``."""
    files = sorted({path for root in source.roots for path, name in _walk_files(root, cache) if source.claims(name)})
    random.Random(f"{seed}:{source.language}:files").shuffle(files)
    pool: dict[str, None] = {}
    for path in files:
        text = _read_code(path, source)
        if text is None:
            continue
        for snippet in code_snippets(text, source, limit=CODE_CHUNKS_PER_FILE):
            pool[snippet] = None
        if len(pool) >= CODE_POOL_FACTOR * per_class:
            break
    return list(pool)


def code_languages(per_class: int = 300, seed: int = 0,
                   sources: Sequence[CodeSource] | None = None) -> LabelledTexts:
    """Language of code snippets (:func:`code_snippets`): ``per_class`` of each of ``sources`` (default
    :func:`default_code_sources`). A required language with no files raises :class:`DatasetUnavailable`; an
    optional one (Makefiles) with fewer than ``per_class`` snippets is left out, and the ``source`` line says so."""
    _check_size(per_class)
    sources = default_code_sources() if sources is None else tuple(sources)
    if len({source.language for source in sources}) != len(sources):
        raise ValueError(f"code sources repeat a language: {[source.language for source in sources]}")
    cache: dict[str, list[tuple[str, str]]] = {}
    pools: dict[str, list[str]] = {}
    notes: list[str] = []
    for source in sources:
        if source.required and not any(Path(root).is_dir() for root in source.roots):
            where = ", ".join(source.roots) or source.description
            raise DatasetUnavailable(f"code-languages needs {source.language} files ({where} missing)",
                                     source.install or "apt-get install it")
        pool = _language_pool(source, per_class, seed, cache)
        if not source.required and len(pool) < per_class:
            notes.append(f"{source.language} left out: {len(pool)} snippets < per_class={per_class}")
            continue
        pools[source.language] = pool
        notes.append(source.description or f"{source.language}: {', '.join(source.roots)}")
    return sample_classes("code-languages", pools, per_class, seed,
                          f"snippets of {CODE_MIN_CHARS}-{CODE_MAX_CHARS} characters, at most "
                          f"{CODE_CHUNKS_PER_FILE} per file: " + "; ".join(notes))


# ------------------------------------------------------------------------------------------------------ by name

_BUILDERS: dict[str, Callable[..., LabelledTexts]] = {
    "fortune-topics": fortune_topics, "fortune-languages": fortune_languages, "code-languages": code_languages}


def probing_dataset(name: str, per_class: int = 300, seed: int = 0, **options: Any) -> LabelledTexts:
    """The probing dataset ``name`` (one of :data:`PROBING_DATASETS`); ``options`` go to its builder (``root``
    for the fortune datasets, ``sources`` for ``code-languages``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown probing dataset {name!r}; choose one of {', '.join(PROBING_DATASETS)}")
    return _BUILDERS[name](per_class=per_class, seed=seed, **options)
