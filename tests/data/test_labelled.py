"""saefast.data.labelled: the probing datasets (fortune topics and languages, code languages) and the SCR dataset —
exact checks on small fake file trees, then the real Debian files (skipped where they are not installed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from saefast.data.labelled import (
    CODE_MAX_CHARS,
    CODE_MIN_CHARS,
    MAX_CHARS,
    MIN_CHARS,
    PROBING_DATASETS,
    TOPIC_CATEGORIES,
    CodeSource,
    DatasetUnavailable,
    LabelledTexts,
    code_languages,
    code_snippets,
    fortune_languages,
    fortune_topics,
    has_attribution,
    probing_dataset,
    scr_dataset,
)

LANGUAGES = ["english", "german", "italian", "portuguese", "spanish"]


def write_fortunes(path: Path, entries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")


def entries_of(label: str, count: int) -> list[str]:
    return [f"This is {label} fortune number {i},\n\twhich says   something." for i in range(count)]


@pytest.fixture
def fortune_root(tmp_path: Path) -> Path:
    """A small Debian-like fortune tree: 8 usable entries per topic and language, plus the cases to skip."""
    root = tmp_path / "fortunes"
    for name in TOPIC_CATEGORIES:
        write_fortunes(root / name, entries_of(name, 8) + ["too short", "x" * (MAX_CHARS + 1),
                                                            f"This is {name} fortune number 0, which says something.",
                                                            "A line found in two categories, hence ambiguous."])
        (root / f"{name}.dat").write_bytes(b"\x00\x01binary index")
        (root / f"{name}.u8").symlink_to(name)
    write_fortunes(root / "computers", entries_of("computers", 8) + [
        f"Attributed computers saying {i}.\n\t\t-- Author {i}" for i in range(4)])
    write_fortunes(root / "science", entries_of("science", 8) + [
        f"Attributed science saying {i}.\n\t\t— Scientist {i}\n\t\t   in a long citation" for i in range(5)])
    write_fortunes(root / "translate-me", entries_of("latin pun", 3))
    write_fortunes(root / "ascii-art", ["  ____  \n | __ ) \n |____/  picture of a B"])
    write_fortunes(root / "brasil", entries_of("portuguese", 8))
    write_fortunes(root / "de" / "sprueche", entries_of("german", 8))
    write_fortunes(root / "de" / "asciiart", entries_of("german picture", 3))
    (root / "de" / "sprueche.u8").symlink_to("sprueche")
    write_fortunes(root / "es" / "vida.fortunes", entries_of("spanish", 8))
    write_fortunes(root / "es" / "varios.fortunes-pre", entries_of("spanish pre", 3))
    write_fortunes(root / "es" / "off" / "rude.fortunes", entries_of("spanish offensive", 3))
    write_fortunes(root / "it" / "italia", entries_of("italian", 8))
    (root / "italia").symlink_to("it/italia")  # the root's links into it/: never English
    return root


def check_labelled(data: LabelledTexts, classes: list[str], per_class: int) -> None:
    assert data.classes == classes
    assert Counter(data.labels) == {name: per_class for name in classes}
    assert data.labels == sorted(data.labels)  # class by class, sorted
    assert len(data.texts) == len(data.labels) == len(set(data.texts)) == len(classes) * per_class
    owners = Counter(text for text in set(zip(data.texts, data.labels)))
    assert all(count == 1 for count in owners.values())
    assert data.source and "\n" not in data.source


def test_fortune_topics_samples_each_category(fortune_root: Path):
    data = fortune_topics(per_class=8, seed=0, root=fortune_root)
    check_labelled(data, sorted(TOPIC_CATEGORIES), 8)
    assert data.name == "fortune-topics"
    for text, label in zip(data.texts, data.labels):
        assert MIN_CHARS <= len(text) <= MAX_CHARS
        assert " ".join(text.split()) == text  # whitespace-normalised
        assert text.startswith(f"This is {label} ") or text.startswith("Attributed")
    assert "A line found in two categories, hence ambiguous." not in data.texts
    assert fortune_topics(per_class=8, seed=0, root=fortune_root) == data
    other = fortune_topics(per_class=5, seed=1, root=fortune_root)
    assert other.texts != fortune_topics(per_class=5, seed=0, root=fortune_root).texts


def test_a_small_pool_names_the_class(fortune_root: Path):
    write_fortunes(fortune_root / "work", entries_of("work", 3))
    with pytest.raises(ValueError, match=r"'work' has 3 texts"):
        fortune_topics(per_class=4, root=fortune_root)
    with pytest.raises(ValueError, match="per_class"):
        fortune_topics(per_class=1, root=fortune_root)


def test_fortune_languages_reads_every_file_of_a_language(fortune_root: Path):
    data = fortune_languages(per_class=8, seed=0, root=fortune_root)
    check_labelled(data, LANGUAGES, 8)
    by_label: dict[str, set[str]] = {}
    for text, label in zip(data.texts, data.labels):
        by_label.setdefault(label, set()).add(text)
    # Exactly the 8 entries of each language file: not es/off/, es/*.fortunes-pre, de/asciiart, nor the root's
    # symlink into it/ (which would make the Italian entries ambiguous and drop them).
    assert by_label["german"] == {" ".join(e.split()) for e in entries_of("german", 8)}
    assert by_label["spanish"] == {" ".join(e.split()) for e in entries_of("spanish", 8)}
    assert by_label["italian"] == {" ".join(e.split()) for e in entries_of("italian", 8)}
    assert by_label["portuguese"] == {" ".join(e.split()) for e in entries_of("portuguese", 8)}
    english = " ".join(data.texts[i] for i, label in enumerate(data.labels) if label == "english")
    assert "latin pun" not in english and "picture" not in english
    with pytest.raises(ValueError, match="'german' has 8 texts"):  # the first class in sorted order
        fortune_languages(per_class=9, root=fortune_root)


@pytest.mark.parametrize("remove, package", [("de", "fortunes-de"), ("es", "fortunes-es"), ("it", "fortunes-it"),
                                             ("brasil", "fortunes-br")])
def test_a_missing_language_names_its_package(fortune_root: Path, remove: str, package: str):
    target = fortune_root / remove
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DatasetUnavailable) as caught:
        fortune_languages(per_class=2, root=fortune_root)
    message = str(caught.value)
    assert "\n" not in message and package in message and "apt-get install" in message
    assert caught.value.install in message and isinstance(caught.value, FileNotFoundError)


def test_missing_fortunes_raise_dataset_unavailable(tmp_path: Path):
    for build in (fortune_topics, fortune_languages, scr_dataset):
        with pytest.raises(DatasetUnavailable, match="apt-get install fortunes") as caught:
            build(root=tmp_path / "nowhere")
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("raw, attributed", [
    ("Whatever you do will be insignificant.\n\t\t-- Gandhi", True),
    ("Line one.\nLine two.\n    — Jorge Luis Borges\n", True),
    ("Short.\n―Anonymous", True),
    ("There is no reason for a computer at home.\n\t\t-- Ken Olsen (President of DEC),\n\t\t   Convention, 1977",
     True),
    ("Brain fried -- Core dumped", False),  # a dash within a line is not an attribution line
    ("\t\t-- Only an attribution", False),  # no content before it
    ("Some text.\n----------", False),  # a rule, not a name
    ("Dialogue.\n\t-- Who said that?\nNobody did.", False),  # content after the dash line
    ("Plain entry\nover two lines.", False),
])
def test_has_attribution(raw: str, attributed: bool):
    assert has_attribution(raw) is attributed


def test_scr_dataset_balances_the_four_cells(fortune_root: Path):
    data = scr_dataset(("computers", "science"), per_cell=4, seed=0, root=fortune_root)
    assert data.target_names == ("computers", "science") and data.spurious_names == ("unattributed", "attributed")
    assert len(data.texts) == len(data.target) == len(data.spurious) == 16
    for target in (0, 1):
        for spurious in (0, 1):
            cell = data.cell(target, spurious)
            assert len(cell) == 4
            for i in cell:
                text = data.texts[i]
                assert " ".join(text.split()) == text and MIN_CHARS <= len(text) <= MAX_CHARS
                assert text.startswith("Attributed" if spurious else "This is")
                assert (" -- Author" in text or " — Scientist" in text) == bool(spurious)  # attribution kept
                assert data.target_names[target] in text
    assert scr_dataset(per_cell=4, seed=0, root=fortune_root) == data
    assert scr_dataset(per_cell=4, seed=1, root=fortune_root).texts != data.texts
    with pytest.raises(ValueError, match=r"cell \(computers, attributed\) has 4 entries"):
        scr_dataset(per_cell=5, root=fortune_root)
    with pytest.raises(ValueError, match="two different"):
        scr_dataset(("science", "science"), root=fortune_root)
    with pytest.raises(ValueError, match="unknown fortune categories"):
        scr_dataset(("science", "cooking"), root=fortune_root)


HEADER = [f"# licence line {i}" for i in range(20)]


def write_code(path: Path, header: list[str], blocks: list[str], encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("\n".join(header + blocks).encode(encoding))


def python_blocks(tag: str, count: int) -> list[str]:
    return [f"def function_{tag}_{j}(value):\n    total = value * {j}\n    for index in range(3):\n"
            f"        total += index\n    return total\n" for j in range(count)]


def c_blocks(tag: str, count: int) -> list[str]:
    return [f"struct record_{tag}_{j} {{\n    int first_{j};\n    long second_{j};\n    char name_{j}[32];\n}};\n"
            for j in range(count)]


def shell_blocks(tag: str, count: int) -> list[str]:
    return [f"do_task_{tag}_{j}() {{\n    echo \"task {tag} {j}\"\n    if [ -n \"$1\" ]; then\n        shift\n"
            f"    fi\n}}\n" for j in range(count)]


@pytest.fixture
def code_sources(tmp_path: Path) -> list[CodeSource]:
    """Four files of each of python, c and shell (3 snippets used per file), one Makefile, and files to skip."""
    for k in range(4):
        write_code(tmp_path / "py" / f"pkg{k}" / f"mod{k}.py", HEADER, python_blocks(f"p{k}", 12))
        write_code(tmp_path / "inc" / f"head{k}.h", ["/* licence */"] * 20, c_blocks(f"c{k}", 12))
        shebang = ["#!/bin/sh"] + HEADER[1:]
        write_code(tmp_path / "bin" / (f"tool{k}" if k % 2 else f"tool{k}.sh"), shebang, shell_blocks(f"s{k}", 12))
    write_code(tmp_path / "py" / "latin1.py", HEADER, ["# é"] + python_blocks("latin_marker", 12), "latin-1")
    write_code(tmp_path / "py" / "huge.py", HEADER, python_blocks("huge_marker", 10_000))  # > 1 MB
    write_code(tmp_path / "bin" / "README", HEADER, shell_blocks("not_a_script", 12))
    write_code(tmp_path / "bin" / "tool.py", ["#!/bin/sh"] + HEADER, shell_blocks("dotted_name", 12))
    (tmp_path / "bin" / "link").symlink_to(tmp_path / "bin" / "tool1")
    write_code(tmp_path / "make" / "Makefile", HEADER, [f"target_{j}: dep_{j}.c\n\t$(CC) -o $@ $<\n\techo done\n"
                                                        for j in range(12)])
    return [
        CodeSource("python", (str(tmp_path / "py"),), suffixes=(".py",), skip_docstrings=True),
        CodeSource("c", (str(tmp_path / "inc"),), suffixes=(".h",), comment_prefixes=("//", "/*", "*")),
        CodeSource("shell", (str(tmp_path / "bin"),), suffixes=(".sh",), shell_shebang=True),
        CodeSource("makefile", (str(tmp_path / "make"),), names=("Makefile",), suffixes=(".mk",), required=False),
    ]


def test_code_languages_from_files(code_sources: list[CodeSource]):
    data = code_languages(per_class=6, seed=0, sources=code_sources)
    check_labelled(data, ["c", "python", "shell"], 6)
    assert "makefile left out: 2 snippets" in data.source  # 12 short rules make 2 snippets, under per_class
    joined = "\n".join(data.texts)
    for skipped in ("latin_marker", "huge_marker", "not_a_script", "dotted_name", "licence"):
        assert skipped not in joined
    for tag in [f"_{lang}{k}_" for lang in "pcs" for k in range(4)]:
        assert sum(tag in text for text in data.texts) <= 3  # at most 3 snippets per file
    assert all(CODE_MIN_CHARS <= len(text) <= CODE_MAX_CHARS for text in data.texts)
    assert code_languages(per_class=6, seed=0, sources=code_sources) == data
    assert code_languages(per_class=6, seed=1, sources=code_sources).texts != data.texts
    with_makefiles = code_languages(per_class=2, seed=0, sources=code_sources)
    assert with_makefiles.classes == ["c", "makefile", "python", "shell"]
    with pytest.raises(ValueError, match="'c' has 12 texts"):  # 4 files x 3 snippets
        code_languages(per_class=13, sources=code_sources)


def test_missing_code_raises_dataset_unavailable(tmp_path: Path):
    perl = CodeSource("perl", (str(tmp_path / "no-perl"),), suffixes=(".pm",), install="apt-get install perl")
    with pytest.raises(DatasetUnavailable, match="perl") as caught:
        code_languages(per_class=2, sources=[perl])
    assert str(caught.value).endswith(": apt-get install perl") and "\n" not in str(caught.value)


def test_code_snippet_rules():
    python = CodeSource("python", (), suffixes=(".py",), skip_docstrings=True)
    text = "\n".join(HEADER + python_blocks("a", 6))
    snippets = code_snippets(text, python)
    assert snippets and all(CODE_MIN_CHARS <= len(s) <= CODE_MAX_CHARS for s in snippets)
    assert not any("licence" in s for s in snippets)  # the first 20 lines are skipped
    assert all(s == s.strip("\n") and s.startswith("def ") for s in snippets)  # whitespace inside kept
    assert "\n    total" in snippets[0]
    # Mostly comments, one non-blank line, docstrings and Perl POD are not code.
    comments = "\n".join(HEADER + ["# comment " * 5] * 4 + ["x = 1", ""] + ["y" * 150, ""])
    assert code_snippets(comments, python) == []
    docstring = "\n".join(HEADER + ['"""Prose, not code,', "over many lines " * 8, "and more prose." + '"""'] * 3)
    assert code_snippets(docstring, python) == []
    perl = CodeSource("perl", (), suffixes=(".pm",), skip_pod=True)
    code = ["sub double {", "    my ($x) = @_;", "    my $y = $x * 2;", "    print STDERR \"doubling $x\\n\";",
            "    return $y + 40;", "}"]
    pod = HEADER + ["=head1 NAME", "", "Prose " * 30, "", "=cut", ""] + code + ["", "__END__", "sub after_end {",
                                                                                "    return 1;", "}"]
    assert code_snippets("\n".join(pod), perl) == ["\n".join(code)]


def test_probing_dataset_by_name(fortune_root: Path):
    assert probing_dataset("fortune-topics", per_class=3, seed=2, root=fortune_root) == fortune_topics(3, 2,
                                                                                                      fortune_root)
    with pytest.raises(ValueError, match="fortune-topics, fortune-languages, code-languages"):
        probing_dataset("imdb")


# The real Debian files: skipped where they are not installed.


def real(build, *args, **kwargs):
    try:
        return build(*args, **kwargs)
    except DatasetUnavailable as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("name", PROBING_DATASETS)
def test_real_probing_datasets(name: str):
    per_class = 300 if name != "code-languages" else 100  # fewer: the code scan stops sooner
    data = real(probing_dataset, name, per_class=per_class, seed=0)
    expected = {"fortune-topics": sorted(TOPIC_CATEGORIES), "fortune-languages": LANGUAGES,
                "code-languages": ["c", "perl", "python", "shell"]}[name]
    if name == "code-languages" and "makefile" in data.classes:  # only where the machine has enough Makefiles
        expected = sorted([*expected, "makefile"])
    check_labelled(data, expected, per_class)
    low, high = (CODE_MIN_CHARS, CODE_MAX_CHARS) if name == "code-languages" else (MIN_CHARS, MAX_CHARS)
    assert all(low <= len(text) <= high for text in data.texts)
    assert probing_dataset(name, per_class=per_class, seed=0) == data
    assert probing_dataset(name, per_class=per_class, seed=1).texts != data.texts


def test_real_scr_dataset():
    data = real(scr_dataset, ("computers", "science"), per_cell=200, seed=0)
    assert [len(data.cell(t, s)) for t in (0, 1) for s in (0, 1)] == [200, 200, 200, 200]
    attributed = [data.texts[i] for i in data.cell(0, 1) + data.cell(1, 1)]
    assert all(any(mark in text for mark in ("--", "―", "—")) for text in attributed)
    assert len(set(data.texts)) == 800
