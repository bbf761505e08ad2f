"""Per-example activations of a language model's layer, for example-level evaluations (sparse probing, SCR).

Each text is tokenized on its own (BOS first when the tokenizer has one, truncated to ``max_tokens``), run through
the model, and the hooked layer's output is kept at the positions the harvest stores — not BOS or pad, and not
among the first ``exclude_first`` positions of the sequence (the attention sink, whose norm is ~100× the others',
and which no SAE saw in training). A batch is right-padded: with causal attention a pad token placed after a
sequence cannot change that sequence's activations, so no attention mask is needed and every pad is dropped.

The result, :class:`ExampleActivations`, keeps the token axis explicit: ``rows [R, d]`` holds every kept position
of every example, in example order, and ``offsets [E + 1]`` says which rows belong to example ``e``
(``rows[offsets[e]:offsets[e + 1]]``). It can be saved and loaded (safetensors) so that many models are evaluated on
one pass of the language model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_write_bytes
from ..progress import progress_bar
from .harvest import kept_positions, special_token_ids
from .hooks import Capture


@dataclass(frozen=True)
class ExampleActivations:
    """Activations of ``E`` examples: ``rows [R, d]`` (float32), example ``e`` owning
    ``rows[offsets[e]:offsets[e + 1]]``; every example owns at least one row."""

    rows: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if self.rows.dim() != 2:
            raise ValueError(f"rows must be [R, d], got shape {tuple(self.rows.shape)}")
        if self.offsets.dim() != 1 or self.offsets.numel() < 2 or self.offsets.dtype != torch.long:
            raise ValueError("offsets must be a 1-D int64 tensor [E + 1] with E >= 1")
        counts = self.offsets[1:] - self.offsets[:-1]
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.rows.shape[0] or bool((counts < 1).any()):
            raise ValueError("offsets must start at 0, end at len(rows) and give every example at least one row")

    @property
    def n_examples(self) -> int:
        """E, the number of examples."""
        return self.offsets.numel() - 1

    @property
    def d(self) -> int:
        """The activation width."""
        return self.rows.shape[1]

    def counts(self) -> torch.Tensor:
        """``[E]`` int64: the rows (kept positions) of each example."""
        return self.offsets[1:] - self.offsets[:-1]

    def example_ids(self) -> torch.Tensor:
        """``[R]`` int64: the example each row belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_examples), self.counts())

    def pooled(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[E, d]``: the mean over each example's rows, ``pooled[e] = mean_{r ∈ e} rows[r]`` (of ``rows`` in
        place of the stored ones when given: any ``[R, ·]`` tensor aligned with them, e.g. their codes)."""
        values = self.rows if rows is None else rows
        if values.shape[0] != self.rows.shape[0]:
            raise ValueError(f"rows must have {self.rows.shape[0]} rows (one per kept position), got {values.shape[0]}")
        out = torch.zeros(self.n_examples, *values.shape[1:], dtype=torch.float64, device=values.device)
        out.index_add_(0, self.example_ids().to(values.device), values.double())
        counts = self.counts().to(values.device).double().view(-1, *([1] * (values.dim() - 1)))
        return (out / counts).float()

    def select(self, examples: Sequence[int] | torch.Tensor) -> ExampleActivations:
        """The activations of the chosen examples, in the order given."""
        index = torch.as_tensor(examples, dtype=torch.long).reshape(-1)
        if index.numel() == 0:
            raise ValueError("select needs at least one example")
        if int(index.min()) < 0 or int(index.max()) >= self.n_examples:
            raise ValueError(f"example indices must lie in 0..{self.n_examples - 1}")
        counts = self.counts()[index]
        starts = self.offsets[:-1][index]
        rows = torch.cat([self.rows[int(s):int(s) + int(c)] for s, c in zip(starts, counts)])
        return ExampleActivations(rows, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write ``rows`` and ``offsets`` to a safetensors file (atomically), with ``metadata`` as JSON."""
        from safetensors.torch import save

        blob = save({"rows": self.rows.contiguous(), "offsets": self.offsets.contiguous()},
                    metadata={"saefast": json.dumps(metadata or {}, sort_keys=True)})
        atomic_write_bytes(path, blob)

    @classmethod
    def load(cls, path: str | Path) -> tuple[ExampleActivations, dict[str, Any]]:
        """The activations and metadata :meth:`save` wrote; a damaged file is named in the error."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = json.loads((file.metadata() or {}).get("saefast", "{}"))
                return cls(file.get_tensor("rows"), file.get_tensor("offsets")), metadata
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"example activations file {path} is unreadable or damaged: {err}") from err


def tokenize_examples(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[torch.Tensor]:
    """Each text's token ids (1-D), BOS first when the tokenizer has one, truncated to ``max_tokens``."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    prefix = [int(bos)] if isinstance(bos, int) else []
    return [torch.tensor((prefix + list(ids))[:max_tokens], dtype=torch.long) for ids in encoded]


def examples_key(texts: Sequence[str], **settings: Any) -> str:
    """SHA-256 of the texts and settings: the cache key of :func:`example_activations`' result."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


@torch.no_grad()
def example_activations(model: nn.Module, tokenizer: Any, layer: str, texts: Sequence[str], max_tokens: int = 64,
                        batch_size: int = 16, exclude_first: int = 2, progress: bool = False,
                        description: str = "examples") -> ExampleActivations:
    """The output of ``model``'s module ``layer`` for each of ``texts``, at the positions the harvest keeps (see the
    module docstring), as float32 :class:`ExampleActivations`. An example left with no position (a text of fewer
    than ``exclude_first`` tokens after BOS) is an error that names it, before any forward."""
    if len(texts) == 0:
        raise ValueError("no texts to run")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = tokenize_examples(tokenizer, texts, max_tokens)
    special = torch.tensor(special_token_ids(model, tokenizer), dtype=torch.long)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else getattr(tokenizer, "eos_token_id", None)
    pad = int(pad) if isinstance(pad, int) else 0
    masks = []
    for index, seq in enumerate(ids):
        keep = kept_positions(seq.view(1, -1), special, exclude_first)[0]
        if not bool(keep.any()):
            raise ValueError(f"text {index} ({texts[index][:40]!r}) has {seq.numel()} tokens, none of them kept "
                             f"(the first {exclude_first} positions and special tokens are left out); drop it or "
                             f"lengthen it")
        masks.append(keep)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows: list[torch.Tensor] = []
    bar = progress_bar(total=len(ids), desc=description, unit="text", enabled=progress)
    try:
        with Capture(model, [layer]) as capture:
            # Longest first keeps the padding per batch small; the rows go back to text order below.
            order = sorted(range(len(ids)), key=lambda i: -ids[i].numel())
            by_text: dict[int, torch.Tensor] = {}
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = ids[chunk[0]].numel()
                batch = torch.full((len(chunk), width), pad, dtype=torch.long)
                for row, i in enumerate(chunk):
                    batch[row, :ids[i].numel()] = ids[i]
                hidden = capture.run(batch.to(device))[layer].float().cpu()
                for row, i in enumerate(chunk):
                    by_text[i] = hidden[row, :ids[i].numel()][masks[i]]
                bar.update(len(chunk))
            rows = [by_text[i] for i in range(len(ids))]
    finally:
        bar.close()
        model.train(was_training)
    counts = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    return ExampleActivations(torch.cat(rows), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))


def cached_example_activations(model: nn.Module, tokenizer: Any, layer: str, texts: Sequence[str],
                               cache_dir: str | Path | None = None, max_tokens: int = 64, batch_size: int = 16,
                               exclude_first: int = 2, progress: bool = False,
                               description: str = "examples") -> ExampleActivations:
    """:func:`example_activations`, kept in ``cache_dir`` (when given) under a key of the texts, the model's
    fingerprint, the layer and the settings, so later evaluations of other SAEs skip the language model."""
    if cache_dir is None:
        return example_activations(model, tokenizer, layer, texts, max_tokens, batch_size, exclude_first, progress,
                                   description)
    from .harvest import model_fingerprint

    key = examples_key(texts, model=model_fingerprint(model), layer=layer, max_tokens=max_tokens,
                       exclude_first=exclude_first)
    path = Path(cache_dir) / f"examples-{key[:24]}.safetensors"
    if path.is_file():
        acts, metadata = ExampleActivations.load(path)
        if metadata.get("key") == key and acts.n_examples == len(texts):
            return acts
    acts = example_activations(model, tokenizer, layer, texts, max_tokens, batch_size, exclude_first, progress,
                               description)
    path.parent.mkdir(parents=True, exist_ok=True)
    acts.save(path, {"key": key, "layer": layer, "max_tokens": max_tokens, "exclude_first": exclude_first,
                     "texts": len(texts)})
    return acts
