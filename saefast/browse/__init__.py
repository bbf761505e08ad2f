"""The feature browser: a static HTML site of what each latent means, across the members of an ensemble.

:func:`browse` makes one streaming pass over an activation store (:mod:`.collect`), encodes the contexts of the
chosen examples again, adds the ensemble views (:mod:`.views`: each latent's nearest latents in the other members,
the members' shared features, boosting's variance per stage, the tokens a decoder row promotes through the
language model's unembedding) and writes the site (:mod:`.site`): ``index.html`` and ``latent.html``, data in
sharded ``.js`` files loaded lazily, no server, no network. ``saefast browse`` is the command.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..data.harvest import TOKEN_IDS
from ..data.store import ActivationStore
from ..models import Ensemble, SparseDictionary
from ..version import __version__
from .collect import Collected, collect, contexts
from .site import write_site
from .views import logit_effects, nearest_latents, shared_matrix

__all__ = ["browse", "collect", "contexts", "write_site"]

QUANTILE_BANDS = (0.25, 0.5, 0.75, 1.0)
"""Upper edges of the bands of a latent's activation distribution whose examples the page shows."""


def _token_decoder(tokenizer: Any):
    """Token ids → display strings (one at a time, cached), or ``⟨id⟩`` without a tokenizer."""
    cache: dict[int, str] = {}

    def decode(ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i not in cache:
                cache[i] = tokenizer.decode([i]) if tokenizer is not None else f"⟨{i}⟩"
            out.append(cache[i])
        return out

    return decode


def _quantile_examples(sample: torch.Tensor, per_band: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """From one latent's sampled ``(row, activation)`` pairs: ``per_band`` examples evenly spread in each band of
    :data:`QUANTILE_BANDS` of the sample's activations."""
    filled = sample[~torch.isnan(sample[:, 0])]
    if filled.shape[0] == 0:
        return []
    ordered = filled[torch.argsort(filled[:, 1])]
    n, bands, lower = ordered.shape[0], [], 0.0
    for upper in QUANTILE_BANDS:
        a, b = int(lower * n), max(int(lower * n) + 1, int(upper * n))
        picks = torch.linspace(a, b - 1, min(per_band, b - a)).round().long().unique() if b > a else []
        rows = [(int(ordered[i, 0]), float(ordered[i, 1])) for i in picks]
        if rows:
            bands.append((upper, rows))
        lower = upper
    return bands


@torch.no_grad()
def browse(model: SparseDictionary, store: ActivationStore | str | os.PathLike, out: str | os.PathLike, *,
           top_n: int = 10, per_band: int = 3, width: int = 8, max_tokens: int | None = None, lm: Any = None,
           tokenizer: Any = None, threshold: float = 0.7, logits: int = 8, title: str | None = None,
           classes: dict[str, Any] | None = None, backend: str | None = None, progress: bool = True,
           seed: int = 0) -> dict[str, Any]:
    """Write the feature browser of ``model`` over ``store`` to ``out/`` and return a summary (tokens scanned,
    latents, seconds in all, in the scan and in the contexts, tokens per second, bytes of the statistics).

    ``top_n`` top-activating contexts per latent and ``per_band`` examples from each quartile band of its
    activations, each ``width`` tokens either side, shaded by the latent's activation; ``max_tokens`` limits the
    scan. ``tokenizer`` decodes the store's ``token_ids``; ``lm`` (the harvest's language model) adds the
    ``logits`` tokens each decoder row promotes and suppresses. ``threshold``: the decoder cosine above which two
    members share a feature. ``classes`` (an SAE-ception run's sharpened latent sets: ``{class name: latents}``,
    latents as flat indices ``j·M + m`` or a bool mask over them, e.g. a row of ``masks.safetensors``) is listed
    on the index, each latent linking to its page. A multi-chain boosting model is browsed one chain at a time
    (``model.chain(c)``).
    """
    if not isinstance(model, SparseDictionary):
        raise TypeError(f"model must be an SAE or Ensemble, got {type(model).__name__}")
    if isinstance(model, Ensemble) and model.chains > 1:
        raise ValueError(f"a model of {model.chains} boosting chains has no single reconstruction: browse one chain "
                         f"at a time, model.chain(c)")
    if getattr(model, "decode_only", False):
        raise ValueError("a decode-only SAE (a boosting ensemble's as_sae) cannot encode; browse the ensemble")
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    if store.d != model.cfg.d_in:
        raise ValueError(f"the store's rows are d={store.d} wide but the model reads d_in={model.cfg.d_in}")
    if TOKEN_IDS not in store.extras:
        raise ValueError(f"the store {store.path} has no {TOKEN_IDS} column (stores from saefast harvest do): the "
                         f"browser needs the tokens to show contexts")
    for name, value in (("top_n", top_n), ("per_band", per_band), ("logits", logits)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "logits" else 1):
            raise ValueError(f"{name} must be a whole number >= {0 if name == 'logits' else 1}, got {value!r}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"width must be a whole number >= 0, got {width!r}")
    class_sets = _class_sets(classes, model)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        # candidates enough for top_n contexts that do not overlap (see _separated)
        stats = collect(model, store, top_n=4 * top_n, sample=max(8, 4 * per_band), max_tokens=max_tokens,
                        backend=backend, progress=progress, seed=seed)
        scanned = time.perf_counter()
        latents = _latents(model, store, stats, top_n, per_band, width, tokenizer, lm, logits, backend, progress)
        examined = time.perf_counter()
    finally:
        model.train(was_training)
    J, M = model.n_stacked, model.latents_per_stack
    ensemble: dict[str, Any] = {"shared_threshold": threshold, "shared_matrix": None, "stage_variance": None,
                                "classes": class_sets}
    if isinstance(model, Ensemble):
        cosine, index = nearest_latents(model.W_dec)
        ensemble["shared_matrix"] = shared_matrix(cosine, threshold)
        for (j, m), entry in latents.items():
            entry["neighbours"] = [{"member": other, "latent": int(index[j, m, other]),
                                    "cosine": round(float(cosine[j, m, other]), 4)} for other in range(J) if other != j]
        if stats.explained is not None:
            ensemble["stage_variance"] = [round(b - a, 6) for a, b in zip([0.0, *stats.explained], stats.explained)]
    rows = [[j, m, entry["frequency"], entry["max_activation"], entry["mean_activation"], 0]
            for (j, m), entry in latents.items()]
    kind = "single" if not isinstance(model, Ensemble) else model.combine
    index = {"format": "saefast-browser", "version": 1,
             "title": title or f"{kind} · {J if kind != 'single' else 1} × {M:,} latents",
             "model": {"kind": kind, "members": J if kind != "single" else 1, "chains": 1, "latents_per_member": M,
                       "activation": model.cfg.activation,
                       "k": model.cfg.k if model.cfg.activation in ("topk", "batchtopk") else None},
             "data": {"store": str(store.path), "hook": store.hook, "tokens": stats.tokens,
                      "lm": (store.metadata.get("model") if lm is not None else None)},
             "columns": ["member", "latent", "frequency", "max_activation", "mean_activation", "shard"],
             "rows": rows, "ensemble": ensemble, "generated": {"saefast": __version__}}
    if kind == "single":  # an SAE's top-k groups are one dictionary: one member of J·M latents
        index["model"]["latents_per_member"] = J * M
    write_site(out, index, latents)
    seconds = time.perf_counter() - started
    state_bytes = sum(t.numel() * t.element_size() for t in (stats.count, stats.total, stats.maximum, stats.top,
                                                             stats.sample, stats.histogram))
    return {"tokens": stats.tokens, "latents": J * M, "seconds": seconds, "scan_seconds": scanned - started,
            "context_seconds": examined - scanned, "tokens_per_s": stats.tokens / seconds if seconds > 0 else None,
            "statistics_bytes": state_bytes, "index": str(Path(out) / "index.html")}


def _class_sets(classes: dict[str, Any] | None, model: SparseDictionary) -> dict[str, list[list[int]]] | None:
    """``{name: [[member, latent], ...]}`` from flat latent indices or bool masks; ValueError naming a bad one."""
    if classes is None:
        return None
    if not isinstance(classes, dict):
        raise TypeError(f"classes must be a dict {{class name: latents}}, got {type(classes).__name__}")
    J, M = model.n_stacked, model.latents_per_stack
    single = not isinstance(model, Ensemble)
    out = {}
    for name, latents in classes.items():
        latents = torch.as_tensor(latents)
        if latents.dtype == torch.bool:
            if latents.shape != (J * M,):
                raise ValueError(f"class {name!r}: a mask must have one entry per latent ({J * M}), got "
                                 f"{tuple(latents.shape)}")
            latents = torch.nonzero(latents).flatten()
        flat = [int(g) for g in latents.reshape(-1).tolist()]
        if any(not 0 <= g < J * M for g in flat):
            raise ValueError(f"class {name!r}: latent indices must be in [0, {J * M}), got {flat}")
        out[str(name)] = [[0, g] if single else list(divmod(g, M)) for g in flat]
    return out


def _separated(rows: list[int], width: int, n: int) -> list[int]:
    """The first ``n`` of ``rows`` (in descending activation) more than ``width`` rows away from every row kept
    before: a context then never holds a larger activation of the latent than the one it is shown for (a larger
    one nearby is a top example of its own, shown already)."""
    kept: list[int] = []
    for row in rows:
        if all(abs(row - other) > width for other in kept):
            kept.append(row)
            if len(kept) == n:
                break
    return kept


def _latents(model: SparseDictionary, store: ActivationStore, stats: Collected, top_n: int, per_band: int,
             width: int, tokenizer: Any, lm: Any, n_logits: int, backend: str | None, progress: bool,
             ) -> dict[tuple[int, int], dict[str, Any]]:
    """Every latent's page data (the contract of :mod:`.site`), neighbours left empty."""
    J, M = model.n_stacked, model.latents_per_stack
    G = J * M
    bands = [_quantile_examples(stats.sample[g], per_band) for g in range(G)]
    tops = [_separated([int(row) for row, _ in stats.top[g].tolist() if row == row], width, top_n)  # NaN: padding
            for g in range(G)]
    examples = sorted({(g, row) for g in range(G) for row in tops[g]}
                      | {(g, row) for g in range(G) for _, picks in bands[g] for row, _ in picks})
    decode = _token_decoder(tokenizer)  # one cache for the contexts and the logits
    context = contexts(model, store, examples, width, decode, backend=backend, progress=progress)
    effects = None
    if lm is not None and tokenizer is not None and n_logits:
        unembed = lm.get_output_embeddings().weight
        norm = getattr(getattr(lm, "model", None), "norm", None)
        effects = logit_effects(model.W_dec.detach().reshape(G, -1), unembed,
                                getattr(norm, "weight", None), n_logits)
    edges = stats.edges.tolist()
    latents = {}
    single = not isinstance(model, Ensemble)  # an SAE's top-k groups are one dictionary: one member
    for g in range(G):
        j, m = (0, g) if single else divmod(g, M)
        fired = int(stats.count[g])
        counts = stats.histogram[g]
        nonzero = torch.nonzero(counts).flatten()
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.numel() else (0, 1)  # dead: one empty bin
        entry = {"member": j, "latent": m, "frequency": round(fired / max(stats.tokens, 1), 6),
                 "max_activation": round(float(stats.maximum[g]), 4),
                 "mean_activation": round(float(stats.total[g]) / fired, 4) if fired else 0.0,
                 "histogram": {"edges": [round(e, 6) for e in edges[lo:hi + 1]],
                               "counts": counts[lo:hi].tolist()},
                 "top": [context[(g, row)] for row in tops[g]],
                 "quantiles": [{"quantile": q, "examples": [context[(g, row)] for row, _ in picks]}
                               for q, picks in bands[g]],
                 "logits": None, "neighbours": []}
        if effects is not None:
            high, high_ids, low, low_ids = (t[g].tolist() for t in effects)
            entry["logits"] = {"promoted": [[s, round(v, 4)] for s, v in zip(decode(high_ids), high)],
                               "suppressed": [[s, round(v, 4)] for s, v in zip(decode(low_ids), low)]}
        latents[(j, m)] = entry
    return latents
