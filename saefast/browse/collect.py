"""What each latent means: one streaming pass over a store, then the contexts of the chosen examples.

For ``G = J·M`` latents (member-major, ``g = j·M + m``) and a store of ``N`` tokens, :func:`collect` keeps only
``O(G × (top_n + sample + bins))`` numbers, never the ``N × G`` codes:

* per latent, the firing count, the sum and the maximum of its activations;
* the ``top_n`` largest activations with their rows (a per-latent top-n, merged chunk by chunk);
* a uniform sample of ``sample`` of its firing tokens (the ``sample`` smallest of a random key per firing, the
  same per-latent top-n on another key), from which the quantile-spaced examples come;
* a histogram of its activations on ``bins`` log-spaced bins, fixed from the first chunk's activations
  (``[max/10⁴, 4·max]`` of that chunk; values outside go to the end bins).

Then the contexts: for each chosen example (row ``r``) the stored tokens ``r − w .. r + w`` (the harvest's kept
positions in text order: within a window they are the text's own tokens) are encoded again — a second sequential
pass that encodes only the chunks holding examples — to shade every token by the latent's activation there. The
token strings come from the store's ``token_ids`` column and the harvest's tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..data.harvest import TOKEN_IDS
from ..data.store import ActivationStore
from ..models import Ensemble, SparseDictionary
from ..ops.codes import SparseCodes
from ..progress import progress_bar


def group_top(keys: torch.Tensor, groups: torch.Tensor, payload: torch.Tensor, n_groups: int, n: int,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the ``n`` entries with the largest ``keys``: ``(keys [n_groups, n], payload [n_groups, n, P])``
    in descending key order, padded with ``-inf`` keys (payload NaN). ``keys``, ``groups``: ``[E]``; ``payload``:
    ``[E, P]`` float64 (a row number is exact in float64)."""
    out_keys = torch.full((n_groups, n), float("-inf"), dtype=keys.dtype)
    out_payload = torch.full((n_groups, n, payload.shape[1]), float("nan"), dtype=payload.dtype)
    if keys.numel() == 0:
        return out_keys, out_payload
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, descending key within each group
    sorted_groups = groups[order]
    rank = torch.arange(sorted_groups.numel()) - torch.searchsorted(sorted_groups, sorted_groups)
    keep = rank < n
    chosen, where, slot = order[keep], sorted_groups[keep], rank[keep]
    out_keys[where, slot] = keys[chosen]
    out_payload[where, slot] = payload[chosen]
    return out_keys, out_payload


def merge_top(best: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor, groups: torch.Tensor,
              payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``best`` (from :func:`group_top`) updated with new entries: still the top ``n`` per group."""
    old_keys, old_payload = best
    n_groups, n = old_keys.shape
    filled = old_keys > float("-inf")
    old_groups = torch.arange(n_groups).unsqueeze(1).expand(n_groups, n)[filled]
    return group_top(torch.cat([old_keys[filled], keys]), torch.cat([old_groups, groups]),
                     torch.cat([old_payload[filled], payload]), n_groups, n)


@dataclass
class Collected:
    """The streaming pass's statistics of ``G = J·M`` latents over ``tokens`` tokens (on the CPU)."""

    tokens: int
    count: torch.Tensor
    """``[G]`` tokens each latent fired on."""
    total: torch.Tensor
    """``[G]`` sum of its activations (float64)."""
    maximum: torch.Tensor
    """``[G]`` its largest activation (0 if it never fired)."""
    top: torch.Tensor
    """``[G, top_n, 2]`` (row, activation) of its largest activations, descending (NaN padding)."""
    sample: torch.Tensor
    """``[G, sample, 2]`` (row, activation) of a uniform sample of its firing tokens (NaN padding)."""
    edges: torch.Tensor
    """``[bins + 1]`` the histogram's bin edges (log-spaced)."""
    histogram: torch.Tensor
    """``[G, bins]`` counts."""
    explained: list[float] | None
    """Boosting: the explained variance after each stage (``1 − Σ‖x − x̂_{≤j}‖² / Σ‖x − x̄‖²``)."""


def _firing(codes: SparseCodes, offset: int, M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero slots of ``codes`` (CPU) as ``(activations, latents g = j·M + m, rows)``, ``[E]`` each."""
    n, J, K = codes.values.shape
    fired = codes.values > 0
    members = torch.arange(J).view(1, J, 1).expand(n, J, K)
    rows = torch.arange(offset, offset + n).view(n, 1, 1).expand(n, J, K)
    return codes.values[fired].float(), (members * M + codes.indices)[fired], rows[fired]


def _cpu(codes: SparseCodes) -> SparseCodes:
    return SparseCodes(codes.values.detach().float().cpu(), codes.indices.detach().cpu(), codes.n_latents)


@torch.no_grad()
def collect(model: SparseDictionary, store: ActivationStore, *, top_n: int = 10, sample: int = 32, bins: int = 40,
            chunk: int = 4096, max_tokens: int | None = None, seed: int = 0, backend: str | None = None,
            progress: bool = True) -> Collected:
    """One sequential pass over ``store`` (its first ``max_tokens`` rows) with ``model``; see the module
    docstring. Memory: ``O(G·(top_n + sample + bins))`` plus one chunk's codes."""
    J, M = model.n_stacked, model.latents_per_stack
    G = J * M
    N = store.n_tokens if max_tokens is None else min(store.n_tokens, int(max_tokens))
    device = model.W_enc.device
    generator = torch.Generator().manual_seed(seed)
    count = torch.zeros(G, dtype=torch.int64)
    total = torch.zeros(G, dtype=torch.float64)
    maximum = torch.zeros(G)
    top = group_top(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, 2, dtype=torch.float64), G,
                    top_n)
    picks = group_top(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, 2, dtype=torch.float64), G,
                      sample)
    histogram = torch.zeros(G * bins, dtype=torch.int64)
    edges: torch.Tensor | None = None
    boosting = isinstance(model, Ensemble) and model.combine == "boosting"
    stage_sse = torch.zeros(J, dtype=torch.float64)
    sums = torch.zeros(store.d, dtype=torch.float64)
    squares = 0.0
    bar = progress_bar(total=N, enabled=progress, desc="browse: scan", unit="tok", unit_scale=True,
                       dynamic_ncols=True)
    try:
        for start in range(0, N, chunk):
            stop = min(N, start + chunk)
            x = store.read(start, stop).to(device, model.W_enc.dtype)
            device_codes = model.encode(x, backend=backend)
            values, latents, rows = _firing(_cpu(device_codes), start, M)
            count += torch.bincount(latents, minlength=G)
            total.index_add_(0, latents, values.double())
            maximum.scatter_reduce_(0, latents, values, reduce="amax")
            payload = torch.stack([rows.double(), values.double()], dim=1)
            top = merge_top(top, values, latents, payload)
            picks = merge_top(picks, -torch.rand(values.shape, generator=generator), latents, payload)
            if edges is None and values.numel():  # fixed once: counts stay exact and mergeable chunk by chunk
                high = float(values.max())
                edges = torch.logspace(math.log10(high * 1e-4), math.log10(high * 4), bins + 1)
            if edges is not None and values.numel():
                which = (torch.bucketize(values, edges) - 1).clamp_(0, bins - 1)
                histogram.index_add_(0, latents * bins + which, torch.ones_like(which))
            x64 = x.double().cpu()
            sums += x64.sum(0)
            squares += float(x64.pow(2).sum())
            if boosting:
                stage_sse += _stage_errors(model, x, device_codes)
            bar.update(stop - start)
    finally:
        bar.close()
    explained = None
    if boosting:
        variance = squares - float(sums.pow(2).sum()) / max(N, 1)
        explained = [1.0 - float(sse) / variance if variance > 0 else float("nan") for sse in stage_sse]
    if edges is None:
        edges = torch.logspace(-4, 0, bins + 1)
    return Collected(N, count, total, maximum, top[1], picks[1], edges, histogram.view(G, bins), explained)


def _stage_errors(model: Ensemble, x: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
    """``[J]``: ``Σ_n ‖x_n − x̂_{≤j}(x_n)‖²`` after each boosting stage ``j``, from the codes of all stages: the
    decode of the first ``j + 1`` stages' slots (the later stages' biases taken off again)."""
    J = model.n_stacked
    out = torch.zeros(J, dtype=torch.float64)
    later_bias = model.b_dec.detach().flip(0).cumsum(0).flip(0)  # Σ_{i ≥ j} b_dec_i
    for j in range(J):
        mask = torch.zeros_like(codes.values, dtype=torch.bool)
        mask[:, :j + 1] = True
        x_hat = model.decode(codes, mask=mask)
        if j + 1 < J:
            x_hat = x_hat - later_bias[j + 1]
        out[j] = float((x.float() - x_hat.float()).pow(2).sum())
    return out


@torch.no_grad()
def contexts(model: SparseDictionary, store: ActivationStore, examples: list[tuple[int, int]], width: int,
             decode: Callable[[list[int]], list[str]], *, chunk: int = 4096, backend: str | None = None,
             progress: bool = True) -> dict[tuple[int, int], dict[str, Any]]:
    """The context of every ``(latent g, row r)`` example: the stored tokens ``r − width .. r + width`` (clipped to
    the store), decoded by ``decode`` (token ids → strings), with latent ``g``'s activation at each, ``focus`` the
    position of ``r`` and ``value`` the activation there.

    The store is walked in order, ``chunk`` rows at a time, and a chunk (with ``width`` rows either side) is
    encoded only if an example falls in it: each row is encoded at most about once, so the contexts cost at most
    one more pass over the store, however many latents share its rows."""
    M = model.latents_per_stack
    N = store.n_tokens
    device = model.W_enc.device
    by_row = sorted(examples, key=lambda example: example[1])
    rows = torch.tensor([r for _, r in by_row], dtype=torch.long)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    bar = progress_bar(total=len(by_row), enabled=progress, desc="browse: contexts", unit="ex", dynamic_ncols=True)
    try:
        for start in range(0, N, chunk):
            first, last = torch.searchsorted(rows, torch.tensor([start, start + chunk])).tolist()
            if first == last:
                continue  # no example here: nothing to encode
            a, b = max(0, start - width), min(N, start + chunk + width)
            codes = _cpu(model.encode(store.read(a, b).to(device, model.W_enc.dtype), backend=backend))
            ids = store.read_extra(TOKEN_IDS, a, b).long().tolist()
            for g, r in by_row[first:last]:
                lo, hi = max(a, r - width), min(b, r + width + 1)
                j, m = divmod(g, M)
                values, indices = codes.values[lo - a:hi - a, j], codes.indices[lo - a:hi - a, j]
                activation = (values * (indices == m)).sum(-1).clamp_min(0)
                focus = r - lo
                out[(g, r)] = {"tokens": decode(ids[lo - a:hi - a]),
                               "activations": [round(v, 4) for v in activation.tolist()], "focus": focus,
                               "value": round(float(activation[focus]), 4)}
            bar.update(last - first)
    finally:
        bar.close()
    return out
