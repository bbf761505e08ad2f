"""The main job: train a single SAE, a bagging ensemble and a boosting ensemble (same member size) on identical
data and compare them as in the paper's table.

Until the activation harvester lands, the data is SYNTHETIC: sparse combinations of a known dictionary
(:mod:`saefast.synthetic`), which also lets the table report how many true features each model recovered.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .checkpoint import atomic_write_bytes
from .config import SAEConfig
from .dictionary import SparseDictionary
from .ensemble import Ensemble
from .evaluate import evaluate
from .sae import SAE
from .synthetic import SyntheticSparseData, feature_recovery
from .train import train


@dataclass
class DemoConfig:
    """Size of the demo; ``quick()`` is the CI-sized version."""

    d_in: int = 64
    """Width of the synthetic activations."""
    n_features: int = 512
    """True dictionary size of the synthetic data."""
    active: int = 4
    """True features active per sample."""
    noise: float = 0.02
    """Gaussian noise added to every activation."""
    n_latents: int = 256
    """Latents per SAE / per member."""
    k: int = 8
    """Top-k of every SAE."""
    members: int = 4
    """Ensemble size J."""
    steps: int = 600
    """Optimizer steps (per stage for boosting)."""
    batch_size: int = 512
    """Tokens per batch."""
    n_batches: int = 40
    """Distinct training batches (the trainer cycles over them)."""
    eval_tokens: int = 8192
    """Held-out tokens for the metrics."""
    lr: float = 2e-3
    """Peak learning rate."""
    seed: int = 0
    """Seed of the data and of the first model; the stability run uses seed + 1000."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (before any training starts)."""
        if self.members < 1:
            raise ValueError(f"an ensemble needs members >= 1, got {self.members}")
        for name in ("d_in", "n_features", "active", "n_latents", "k", "steps", "batch_size", "n_batches",
                     "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        SAEConfig(d_in=self.d_in, n_latents=self.n_latents, k=self.k)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smaller run for CI and smoke tests (well under a minute on 2 cores)."""
        return cls(n_features=256, n_latents=128, members=3, steps=150, batch_size=256, n_batches=10,
                   eval_tokens=2048)


def _build(kind: str, cfg: SAEConfig, members: int, seed: int) -> SparseDictionary:
    if kind == "single":
        return SAE(cfg, seed=seed)
    return Ensemble(cfg, members, kind, seed=seed)


def _decoder_rows(model: SparseDictionary) -> torch.Tensor:
    return model.W_dec.detach().reshape(-1, model.cfg.d_in)


def run_demo(config: DemoConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the three models twice (two seeds, for stability), evaluate, and write ``out_dir/results.json``."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = SyntheticSparseData(config.d_in, config.n_features, config.active, config.noise, seed=config.seed)
    batches = data.batches(config.n_batches, config.batch_size)
    held_out = data.sample(config.eval_tokens)
    cfg = SAEConfig(d_in=config.d_in, n_latents=config.n_latents, k=config.k, activation="topk")
    rows = []
    for kind in ("single", "bagging", "boosting"):
        trained = []
        for seed in (config.seed, config.seed + 1000):
            model = _build(kind, cfg, config.members, seed)
            start = time.perf_counter()
            train(model, batches, steps=config.steps, lr=config.lr, progress=progress, log_every=config.steps)
            seconds = time.perf_counter() - start
            trained.append((model, seconds))
        model, seconds = trained[0]
        stages = 1 if kind != "boosting" else config.members
        result = evaluate(model, held_out)
        dictionary = _decoder_rows(model)
        rows.append({
            "model": kind,
            "members": 1 if kind == "single" else config.members,
            "latents": dictionary.shape[0],
            "explained_variance": result["explained_variance"],
            "mse": result["mse"],
            "l0": result["l0"],
            "dead_fraction": result["dead_fraction"],
            "diversity": metrics.diversity(dictionary),
            "stability": metrics.relaxed_stability(dictionary, _decoder_rows(trained[1][0]), symmetric=True),
            "features_recovered": float((feature_recovery(data.features, dictionary) > 0.9).float().mean()),
            "train_tokens_per_s": config.steps * stages * config.batch_size / seconds,
        })
        model.save(out / f"model_{kind}")
    report = {"data": "synthetic (sparse combinations of a known dictionary)", "config": asdict(config),
              "torch": torch.__version__, "rows": rows}
    atomic_write_bytes(out / "results.json", json.dumps(report, indent=2).encode())
    return report


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    columns = [("model", "{}"), ("members", "{}"), ("latents", "{}"), ("explained_variance", "{:.4f}"),
               ("mse", "{:.4f}"), ("l0", "{:.1f}"), ("diversity", "{:.3f}"), ("stability", "{:.3f}"),
               ("features_recovered", "{:.3f}"), ("train_tokens_per_s", "{:,.0f}")]
    header = [name for name, _ in columns]
    cells = [[fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
