"""Text sources and fixed-length token windows for harvesting, all offline and deterministic.

Sources: ``"pydoc"`` — the 79 help topics of the Python documentation that ship with CPython
(:mod:`pydoc_data.topics`, ≈465k characters of technical English, ≈110k SmolLM2 tokens) — or local ``.txt``
files and directories.

Windows (:func:`token_windows`): the documents are tokenized without special tokens and concatenated into one
stream, with the EOS token between documents when the tokenizer has one (so a window that straddles two
documents shows the model a document boundary instead of run-on text). The stream is cut into consecutive,
non-overlapping chunks; the incomplete tail is dropped so every window has exactly ``context`` tokens and no
padding. With a BOS token each window is ``[BOS] + context − 1`` stream tokens, like a real prompt: the model's
attention sink (position 0, whose residual norm is ~100× the others') then sits on a token that carries no text.
The harvester drops the first positions of every window either way (:mod:`saefast.harvest`).

Labelled text (:func:`fortunes`): the entries of Debian's ``fortunes`` packages, labelled by the file (category)
they come from, for text-classification tasks (:mod:`saefast.classifiers`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

PYDOC = "pydoc"
"""Name of the built-in text source (:func:`pydoc_topics`)."""

FORTUNES_ROOT = "/usr/share/games/fortunes"
"""Where Debian's ``fortunes`` packages install their files."""

# Topically distinct, each with > 400 entries of 20–160 characters (Debian fortunes + fortunes-min 1:1.99.1):
# computers 651, men-women 456, politics 515, science 429. The obvious others are too small (food 145, law 100,
# love 120, sports 84).
DEFAULT_FORTUNE_CATEGORIES: tuple[str, ...] = ("computers", "men-women", "politics", "science")
"""The categories :func:`fortunes` reads by default."""


def pydoc_topics() -> list[str]:
    """The Python documentation's help topics (``pydoc_data.topics.topics``), ordered by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split pydoc_data out of the standard library
        raise FileNotFoundError("the 'pydoc' text source needs the standard-library module pydoc_data, which this "
                                "Python lacks; pass .txt files instead") from err
    return [topics[key] for key in sorted(topics)]


def read_text_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One document per file: each path is a text file or a directory searched recursively for ``*.txt``.

    Files are read as UTF-8, directories in sorted order, so the result is deterministic. Empty files are skipped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"text directory {path} contains no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file or directory {path} does not exist")
    documents = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {file} is not valid UTF-8 ({err.reason} at byte {err.start})") from err
        if text.strip():
            documents.append(text)
    if not documents:
        raise ValueError(f"the text files {[str(f) for f in files]} are all empty")
    return documents


def text_source(name_or_paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Documents of a text source: ``None`` or ``"pydoc"`` → :func:`pydoc_topics`; else :func:`read_text_files`.

    A string naming no existing path is read as a comma-separated list of paths (the command line's form).
    """
    if name_or_paths is None or (isinstance(name_or_paths, str) and name_or_paths == PYDOC):
        return pydoc_topics()
    if isinstance(name_or_paths, str) and "," in name_or_paths and not Path(name_or_paths).exists():
        name_or_paths = [part for part in name_or_paths.split(",") if part]
    return read_text_files(name_or_paths)


def _special_id(tokenizer: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    return int(value) if isinstance(value, int) else None


def tokenize_stream(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """All ``documents`` tokenized (no special tokens) into one 1-D LongTensor, EOS between documents if any."""
    if isinstance(documents, str):
        documents = [documents]
    if len(documents) == 0:
        raise ValueError("no documents to tokenize")
    eos = _special_id(tokenizer, "eos_token_id")
    pieces: list[torch.Tensor] = []
    step = 256  # documents per tokenizer call: batched is fast, bounded keeps memory flat
    for start in range(0, len(documents), step):
        chunk = list(documents[start:start + step])
        # verbose=False: long documents exceed model_max_length by design; we cut windows ourselves.
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for index, ids in enumerate(encoded):
            if eos is not None and (start + index) > 0:
                pieces.append(torch.tensor([eos], dtype=torch.long))
            pieces.append(torch.as_tensor(ids, dtype=torch.long))
    return torch.cat(pieces)


class TokenWindows(Sequence[torch.Tensor]):
    """Fixed-length windows over a token stream (see the module docstring); indexable, sized, re-iterable."""

    def __init__(self, stream: torch.Tensor, context: int, bos_id: int | None):
        self.stream = stream
        self.context = context
        self.bos_id = bos_id
        self.step = context - (1 if bos_id is not None else 0)
        """Stream tokens per window."""

    def __len__(self) -> int:
        return self.stream.numel() // self.step

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(index, int):
            raise TypeError("TokenWindows supports integer indices only")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range (there are {len(self)})")
        chunk = self.stream[index * self.step:(index + 1) * self.step]
        if self.bos_id is None:
            return chunk.clone()
        return torch.cat([torch.tensor([self.bos_id], dtype=torch.long), chunk])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


def token_windows(tokenizer: Any, documents: Sequence[str], context: int,
                  prepend_bos: bool | None = None) -> TokenWindows:
    """Deterministic windows of ``context`` token ids (1-D LongTensors) over the concatenated ``documents``.

    ``prepend_bos=None`` prepends the tokenizer's BOS token when it has one; ``True`` requires one. Tokenization
    happens here, up front (≈0.1 s per 100k tokens), so ``len()`` of the result is known before any model runs.
    """
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise ValueError(f"context must be an int >= 2 tokens, got {context!r}")
    bos = _special_id(tokenizer, "bos_token_id")
    if prepend_bos and bos is None:
        raise ValueError(f"prepend_bos=True but the tokenizer {type(tokenizer).__name__} has no BOS token")
    use_bos = bos is not None if prepend_bos is None else bool(prepend_bos)
    return TokenWindows(tokenize_stream(tokenizer, documents), context, bos if use_bos else None)


def fortune_categories(root: str | os.PathLike = FORTUNES_ROOT) -> list[str]:
    """The fortune categories (file names) under ``root``, sorted; ``.dat``/``.u8`` files and directories skipped."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"fortune directory {path} does not exist; install the fortunes with: "
                                f"apt-get install fortunes")
    # .dat: strfile's binary index; .u8: symlinks to the same text; directories: off/ (offensive) and the like.
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def fortune_entries(file: str | os.PathLike, normalise: bool = True) -> list[str]:
    """The entries of one fortune file (separated by lines holding only ``%``), in file order, blank ones dropped.

    ``normalise=True`` collapses every run of whitespace (newlines included) to one space; ``False`` keeps each
    entry's lines as in the file, joined by newlines, for checks on the layout (such as an attribution line).
    """
    entries, lines = [], []
    # errors="replace": a few historic fortune files are Latin-1; one odd character must not fail the whole task.
    for line in Path(file).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    entries.append("\n".join(lines))
    if normalise:
        entries = [" ".join(entry.split()) for entry in entries]
    return [entry for entry in entries if entry.strip()]


_fortune_entries = fortune_entries  # the earlier, private name


def fortunes(categories: Sequence[str] | None = None, root: str | os.PathLike = FORTUNES_ROOT,
             min_chars: int = 20, max_chars: int = 160) -> tuple[list[str], list[str]]:
    """Labelled text: ``(texts, labels)``, the entries of the fortune files ``categories`` and each one's category.

    ``None`` reads :data:`DEFAULT_FORTUNE_CATEGORIES`. Whitespace is collapsed to single spaces; entries outside
    ``[min_chars, max_chars]`` characters are dropped, as are repeats within a category and entries found in more
    than one of ``categories`` (their label would be ambiguous). Order: the categories as given, each in file order.
    """
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of names, not one string: {categories!r}")
    categories = list(DEFAULT_FORTUNE_CATEGORIES if categories is None else categories)
    if not categories:
        raise ValueError("categories is empty")
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"need 0 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    available = fortune_categories(root)
    unknown = [name for name in categories if name not in available]
    if unknown:
        raise ValueError(f"unknown fortune categories {unknown}; available in {root}: {', '.join(available)}")
    if len(set(categories)) != len(categories):
        raise ValueError(f"categories repeat a name: {categories}")
    per_category = {name: list(dict.fromkeys(fortune_entries(Path(root).expanduser() / name)))
                    for name in categories}
    seen_in: dict[str, int] = {}
    for entries in per_category.values():
        for entry in entries:
            seen_in[entry] = seen_in.get(entry, 0) + 1
    texts, labels = [], []
    for name, entries in per_category.items():
        kept = [entry for entry in entries if min_chars <= len(entry) <= max_chars and seen_in[entry] == 1]
        if not kept:
            raise ValueError(f"fortune category {name!r} has no entries of {min_chars}–{max_chars} characters")
        texts.extend(kept)
        labels.extend([name] * len(kept))
    return texts, labels
