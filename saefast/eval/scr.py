"""Spurious-correlation removal (SCR): SHIFT as SAEBench runs it. Can ablating a few latents make a probe that learnt
a spurious attribute classify the target instead?

Each example ``e`` has a binary ``target`` ``t_e`` and a binary ``spurious`` attribute ``s_e``, and token rows whose
mean is its pooled activation ``x̄_e``; probes are :func:`~saefast.eval.probing.fit_probe` logistic probes on ``x̄``.

1. Each of the four cells ``(t, s)`` is cut to the size of the smallest (the test set is then balanced: ``t`` and
   ``s`` independent) and split train/test (``test_fraction``) with a generator seeded ``seed``.
2. **Biased probe** for ``t``, trained on the train examples with ``t = s`` (the attributes always agree, so it may
   read either): ``A_biased`` = its target accuracy on the test set (all four cells).
   **Oracle probe** for ``t``, trained on the whole (balanced) train set: ``A_oracle`` on the same test set.
3. **Latent scores.** A probe for ``s`` on the balanced train set gives, in activation space, the weight
   ``w = coef / σ`` (its standardised coefficients over the feature scales). With the pooled codes ``f_e``
   (:func:`~saefast.eval.probing.pooled_codes`) of the balanced train set and ``dec_l`` the reconstruction's change
   per unit of latent ``l``'s code (:func:`decoder_directions`):

       score[l] = |mean_{s=1} f[:, l] − mean_{s=0} f[:, l]| · |w · dec_l|

4. For each ``N``, the top-``N`` latents ``A`` (score, ties by index) are ablated from every test row as
   :func:`~saefast.eval.splice.splice`'s ``ablate`` mode does, ``x' = decode(z with z_A = 0) + (x − x̂)``
   (:func:`~saefast.eval.splice.ablate_rows`), re-pooled per example, and the biased probe — not refit — scores
   ``A_ablated(N)``. Then (:func:`shift_score`)

       S(N) = (A_ablated(N) − A_biased) / (A_oracle − A_biased)

   0: the ablation changed nothing; 1: the biased probe is as good as the oracle. The spurious probe's accuracy on
   the ablated test set says how much of ``s`` the ablation removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.examples import ExampleActivations
from ..models import SparseDictionary
from .probing import check_batch_size, check_examples, check_test_fraction, fit_probe, pooled_codes
from .splice import ablate_rows

__all__ = ["decoder_directions", "shift_score", "spurious_correlation_removal"]

MIN_GAP = 0.01
"""Smallest ``|A_oracle − A_biased|`` for which :func:`shift_score` divides: below it there is no gap to close."""

MIN_PER_CELL = 4
"""Fewest examples a ``(target, spurious)`` cell may have (at least one test and three train examples)."""


def decoder_directions(model: SparseDictionary) -> torch.Tensor:
    """``[J·M, d]`` (detached, on the model's device): row ``j·M + i`` is ``α·W_dec[j, i]``, the change of the
    reconstruction per unit of that latent's code — ``decode(z + e_l) − decode(z) = dec_l`` (``α``: ``1/J`` for
    bagging, 1 for boosting and an SAE)."""
    W_dec = model.stacked().W_dec.detach()
    return model.alpha * W_dec.reshape(model.n_latents_total, model.d_in)


def shift_score(a_ablated: float, a_biased: float, a_oracle: float, min_gap: float = MIN_GAP) -> float:
    """``S = (A_ablated − A_biased) / (A_oracle − A_biased)``: the share of the gap between the biased probe and the
    oracle that an ablation closes (0: none, 1: all of it). NaN when ``|A_oracle − A_biased| ≤ min_gap``: there is
    no gap to close, and the ratio would be noise."""
    gap = a_oracle - a_biased
    return float("nan") if abs(gap) <= min_gap else (a_ablated - a_biased) / gap


def _binary(values: Sequence[int] | np.ndarray | torch.Tensor, name: str, n_examples: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n_examples:
        raise ValueError(f"{name} must hold one value per example ({n_examples}), got shape {array.shape}")
    if array.dtype.kind not in "biuf" or not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool), got values {np.unique(array)[:6].tolist()}")
    return array.astype(np.int64)


def _check_ns(ns: Sequence[int]) -> list[int]:
    ns = list(ns)
    if not ns:
        raise ValueError("ns is empty: give at least one number of latents to ablate")
    for n in ns:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"every N must be an int >= 0, got {n!r}")
    return sorted({int(n) for n in ns})


def _cell_splits(target: np.ndarray, spurious: np.ndarray, test_fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Train and test example indices (sorted): every ``(t, s)`` cell cut to the smallest cell's size ``n`` and
    split ``round(n·test_fraction)`` (at least 1, at most ``n − 1``) to test."""
    cells = {(t, s): np.flatnonzero((target == t) & (spurious == s)) for t in (0, 1) for s in (0, 1)}
    for (t, s), index in cells.items():
        if len(index) < MIN_PER_CELL:
            raise ValueError(f"the cell target={t}, spurious={s} has {len(index)} example(s); every (target, "
                             f"spurious) cell needs at least {MIN_PER_CELL}")
    n = min(len(index) for index in cells.values())
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    rng = np.random.default_rng(int(seed))
    train, test = [], []
    for index in cells.values():
        chosen = rng.permutation(rng.choice(index, n, replace=False) if len(index) > n else index)
        test.append(chosen[:n_test])
        train.append(chosen[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test)), n


def _ablated_pooled(model: SparseDictionary, acts: ExampleActivations, latents: torch.Tensor, batch_size: int,
                    backend: str | None) -> np.ndarray:
    """``[E, d]``: each example's mean over its rows after :func:`ablate_rows` of ``latents`` (batch by batch)."""
    device = model.W_dec.device
    rows = [ablate_rows(model, acts.rows[start:start + batch_size].to(device), latents, backend).cpu()
            for start in range(0, acts.rows.shape[0], batch_size)]
    return acts.pooled(torch.cat(rows)).cpu().numpy()


def _accuracy(probe: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((probe.predict(x) == y).mean())


def spurious_correlation_removal(
    model: SparseDictionary, acts: ExampleActivations, target: Sequence[int] | np.ndarray | torch.Tensor,
    spurious: Sequence[int] | np.ndarray | torch.Tensor, ns: Sequence[int] = (2, 5, 10, 20, 50, 100),
    test_fraction: float = 0.25, seed: int = 0, random_control: bool = False, batch_size: int = 4096,
    backend: str | None = None,
) -> dict[str, Any]:
    """SCR (SHIFT, SAEBench) of ``model`` on examples with a binary ``target`` and ``spurious`` attribute: the
    procedure and formulas of the module docstring. ``ns``: numbers of top-scored latents to ablate (``0``: none,
    ``S = 0`` exactly; an ``N`` above the model's ``J·M`` latents is skipped and listed). ``random_control``: also
    ablate ``N`` latents drawn uniformly (generator seeded ``(seed, N)``), whose ``S`` should be near 0.

    Validated before any compute: one value of each attribute per example, both binary, every ``(t, s)`` cell with
    at least 4 examples.

    Returns ``{"S": {"N": ..}, "accuracy_ablated": {"N": ..}, "spurious_accuracy_ablated": {"N": ..},
    "ablated_latents": {"N": [..]}, "top_scores": [score of each latent of the largest N], "accuracy_biased",
    "accuracy_oracle", "spurious_accuracy", "ns", "skipped_ns", "n_per_cell", "n_train", "n_train_biased", "n_test",
    "n_latents_total", "test_fraction", "seed", "warning"}`` (``warning``: why ``S`` is NaN, else None), plus
    ``"S_random"``, ``"accuracy_ablated_random"`` and ``"random_latents"`` with ``random_control``."""
    check_examples(model, acts)
    check_batch_size(batch_size)
    check_test_fraction(test_fraction)
    target = _binary(target, "target", acts.n_examples)
    spurious = _binary(spurious, "spurious", acts.n_examples)
    ns = _check_ns(ns)
    train, test, n_per_cell = _cell_splits(target, spurious, test_fraction, seed)
    n_latents = model.n_latents_total
    evaluated, skipped = [n for n in ns if n <= n_latents], [n for n in ns if n > n_latents]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = acts.pooled().cpu().numpy()
            test_acts = acts.select(test)
            # the clean test features go through the same pooling as the ablated ones: N = 0 gives the same bits
            raw_test = test_acts.pooled().cpu().numpy()
            biased_train = train[target[train] == spurious[train]]
            biased = fit_probe(raw[biased_train], target[biased_train], seed)
            oracle = fit_probe(raw[train], target[train], seed)
            spurious_probe = fit_probe(raw[train], spurious[train], seed)
            a_biased = _accuracy(biased, raw_test, target[test])
            a_oracle = _accuracy(oracle, raw_test, target[test])

            scaler, logistic = spurious_probe[0], spurious_probe[-1]
            w = torch.as_tensor(logistic.coef_[0] / scaler.scale_, dtype=torch.float32, device=model.W_dec.device)
            projection = (decoder_directions(model).float() @ w).abs().double().cpu()
            codes = pooled_codes(model, acts.select(train), batch_size, backend).double()
            on = torch.as_tensor(spurious[train] == 1)
            code_gap = (codes[on].mean(0) - codes[~on].mean(0)).abs()
            scores = code_gap * projection
            order = torch.sort(-scores, stable=True).indices

            def ablated(latents: torch.Tensor) -> tuple[float, float]:
                pooled = _ablated_pooled(model, test_acts, latents, batch_size, backend)
                return _accuracy(biased, pooled, target[test]), _accuracy(spurious_probe, pooled, spurious[test])

            result: dict[str, Any] = {"S": {}, "accuracy_ablated": {}, "spurious_accuracy_ablated": {},
                                      "ablated_latents": {}}
            for n in evaluated:
                latents = order[:n]
                a_ablated, a_spurious = ablated(latents)
                result["S"][str(n)] = shift_score(a_ablated, a_biased, a_oracle)
                result["accuracy_ablated"][str(n)] = a_ablated
                result["spurious_accuracy_ablated"][str(n)] = a_spurious
                result["ablated_latents"][str(n)] = latents.tolist()
            if random_control:
                result.update({"S_random": {}, "accuracy_ablated_random": {}, "random_latents": {}})
                for n in evaluated:
                    rng = np.random.default_rng([int(seed), n])
                    latents = torch.as_tensor(np.sort(rng.choice(n_latents, n, replace=False)), dtype=torch.long)
                    a_ablated, _ = ablated(latents)
                    result["S_random"][str(n)] = shift_score(a_ablated, a_biased, a_oracle)
                    result["accuracy_ablated_random"][str(n)] = a_ablated
                    result["random_latents"][str(n)] = latents.tolist()
    finally:
        model.train(was_training)

    gap = a_oracle - a_biased
    warning = None
    if abs(gap) <= MIN_GAP:
        warning = (f"A_oracle − A_biased = {gap:.4f} is within ±{MIN_GAP}: the biased probe is no worse than the "
                   f"oracle on the balanced test set, so there is no spurious gap to close and S is NaN")
    top = max(evaluated, default=0)
    return {
        **result,
        "top_scores": [float(scores[i]) for i in order[:top]],
        "accuracy_biased": a_biased,
        "accuracy_oracle": a_oracle,
        "spurious_accuracy": _accuracy(spurious_probe, raw_test, spurious[test]),
        "ns": evaluated,
        "skipped_ns": skipped,
        "n_per_cell": n_per_cell,
        "n_train": len(train),
        "n_train_biased": len(biased_train),
        "n_test": len(test),
        "n_latents_total": n_latents,
        "test_fraction": test_fraction,
        "seed": seed,
        "warning": warning,
    }
