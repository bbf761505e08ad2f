"""Synthetic activations: sparse non-negative combinations of a known dictionary (for tests and the demo).

``x = Σ_{i ∈ S} c_i f_i + σ·ε`` with ``|S| = active`` features drawn uniformly per sample, coefficients
``c_i ~ Uniform(0.5, 1.5)``, unit-norm true features ``f_i`` and Gaussian noise ``ε``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class SyntheticSparseData:
    """A known dictionary ``features [F, D]`` and a sampler of its sparse combinations."""

    def __init__(self, d_in: int, n_features: int, active: int, noise: float = 0.0, seed: int = 0):
        if not 1 <= active <= n_features:
            raise ValueError(f"active must be in [1, n_features={n_features}], got {active}")
        self.d_in, self.n_features, self.active, self.noise = d_in, n_features, active, noise
        self.generator = torch.Generator().manual_seed(seed)
        features = torch.randn(n_features, d_in, generator=self.generator)
        self.features = features / features.norm(dim=-1, keepdim=True)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` activations ``[n, D]`` (fp32)."""
        scores = torch.rand(n, self.n_features, generator=self.generator)
        support = scores.topk(self.active, dim=-1).indices
        coefficients = 0.5 + torch.rand(n, self.active, generator=self.generator)
        codes = torch.zeros(n, self.n_features).scatter_(-1, support, coefficients)
        x = codes @ self.features
        if self.noise:
            x = x + self.noise * torch.randn(n, self.d_in, generator=self.generator)
        return x

    def batches(self, n_batches: int, batch_size: int) -> list[torch.Tensor]:
        """A fixed list of batches (re-iterable, so training can run several epochs over it)."""
        return [self.sample(batch_size) for _ in range(n_batches)]

    def stream(self, batch_size: int) -> Iterator[torch.Tensor]:
        """An endless iterator of fresh batches."""
        while True:
            yield self.sample(batch_size)


@torch.no_grad()
def feature_recovery(true_features: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each true feature, the max cosine similarity to any learned decoder row: ``[F]``.

    ``learned`` is ``[m, D]`` or member-stacked ``[J, M, D]`` (flattened). ``F × m`` is small here (tests/demo).
    """
    learned = learned.reshape(-1, learned.shape[-1])
    a = true_features / true_features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = learned / learned.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).max(dim=-1).values
