"""``saefast browse``: the feature browser of a trained run over an activation store (a static HTML site)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from .runs import CLIError, read_run, stderr_line


def _language_model(args: argparse.Namespace, store: Any, device: Any) -> tuple[Any, Any]:
    """The harvest's language model and tokenizer (``--lm``, else the store's recorded model), offline; without
    one (``--no-lm``, or it cannot be loaded) contexts show token ids and there are no logits."""
    from ..data.hf import load_model

    name = args.lm or store.metadata.get("model")
    if args.no_lm or not name:
        return None, None
    try:
        return load_model(name, device=str(device), progress=False)
    except (OSError, ValueError, ImportError) as err:
        warnings.warn(f"could not load the language model {name!r} ({err}); contexts show token ids, no logits",
                      stacklevel=2)
        return None, None


def _sharpened_classes(masks: Path) -> dict[str, Any]:
    """An SAE-ception cycle's sharpened latent sets from its ``masks.safetensors`` (``[C, latents]`` bool), named
    from the run's ``results.json`` (two folders up) when it lists the task's classes, else ``class c``."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        mask = load_file(str(masks))["masks"]
    except (OSError, SafetensorError, KeyError) as err:
        raise CLIError(f"--classes {masks}: not an SAE-ception masks.safetensors ({err})") from None
    names = [f"class {c}" for c in range(mask.shape[0])]
    results = masks.parent.parent / "results.json"
    if results.is_file():
        recorded = json.loads(results.read_text()).get("info", {}).get("classes")
        if isinstance(recorded, list) and len(recorded) == mask.shape[0]:
            names = [str(name) for name in recorded]
    return {name: row.bool() for name, row in zip(names, mask)}


def run_browse(args: argparse.Namespace) -> int:
    """``saefast browse``."""
    from ..browse import browse
    from ..data.store import ActivationStore
    from ..devices import check_device
    from ..formats import load

    for name in ("top_n", "per_band", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.width < 0:
        raise CLIError(f"--width must be >= 0, got {args.width}")
    device = check_device(args.device)
    model = load(args.model, map_location=device)
    hook = args.hook or (read_run(Path(args.model)) or {}).get("hook")
    store = ActivationStore(args.data, hook=hook)
    if store.d != model.cfg.d_in:
        raise CLIError(f"the model expects d_in={model.cfg.d_in} but {args.data} holds d={store.d} ({store.hook})")
    classes = _sharpened_classes(Path(args.classes)) if args.classes else None
    lm, tokenizer = _language_model(args, store, device)
    if lm is not None:
        stderr_line(f"logits and tokens from {args.lm or store.metadata.get('model')}")
    summary = browse(model, store, args.out, top_n=args.top_n, per_band=args.per_band, width=args.width,
                     max_tokens=args.max_tokens, lm=lm, tokenizer=tokenizer, backend=args.backend,
                     progress=not args.no_progress, title=args.title, classes=classes)
    print(f"wrote the feature browser of {summary['latents']:,} latents over {summary['tokens']:,} tokens "
          f"({summary['tokens_per_s']:,.0f} tokens/s, {summary['seconds']:.1f} s) — open {summary['index']}")
    return 0
