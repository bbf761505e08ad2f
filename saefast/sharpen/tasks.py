"""The two real SAE-ception replications, offline, and how their per-cycle results are shown.

* ``digits`` — the paper's MNIST experiment on scikit-learn's bundled 8×8 handwritten digits (1,797 images): an
  MLP 64-16-16-10, the first hidden layer hooked, a ReLU + L1 SAE 16 → 256, N = 25 latents per class, the
  baseline and 2 cycles.
* ``fortunes`` — text classification on real SmolLM2-135M activations: the first blocks of the embedded model
  with a linear head on the mean hidden state, the last kept block hooked (per token), labelled text from
  Debian's ``fortunes`` packages (the label of an entry is its file).

``saefast sharpen --task digits`` runs the first (the default); ``run_task`` is the same from Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SAEConfig
from ..files import atomic_write_bytes
from .runner import SAECeption, SharpenConfig, Split

TASKS = ("digits", "fortunes")


@dataclass
class Task:
    """A classifier, its data and the run's defaults."""

    name: str
    model: nn.Module
    train: Split
    test: Split
    sae: SAEConfig
    config: SharpenConfig
    info: dict[str, Any] = field(default_factory=dict)


def digits_task(seed: int = 0, **overrides: Any) -> Task:
    """MLP 64-16-16-10 on the 8×8 digits (75 % train, stratified), ReLU + L1 SAE 16 → 256 on ``act1``, top-25."""
    from .classifiers import DigitsMLP, digits_splits

    (x_train, y_train), (x_test, y_test) = digits_splits(test_fraction=0.25, seed=seed)
    torch.manual_seed(seed)
    model = DigitsMLP(seed=seed)
    sae = SAEConfig(d_in=16, n_latents=256, activation="relu", l1_coef=3e-2, b_dec_init="mean")
    config = SharpenConfig(**{"cycles": 2, "epochs": 60, "finetune_epochs": 30, "lr": 3e-3, "batch_size": 64,
                              "aux_coef": 1.0, "top_n": 25, "sae_steps": 3000, "sae_lr": 3e-3,
                              "sae_batch_size": 256, "seed": seed, **overrides})
    return Task("digits", model, Split(x_train, y_train), Split(x_test, y_test), sae, config,
                {"data": "sklearn load_digits (8x8, 1,797 images)", "train": len(y_train), "test": len(y_test)})


def fortunes_task(seed: int = 0, categories: list[str] | None = None, per_class: int = 400, max_length: int = 32,
                  n_layers: int = 4, trainable_layers: int = 2, **overrides: Any) -> Task:
    """SmolLM2-135M's first ``n_layers`` blocks + a linear head on Debian fortunes categories; TopK SAE 576 → 2304
    on the last kept block (per token), top-25 per class."""
    from ..data.hf import load_model
    from ..data.text import DEFAULT_FORTUNE_CATEGORIES, fortunes
    from .classifiers import SmolLM2Classifier, text_splits

    categories = list(categories or DEFAULT_FORTUNE_CATEGORIES)
    texts, labels = fortunes(categories)
    lm, tokenizer = load_model("smollm2", progress=False)
    (train_inputs, y_train), (test_inputs, y_test), names = text_splits(
        texts, labels, tokenizer, max_length=max_length, test_fraction=0.25, seed=seed, per_class=per_class)
    model = SmolLM2Classifier(len(names), n_layers=n_layers, trainable_layers=trainable_layers, seed=seed,
                              model=lm, tokenizer=tokenizer)
    sae = SAEConfig(d_in=576, n_latents=2304, k=16, activation="topk")
    config = SharpenConfig(**{"cycles": 2, "epochs": 3, "finetune_epochs": 2, "lr": 1e-4, "batch_size": 16,
                              "aux_coef": 1.0, "top_n": 25, "sae_steps": 1500, "sae_lr": 1e-3, "skip_positions": 1,
                              "sae_batch_size": 512, "eval_batch_size": 32, "seed": seed, **overrides})
    return Task("fortunes", model, Split(train_inputs, y_train), Split(test_inputs, y_test), sae, config,
                {"data": f"Debian fortunes: {', '.join(names)}", "classes": names, "train": len(y_train),
                 "test": len(y_test), "max_length": max_length, "n_layers": n_layers,
                 "trainable_layers": trainable_layers})


BUILDERS: dict[str, Callable[..., Task]] = {"digits": digits_task, "fortunes": fortunes_task}

COLUMNS = [("cycle", "cycle", "{:d}"), ("test_accuracy", "test acc", "{:.4f}"), ("ari", "ARI", "{:.3f}"),
           ("silhouette_labels", "sil(y)", "{:.3f}"), ("silhouette_argmax", "sil(argmax)", "{:.3f}"),
           ("davies_bouldin", "DB", "{:.3f}"), ("calinski_harabasz", "CH", "{:.1f}"),
           ("uncertainty", "U (bits)", "{:.3f}"),
           ("csi", "CSI", "{:.3f}"), ("sae_explained_variance", "SAE EV", "{:.3f}"), ("sae_l0", "L0", "{:.1f}"),
           ("target_cosine_start", "cos(h,t) start", "{:.3f}"), ("target_cosine_end", "end", "{:.3f}")]


def format_history(history: list[dict[str, Any]]) -> str:
    """The per-cycle table (a GitHub markdown table)."""
    def cell(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return "–" if value is None else fmt.format(value)

    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in history]
    return "\n".join(lines)


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Accuracy and the class-structure metrics against the cycle, one panel each (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(key, title) for key, title, _ in COLUMNS[1:10]]
    fig, axes = plt.subplots(3, 3, figsize=(10, 8), constrained_layout=True)
    cycles = [row["cycle"] for row in history]
    for ax, (key, name) in zip(axes.flat, keys):
        ax.plot(cycles, [row[key] for row in history], marker="o")
        ax.set_title(name)
        ax.set_xticks(cycles)
        ax.set_xlabel("cycle")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_task(name: str, out: str | Path | None = None, seed: int = 0, log: Callable | None = None,
             resume: bool = False, **overrides: Any) -> dict[str, Any]:
    """Build task ``name``, run SAE-ception, write ``out/results.json`` (+ ``history.png`` and each cycle's SAE
    and masks); returns the report ``{"task", "info", "config", "sae", "history"}``. ``resume`` continues the run
    saved in ``out`` after its last complete cycle (see :class:`SAECeption`), with the same results."""
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    task = BUILDERS[name](seed=seed, **overrides)
    runner = SAECeption(task.model, task.sae, task.train, task.test, config=task.config, out=out, log=log,
                        resume=resume)
    history = runner.run()
    from ..version import __version__

    report = {"task": name, "saefast": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "info": task.info, "config": task.config.to_dict(), "sae": task.sae.to_dict(), "layer": runner.layer,
              "history": history}
    if out is not None:
        out = Path(out)
        atomic_write_bytes(out / "results.json", json.dumps(report, indent=2).encode())
        plot_history(history, out / "history.png", f"SAE-ception on {name}")
    return report
