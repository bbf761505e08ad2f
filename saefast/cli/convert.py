"""``saefast convert``: an SAE from one library's format to another's, without retraining.

    saefast convert SRC --to saelens OUT            # SRC's format is detected from its files (or --from)

Reading: saefast runs and checkpoints, SAELens, sparsify, dictionary_learning and OpenAI's sparse_autoencoder
(:mod:`saefast.formats`). Writing: saefast, SAELens, sparsify. When SRC is a saefast run, the metadata those tools
read — the model's name, the hook, the context size and the dtype of the activations — comes from what the harvest
recorded in the run's activation store.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .runs import CLIError, read_run


def export_metadata(src: Path) -> dict[str, Any]:
    """``model_name``, ``hook_name``, ``context_size`` and ``dtype`` of the activations a saefast run trained on,
    from its ``run.json`` and the harvest's record in its store (empty for anything else)."""
    run = read_run(src) or {}
    metadata: dict[str, Any] = {}
    if run.get("hook"):
        metadata["hook_name"] = run["hook"]
    if run.get("data"):
        try:
            from ..data.store import ActivationStore

            harvest = ActivationStore(run["data"], hook=run.get("hook")).metadata.get("harvest") or {}
        except (OSError, ValueError):
            harvest = {}  # the store moved or is gone: export without what only it knew
        if harvest.get("model", {}).get("source"):
            metadata["model_name"] = harvest["model"]["source"]
        if harvest.get("context"):
            metadata["context_size"] = int(harvest["context"])
        if harvest.get("dtype"):
            metadata["dtype"] = str(harvest["dtype"])
    return metadata


def run_convert(args: argparse.Namespace) -> int:
    """``saefast convert``: load SRC (detected or ``--from``), write OUT in ``--to``."""
    from ..formats import FORMATS, WRITABLE, detect_format, load, save

    src, out = Path(args.src), Path(args.out)
    if args.source_format is not None and args.source_format not in FORMATS:
        raise CLIError(f"--from {args.source_format}: choose one of {', '.join(FORMATS)}")
    if args.to not in WRITABLE:
        raise CLIError(f"--to {args.to}: saefast writes {', '.join(WRITABLE)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} exists and is not an empty directory; choose a new one")
    source_format = args.source_format or detect_format(src)
    model = load(src, format=source_format)
    metadata = export_metadata(src)
    for key in ("model_name", "hook_name", "context_size"):
        value = getattr(args, key)
        if value is not None:
            metadata[key] = value
    save(model, out, format=args.to, metadata=metadata or None)
    what = f"{type(model).__name__} with {model.n_latents_total:,} latents, d_in={model.cfg.d_in}"
    print(f"converted {src} ({source_format}: {what}) to {out} ({args.to})"
          + (f"; metadata {metadata}" if metadata else ""))
    return 0
