"""saefast.data.text: token windows (documents joined with EOS, a BOS per window), the text sources (pydoc topics,
text files, the CLI's comma-separated form) and the fortune files of the SAE-ception tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ByteTokenizer

from saefast.data.text import (
    DEFAULT_FORTUNE_CATEGORIES,
    FORTUNES_ROOT,
    fortune_categories,
    fortunes,
    pydoc_topics,
    read_text_files,
    text_source,
    token_windows,
)


def test_token_windows_concatenate_documents_with_eos():
    tokenizer = ByteTokenizer()
    windows = token_windows(tokenizer, ["abc", "de"], context=3)  # stream: a b c EOS d e → [BOS]+2 tokens each
    assert len(windows) == 3
    a, b, c, d, e = (3 + ord(char) % 61 for char in "abcde")
    assert [w.tolist() for w in windows] == [[1, a, b], [1, c, 2], [1, d, e]]
    plain = token_windows(tokenizer, ["abc", "de"], context=4, prepend_bos=False)
    assert [w.tolist() for w in plain] == [[a, b, c, 2]]  # incomplete tail dropped
    assert all(w.dtype == torch.long for w in windows)
    with pytest.raises(ValueError, match="context"):
        token_windows(tokenizer, ["abc"], context=1)

    class NoBos(ByteTokenizer):
        bos_token_id = None
    with pytest.raises(ValueError, match="no BOS"):
        token_windows(NoBos(), ["abc"], context=3, prepend_bos=True)
    assert token_windows(NoBos(), ["abc"], context=3)[0].tolist() == [a, b, c]


def test_text_sources(tmp_path):
    topics = pydoc_topics()
    assert len(topics) > 50 and topics == pydoc_topics() == text_source() == text_source("pydoc")
    assert sum(map(len, topics)) > 300_000
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("third")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert read_text_files(tmp_path) == ["first", "second", "third"]
    assert text_source([tmp_path / "b.txt", tmp_path / "a.txt"]) == ["second", "first"]
    assert text_source(f"{tmp_path / 'b.txt'},{tmp_path / 'sub'}") == ["second", "third"]  # the CLI's form
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_source(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_text_files(tmp_path / "bad.txt")


# ------------------------------------------------------------------------------------------------------
# Fortunes
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def fortune_root(tmp_path: Path) -> Path:
    (tmp_path / "food").write_text("Eat your\n  vegetables.\n%\n%\nPie is\tgood.\n% \nX\n%\nEat your vegetables.\n")
    (tmp_path / "food.dat").write_bytes(b"\x00\x02binary index")
    (tmp_path / "law").write_text("Objection,\n  your honour.\n%\nPie is good.\n%\nThe court is in session.\n%\n")
    (tmp_path / "law.u8").symlink_to(tmp_path / "law")
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("Never read.\n")
    return tmp_path


def test_fortunes_parses_normalises_and_labels(fortune_root: Path):
    assert fortune_categories(fortune_root) == ["food", "law"]
    texts, labels = fortunes(["law", "food"], root=fortune_root, min_chars=2, max_chars=100)
    # "Pie is good." is in both files (ambiguous: dropped); the food repeat is kept once; "X" is too short.
    assert texts == ["Objection, your honour.", "The court is in session.", "Eat your vegetables."]
    assert labels == ["law", "law", "food"]


def test_fortunes_length_filter(fortune_root: Path):
    texts, labels = fortunes(["food"], root=fortune_root, min_chars=1, max_chars=12)
    assert texts == ["Pie is good.", "X"] and labels == ["food", "food"]
    with pytest.raises(ValueError, match="no entries"):
        fortunes(["food"], root=fortune_root, min_chars=50, max_chars=60)


def test_fortunes_errors(fortune_root: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="available.*food, law"):
        fortunes(["food", "sports"], root=fortune_root)
    with pytest.raises(ValueError, match="one string"):
        fortunes("food", root=fortune_root)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortunes(["food"], root=tmp_path / "missing")


@pytest.mark.skipif(not Path(FORTUNES_ROOT).is_dir(), reason="Debian's fortunes are not installed")
def test_default_fortune_categories_are_large():
    texts, labels = fortunes()
    counts = {name: labels.count(name) for name in DEFAULT_FORTUNE_CATEGORIES}
    assert all(count >= 200 for count in counts.values()), counts
    assert len(set(texts)) == len(texts)
