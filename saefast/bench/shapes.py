"""The benchmarked sizes: :class:`Shape` and the named :data:`PRESETS`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """One benchmarked size: ``J`` members of ``M`` latents on ``d``-dim activations, top-``K``, ``N`` tokens."""

    name: str
    members: int
    d_in: int
    latents: int
    k: int
    tokens: int
    dtype: str = "float32"
    classes: int = 10
    top_n: int = 64

    def to_dict(self) -> dict[str, Any]:
        """The shape as a plain dict (the report's ``shape`` field)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, list[Shape]] = {
    "tiny": [Shape("tiny", 2, 32, 128, 8, 256, top_n=16)],
    "cpu-small": [Shape("J4 d256 M1024 K16", 4, 256, 1024, 16, 1024)],
    "cpu": [Shape("J8 d512 M4096 K32", 8, 512, 4096, 32, 4096, top_n=256)],
    "gpu": [Shape("Gemma-2-2B-like", 8, 2304, 16384, 64, 8192, "bfloat16", top_n=1024),
            Shape("Pythia-160M-like", 8, 768, 16128, 128, 8192, "bfloat16", top_n=1024)],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Torch dtype of each :attr:`Shape.dtype` name."""
