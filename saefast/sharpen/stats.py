"""Per-class statistics of SAE codes (:func:`class_stats`) and each class's top latents (:func:`class_masks`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.store import ActivationStore
from ..models import SparseDictionary
from .checks import check_labels, check_model, inference


@dataclass(frozen=True)
class ClassStats:
    """Streaming per-class statistics of SAE codes over ``L = J·M`` latents (the concatenated dictionary,
    member-major: latent ``i`` of member ``j`` is column ``j·M + i``)."""

    sums: torch.Tensor
    """``[C, L]`` float64: ``Σ_{n: y_n = c} z_n``."""
    fires: torch.Tensor
    """``[C, L]`` int64: examples of class ``c`` on which the latent is non-zero."""
    counts: torch.Tensor
    """``[C]`` int64: examples of class ``c``."""
    members: int
    """``J`` (1 for a single SAE)."""
    n_latents: int
    """Latents per member ``M``."""

    @property
    def n_classes(self) -> int:
        """``C``: one more than the largest label seen (or the ``n_classes`` asked for)."""
        return self.counts.shape[0]

    @property
    def n_latents_total(self) -> int:
        """``L = J·M``."""
        return self.members * self.n_latents

    def means(self) -> torch.Tensor:
        """``μ [C, L]`` float64: ``μ_c = sums_c / counts_c`` (a class with no example: all zero)."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1).to(self.sums.dtype)

    def firing_rates(self) -> torch.Tensor:
        """``[C, L]`` float64: fraction of the examples of class ``c`` on which the latent fires."""
        return self.fires / self.counts.clamp_min(1).unsqueeze(1).to(torch.float64)

    def merge(self, other: ClassStats) -> ClassStats:
        """Statistics of the union of both streams (e.g. two shards of the token axis); classes padded to the larger."""
        if (self.members, self.n_latents) != (other.members, other.n_latents):
            raise ValueError(f"cannot merge statistics of {self.members}×{self.n_latents} and "
                             f"{other.members}×{other.n_latents} latents")
        C = max(self.n_classes, other.n_classes)
        a, b = self._padded(C), other._padded(C)
        return ClassStats(a.sums + b.sums.to(a.sums.device), a.fires + b.fires.to(a.fires.device),
                          a.counts + b.counts.to(a.counts.device), self.members, self.n_latents)

    def _padded(self, n_classes: int) -> ClassStats:
        extra = n_classes - self.n_classes
        if extra <= 0:
            return self
        return ClassStats(F.pad(self.sums, (0, 0, 0, extra)), F.pad(self.fires, (0, 0, 0, extra)),
                          F.pad(self.counts, (0, extra)), self.members, self.n_latents)


def _labelled_batches(batches: Any, batch_size: int) -> Iterable:
    if isinstance(batches, ActivationStore):
        if "labels" not in batches.extras:
            raise ValueError(f"store {batches.path} has no 'labels' column (its extras: {sorted(batches.extras)}); "
                             f"write the labels with StoreWriter(..., extras={{'labels': torch.int64}})")
        return batches.batches(batch_size, shuffle=False, extras=("labels",))
    if isinstance(batches, torch.Tensor):
        raise TypeError("batches must yield (x, labels) pairs, not be one tensor")
    return batches


def class_stats(model: SparseDictionary, batches: Iterable | ActivationStore, n_classes: int | None = None,
                backend: str | None = None, batch_size: int = 4096) -> ClassStats:
    """Per-class sums, firing counts and example counts of ``model``'s codes, streamed over ``batches``.

    ``batches`` yields ``(x [N, d_in], labels [N])`` pairs (any order, any number of classes: the statistics grow
    to the largest label seen), or is an :class:`~saefast.ActivationStore` with a ``labels`` column (read in
    order, ``batch_size`` rows at a time; the label of a row stays with that row). Codes are the inference codes
    (eval mode, no grad), sparse throughout: ``sums[y_n, j·M + i] += z_n[j, i]`` by index-add at the active slots.
    """
    model = check_model(model)
    J, M = model.n_stacked, model.latents_per_stack
    L = J * M
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1):
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    device = model.W_enc.device
    C = n_classes or 0
    sums = torch.zeros(C, L, dtype=torch.float64, device=device)
    fires = torch.zeros(C, L, dtype=torch.int64, device=device)
    counts = torch.zeros(C, dtype=torch.int64, device=device)
    seen = 0
    with inference(model):
        for index, batch in enumerate(_labelled_batches(batches, batch_size)):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"batch {index} must be an (x, labels) pair, got {type(batch).__name__}")
            x, labels = batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"batch {index}: x must be a torch.Tensor, got {type(x).__name__}")
            labels = check_labels(labels, x.shape[0] if x.dim() else -1, n_classes, f"batch {index} labels")
            x = x.to(device=device, dtype=torch.float32)
            labels = labels.to(device)
            codes = model.encode(x, backend=backend)
            needed = int(labels.max()) + 1
            if needed > C:  # an unseen class: grow the tables
                sums, fires = F.pad(sums, (0, 0, 0, needed - C)), F.pad(fires, (0, 0, 0, needed - C))
                counts, C = F.pad(counts, (0, needed - C)), needed
            flat = (labels.view(-1, 1, 1) * L + codes.global_indices()).reshape(-1)
            values = codes.values.reshape(-1)
            sums.view(-1).index_add_(0, flat, values.to(torch.float64))
            fires.view(-1).index_add_(0, flat, (values != 0).to(torch.int64))
            counts += torch.bincount(labels, minlength=C)
            seen += 1
    if not seen:
        raise ValueError("batches is empty: no examples to compute class statistics on")
    return ClassStats(sums, fires, counts, J, M)


def class_masks(stats: ClassStats, top_n: int | None = None, top_percent: float | None = None) -> torch.Tensor:
    """``[C, L]`` bool: ``T_y`` = the latents of class ``y``'s ``top_n`` largest mean codes ``μ_y`` (or of its
    ``⌈top_percent/100 · L⌉`` largest). Only latents with ``μ_y > 0`` qualify — a latent that never fires on the
    class is none of its features — so a class with fewer active latents keeps fewer (a class never seen keeps
    none). Ties go to the lower latent index."""
    if not isinstance(stats, ClassStats):
        raise TypeError(f"stats must be ClassStats (from class_stats), got {type(stats).__name__}")
    L = stats.n_latents_total
    if (top_n is None) == (top_percent is None):
        raise ValueError("pass exactly one of top_n and top_percent")
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= L:
            raise ValueError(f"top_n must be an int in [1, {L}] (the latents), got {top_n!r}")
        keep = top_n
    else:
        if not 0 < top_percent <= 100:
            raise ValueError(f"top_percent must be in (0, 100], got {top_percent!r}")
        keep = max(1, math.ceil(top_percent / 100 * L))
    means = stats.means()
    order = torch.sort(means, dim=1, descending=True, stable=True).indices[:, :keep]
    chosen = means.gather(1, order) > 0
    masks = torch.zeros(stats.n_classes, L, dtype=torch.bool, device=means.device)
    return masks.scatter_(1, order, chosen)
