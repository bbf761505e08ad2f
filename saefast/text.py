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
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

PYDOC = "pydoc"
"""Name of the built-in text source (:func:`pydoc_topics`)."""


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
