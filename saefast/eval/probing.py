"""Sparse probing (SAEBench): how much of a labelled concept a few latents of a dictionary carry.

Each example ``e`` (a text) owns token rows ``x_r``, ``r ∈ e`` (:class:`~saefast.data.examples.ExampleActivations`);
its features are the mean-pooled codes ``f_e = (1/|e|) Σ_{r∈e} z(x_r)`` over all ``J·M`` latents, latent
``j·M + i`` being latent ``i`` of stacked dictionary ``j`` (:func:`pooled_codes`). For each class ``c``, one
**balanced** binary task: the examples of ``c`` against as many drawn from the other classes (chance is 0.5), split
train/test stratified (:func:`one_vs_rest_splits`). For each ``k``:

    S_k = top-k of |mean_{e∈c, train} f_e[l] − mean_{e∉c, train} f_e[l]|  over latents l     (:func:`top_k_latents`)
    accuracy_k(c) = test accuracy of a logistic probe on f[:, S_k]                            (:func:`probe_accuracy`)

and :func:`sparse_probing` reports ``accuracy_k`` averaged over the classes, next to the baseline: the same probe on
all ``d`` dimensions of the mean-pooled activations ``x̄_e`` ("k = all"). scikit-learn is imported on use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data.examples import ExampleActivations
from ..models import SparseDictionary

__all__ = ["ProbeTask", "fit_probe", "mean_over_datasets", "one_vs_rest_splits", "pooled_codes", "probe_accuracy",
           "sparse_probing", "top_k_latents"]

PROBE_MAX_ITER = 2000
"""L-BFGS iterations of the logistic probe: ample for standardised features and a few thousand examples."""


# ------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------


def check_examples(model: SparseDictionary, acts: ExampleActivations) -> None:
    """``acts`` must be :class:`ExampleActivations` of the model's width ``d_in``."""
    if not isinstance(acts, ExampleActivations):
        raise TypeError(f"acts must be ExampleActivations, got {type(acts).__name__}")
    if acts.d != model.d_in:
        raise ValueError(f"the activations have d={acts.d} but the model expects d_in={model.d_in}")


def check_batch_size(batch_size: int) -> None:
    """``batch_size`` must be an int >= 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def pooled_codes(model: SparseDictionary, acts: ExampleActivations, batch_size: int = 4096,
                 backend: str | None = None) -> torch.Tensor:
    """``[E, J·M]`` float32 on the CPU: each example's mean code over its rows,
    ``f[e, j·M + i] = (1/|e|) Σ_{r∈e} z_{r, j, i}``.

    The rows are encoded ``batch_size`` at a time (float32, inference mode: a model in training mode is switched to
    eval and back, so BatchTopK uses its learned threshold) and their sparse codes are added straight into their
    example's row: memory is the ``[E, J·M]`` result plus one batch's ``[N, J, K]`` codes, never a dense code
    matrix of all rows."""
    check_examples(model, acts)
    check_batch_size(batch_size)
    device = model.W_dec.device
    sums = torch.zeros(acts.n_examples, model.n_latents_total, dtype=torch.float32)
    example_of_row = acts.example_ids()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, acts.rows.shape[0], batch_size):
                x = acts.rows[start:start + batch_size].to(device=device, dtype=torch.float32)
                codes = model.encode(x, backend=backend)
                n_tokens = codes.n_tokens
                values = codes.values.float().cpu().reshape(-1)
                latents = codes.global_indices().cpu().reshape(n_tokens, -1)
                examples = example_of_row[start:start + n_tokens].view(-1, 1).expand_as(latents)
                # padding slots carry value 0: adding them changes nothing
                sums.index_put_((examples.reshape(-1), latents.reshape(-1)), values, accumulate=True)
    finally:
        model.train(was_training)
    return sums / acts.counts().to(torch.float32).view(-1, 1)


# ------------------------------------------------------------------------------------------------------
# Tasks, latent selection and probes
# ------------------------------------------------------------------------------------------------------


class ProbeTask(NamedTuple):
    """One balanced binary task: example indices and their 0/1 targets, train and test."""

    label: Any
    """The positive class."""
    train_index: np.ndarray
    """Example indices of the train split (int64)."""
    train_y: np.ndarray
    """Their targets, 1 for the positive class (int64)."""
    test_index: np.ndarray
    """Example indices of the test split."""
    test_y: np.ndarray
    """Their targets."""


def _as_labels(labels: Sequence[Any] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be 1-D (one per example), got shape {array.shape}")
    return array


def check_test_fraction(test_fraction: float) -> None:
    """``test_fraction`` must lie strictly between 0 and 1."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")


def _python(value: Any) -> Any:
    """A NumPy scalar as the Python value (JSON-friendly)."""
    return value.item() if isinstance(value, np.generic) else value


def balanced_split(index: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, what: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.model_selection.train_test_split(index, y, test_size=test_fraction, stratify=y,
    random_state=seed)``; a split too small for both classes on both sides is a ValueError naming ``what``."""
    from sklearn.model_selection import train_test_split

    try:
        train_index, test_index, train_y, test_y = train_test_split(
            index, y, test_size=test_fraction, stratify=y, random_state=seed)
    except ValueError as err:
        raise ValueError(f"{what}: {len(index)} examples are too few for a stratified split with "
                         f"test_fraction={test_fraction} ({err})") from err
    for side, targets in (("train", train_y), ("test", test_y)):
        if len(np.unique(targets)) < 2:
            raise ValueError(f"{what}: the {side} split of {len(index)} examples lacks a class; use more examples "
                             f"or another test_fraction")
    return train_index, train_y, test_index, test_y


def one_vs_rest_splits(labels: Sequence[Any] | np.ndarray | torch.Tensor, test_fraction: float = 0.25,
                       seed: int = 0) -> list[ProbeTask]:
    """One balanced binary task per class ``c`` (classes in sorted order): ``n = min(|c|, |rest|)`` examples of
    ``c`` (target 1) and ``n`` of the other classes (target 0), each drawn without replacement with a generator
    seeded ``(seed, position of c)`` where there are more; then a stratified train/test split
    (``train_test_split(stratify=y, random_state=seed)``). Chance accuracy is 0.5.

    Fewer than 2 classes, or a class whose task cannot be split with both targets on both sides, is a ValueError
    naming it."""
    check_test_fraction(test_fraction)
    array = _as_labels(labels)
    classes = np.unique(array)
    if len(classes) < 2:
        only = f" (only {_python(classes[0])!r})" if len(classes) else ""
        raise ValueError(f"one-vs-rest probing needs at least 2 classes, the labels have {len(classes)}{only}")
    tasks = []
    for position, label in enumerate(classes):
        positives, negatives = np.flatnonzero(array == label), np.flatnonzero(array != label)
        n = min(len(positives), len(negatives))
        if n < 2:
            raise ValueError(f"class {_python(label)!r} has {len(positives)} example(s) against {len(negatives)} "
                             f"other(s): a balanced task needs at least 2 of each")
        rng = np.random.default_rng([int(seed), position])
        if len(positives) > n:
            positives = np.sort(rng.choice(positives, n, replace=False))
        if len(negatives) > n:
            negatives = np.sort(rng.choice(negatives, n, replace=False))
        index = np.concatenate([positives, negatives]).astype(np.int64)
        y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
        split = balanced_split(index, y, test_fraction, seed, f"class {_python(label)!r} (one vs rest)")
        tasks.append(ProbeTask(_python(label), *split))
    return tasks


def top_k_latents(features_train: torch.Tensor | np.ndarray, y_train: Sequence[int] | np.ndarray | torch.Tensor,
                  k: int) -> torch.Tensor:
    """LongTensor ``[k]``: the ``k`` latents with the largest ``|mean_{y=1} f[:, l] − mean_{y=0} f[:, l]|`` over the
    train examples (float64 means), largest first; equal differences are ordered by latent index."""
    features = torch.as_tensor(_numpy(features_train)).double()
    y = torch.as_tensor(_numpy(y_train)).reshape(-1)
    if features.dim() != 2 or features.shape[0] != y.shape[0]:
        raise ValueError(f"features_train must be [n, L] with n = len(y_train) = {y.shape[0]}, got "
                         f"{tuple(features.shape)}")
    positive = y == 1
    if not bool(positive.any()) or bool(positive.all()) or not bool(((y == 0) | positive).all()):
        raise ValueError("y_train must hold 0/1 targets with both values present")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= features.shape[1]:
        raise ValueError(f"k must be an int in 1..{features.shape[1]} (the latents), got {k!r}")
    difference = (features[positive].mean(0) - features[~positive].mean(0)).abs()
    return torch.sort(-difference, stable=True).indices[:k]


def fit_probe(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray, seed: int = 0) -> Any:
    """A fitted scikit-learn pipeline ``StandardScaler → LogisticRegression(lbfgs, C=1, random_state=seed)``:
    ``p(y=1|x) = σ(w·(x − μ)/σ_x + b)``. Standardising lets the solver converge on residual-stream activations of
    any norm; its raw-space weight is ``w/σ_x`` (see :mod:`.scr`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(),
                          LogisticRegression(solver="lbfgs", max_iter=PROBE_MAX_ITER, random_state=seed))
    return probe.fit(_numpy(train_x), np.asarray(train_y))


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def probe_accuracy(train_x: np.ndarray | torch.Tensor, train_y: np.ndarray, test_x: np.ndarray | torch.Tensor,
                   test_y: np.ndarray, seed: int = 0) -> float:
    """Test accuracy ``(1/n_test) Σ [ŷ = y]`` of the :func:`fit_probe` probe trained on ``(train_x, train_y)``."""
    probe = fit_probe(train_x, train_y, seed)
    return float((probe.predict(_numpy(test_x)) == np.asarray(test_y)).mean())


# ------------------------------------------------------------------------------------------------------
# The evaluation
# ------------------------------------------------------------------------------------------------------


def _check_ks(ks: Sequence[int], n_latents: int) -> list[int]:
    ks = list(ks)
    if not ks:
        raise ValueError("ks is empty: give at least one number of latents to probe with")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k must be an int >= 1, got {k!r}")
        if k > n_latents:
            raise ValueError(f"k={k} is larger than the model's {n_latents} latents")
    return sorted({int(k) for k in ks})


def sparse_probing(model: SparseDictionary, acts: ExampleActivations,
                   labels: Sequence[Any] | np.ndarray | torch.Tensor, ks: Sequence[int] = (1, 2, 5, 10, 20),
                   test_fraction: float = 0.25, seed: int = 0, baseline: bool = True,
                   pooled: torch.Tensor | None = None, batch_size: int = 4096,
                   backend: str | None = None) -> dict[str, Any]:
    """Sparse probing accuracy (SAEBench): for each class ``c`` (:func:`one_vs_rest_splits`) and each ``k``, the
    probe on the top-``k`` latents of the train split (:func:`top_k_latents`, :func:`probe_accuracy`) scored on the
    test split; ``accuracy[k] = (1/C) Σ_c accuracy_k(c)``. ``baseline``: the same probe on every dimension of the
    mean-pooled activations ``acts.pooled()``, averaged over the classes (``None`` without ``baseline``).

    ``pooled``: precomputed :func:`pooled_codes` ``[E, J·M]`` (several evaluations of one model). Everything is
    validated before any compute: ``len(labels) = E``, at least 2 classes, each splittable, every ``k`` at most
    ``J·M``.

    Returns ``{"accuracy": {"k": mean}, "baseline": mean | None, "per_class": [{"class", "n_train", "n_test",
    "accuracy": {"k": ..}, "latents": {"k": [..]}, "baseline"}], "classes", "ks", "n_examples", "n_latents_total",
    "test_fraction", "seed"}``."""
    check_examples(model, acts)
    check_batch_size(batch_size)
    label_array = _as_labels(labels)
    if len(label_array) != acts.n_examples:
        raise ValueError(f"labels has {len(label_array)} entries but there are {acts.n_examples} examples")
    n_latents = model.n_latents_total
    ks = _check_ks(ks, n_latents)
    if pooled is not None and (not isinstance(pooled, torch.Tensor) or pooled.shape != (acts.n_examples, n_latents)):
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ValueError(f"pooled must be the [E, J·M] = [{acts.n_examples}, {n_latents}] pooled codes, got {shape}")
    tasks = one_vs_rest_splits(label_array, test_fraction, seed)

    features = (pooled_codes(model, acts, batch_size, backend) if pooled is None else pooled).detach().cpu()
    features = features.float().numpy()
    raw = acts.pooled().cpu().numpy() if baseline else None
    per_class = []
    for task in tasks:
        train_f, test_f = features[task.train_index], features[task.test_index]
        accuracy, chosen = {}, {}
        for k in ks:
            latents = top_k_latents(train_f, task.train_y, k).numpy()
            chosen[str(k)] = latents.tolist()
            accuracy[str(k)] = probe_accuracy(train_f[:, latents], task.train_y, test_f[:, latents], task.test_y,
                                              seed)
        base = None
        if raw is not None:
            base = probe_accuracy(raw[task.train_index], task.train_y, raw[task.test_index], task.test_y, seed)
        per_class.append({"class": task.label, "n_train": len(task.train_index), "n_test": len(task.test_index),
                          "accuracy": accuracy, "latents": chosen, "baseline": base})
    return {
        "accuracy": {str(k): float(np.mean([c["accuracy"][str(k)] for c in per_class])) for k in ks},
        "baseline": float(np.mean([c["baseline"] for c in per_class])) if baseline else None,
        "per_class": per_class,
        "classes": [task.label for task in tasks],
        "ks": ks,
        "n_examples": acts.n_examples,
        "n_latents_total": n_latents,
        "test_fraction": test_fraction,
        "seed": seed,
    }


def mean_over_datasets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline of several :func:`sparse_probing` results (one per dataset): ``mean_accuracy[k]`` =
    ``(1/D) Σ_datasets accuracy[k]`` and ``mean_baseline`` likewise (``{}`` for no dataset; the baseline is left
    out where a result has none)."""
    if not results:
        return {}
    values = list(results.values())
    ks = list(values[0]["accuracy"])
    summary: dict[str, Any] = {"mean_accuracy": {k: sum(r["accuracy"][k] for r in values) / len(values) for k in ks}}
    if all(r.get("baseline") is not None for r in values):
        summary["mean_baseline"] = sum(r["baseline"] for r in values) / len(values)
    return summary
