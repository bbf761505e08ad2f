"""EleutherAI sparsify SAEs: a folder with ``cfg.json`` and ``sae.safetensors`` (``SparseCoder.save_to_disk``), or
the folder above it when that holds exactly one such hookpoint folder (sparsify's trainer saves one per hookpoint).

sparsify stores ``encoder.weight [M, d]``, ``encoder.bias [M]``, ``W_dec [M, d]``, ``b_dec [d]``; ``cfg.json``
holds ``d_in``, ``num_latents`` (0: ``d_in · expansion_factor``), ``k`` and ``activation``. Its forward is
``pre = ReLU(encoder(x − b_dec))``, codes ``z`` = the selected entries of ``pre``, ``x̂ = W_decᵀ z + b_dec``:

* ``topk``: the ``k`` largest entries of ``ReLU(pre)``. saefast's ``topk`` takes the ``k`` largest of ``pre``
  and then the ReLU: the same dense codes (ReLU is monotone, and where fewer than ``k`` entries are positive both
  fill the rest with zeros) → ``topk`` with ``k``;
* ``groupmax``: the largest entry of ``ReLU(pre)`` in each of ``k`` contiguous groups of ``M/k`` latents → saefast's
  ``topk`` with ``groups = k`` and one latent per group (``k = 1``): the same codes.

saefast also subtracts ``b_dec`` before encoding, so the weights load as stored (same dtype), with
``normalize_decoder=False`` so that further training does not renormalise rows sparsify left at other norms.
Refused, by name: transcoders (``transcode``: they predict another module's output and do not subtract ``b_dec``)
and skip connections (``skip_connection`` / ``W_skip``: an extra ``W_skip x`` term).

:func:`save` writes what ``sparsify.SparseCoder.load_from_disk`` reads: a ``topk`` SAE (``groups = 1``), or a
grouped one-per-group ``topk`` SAE as ``groupmax``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from ..config import SAEConfig
from ..files import atomic_write_bytes
from ..models.dictionary import SparseDictionary
from ..models.sae import SAE
from . import FormatError
from .common import build_sae, common_dtype
from .saelens import (
    check_no_extra_keys,
    config_int,
    exportable_sae,
    read_json,
    read_safetensors,
    weight,
)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
ACTIVATIONS = ("topk", "groupmax")
"""The sparsify activations this module reads and writes."""


def _is_hookpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _hookpoints(path: Path) -> list[Path]:
    """The hookpoint folders directly under ``path`` (sorted by name)."""
    try:
        return sorted((child for child in path.iterdir() if _is_hookpoint(child)), key=lambda p: p.name)
    except OSError:
        return []


def detect(path: Path) -> bool:
    """A folder with ``cfg.json`` + ``sae.safetensors``, or one whose subfolders are such hookpoint folders."""
    path = Path(path)
    if not path.is_dir():
        return False
    return _is_hookpoint(path) or (not (path / CONFIG_FILE).exists() and bool(_hookpoints(path)))


def _sae_folder(path: Path) -> Path:
    """``path`` itself, or its one hookpoint subfolder (FormatError listing them if there are several)."""
    if _is_hookpoint(path):
        return path
    hookpoints = _hookpoints(path)
    if len(hookpoints) == 1:
        return hookpoints[0]
    if not hookpoints:
        raise FormatError(f"{path}: no {CONFIG_FILE} + {WEIGHTS_FILE}, here or in a hookpoint subfolder")
    raise FormatError(f"{path}: holds {len(hookpoints)} sparsify hookpoints ({', '.join(p.name for p in hookpoints)});"
                      f" load one of them, e.g. {hookpoints[0]}")


def _flag(config_path: Path, config: dict[str, Any], field: str) -> bool:
    value = config.get(field, False)
    if not isinstance(value, bool):
        raise FormatError(f"{config_path}: field {field!r} must be true or false, got {value!r}")
    return value


def load(path: Path, map_location: str | torch.device = "cpu") -> SAE:
    """The sparsify SAE at ``path`` as an :class:`SAE` with the same codes (``encode(x).to_dense()`` equals the
    scatter of sparsify's ``top_acts`` at ``top_indices``) and the same reconstruction (its ``sae_out``)."""
    folder = _sae_folder(Path(path))
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    config = read_json(config_path)
    for field, why in (("transcode", "a transcoder predicts another module's output from its input"),
                       ("skip_connection", "a skip connection adds W_skip·x to the output")):
        if _flag(config_path, config, field):
            raise FormatError(f"{config_path}: field {field!r} is true; saefast reads sparse autoencoders only ({why})")
    activation = config.get("activation", "topk")
    if activation not in ACTIVATIONS:
        raise FormatError(f"{config_path}: field 'activation' is {activation!r}; saefast reads "
                          f"{', '.join(ACTIVATIONS)}")
    D = config_int(config_path, config, "d_in")
    M = config.get("num_latents", 0)
    if M == 0:
        M = D * config_int(config_path, config, "expansion_factor", 32)
    else:
        M = config_int(config_path, config, "num_latents")
    k = config_int(config_path, config, "k", 32)
    if k > M or (activation == "groupmax" and M % k != 0):
        raise FormatError(f"{config_path}: field 'k' is {k}; {activation} needs "
                          f"{'k groups dividing' if activation == 'groupmax' else 'k at most'} num_latents={M}")

    tensors = read_safetensors(weights_path)
    if "W_skip" in tensors:
        raise FormatError(f"{weights_path}: key 'W_skip' (a skip connection, x̂ += W_skip·x) has no saefast "
                          f"equivalent")
    names = {"encoder.weight": (M, D), "encoder.bias": (M,), "W_dec": (M, D), "b_dec": (D,)}
    check_no_extra_keys(weights_path, tensors, set(names), "a sparsify SAE has no others")
    origin = f"{config_path.name} (d_in={D}, num_latents={M})"
    w = {key: weight(weights_path, tensors, key, shape, origin) for key, shape in names.items()}
    dtype = common_dtype(weights_path, w)
    if activation == "groupmax":
        cfg = SAEConfig(d_in=D, n_latents=M, k=1, activation="topk", groups=k, normalize_decoder=False)
    else:
        cfg = SAEConfig(d_in=D, n_latents=M, k=k, activation="topk", normalize_decoder=False)
    return build_sae(cfg, dtype, w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"],
                     map_location=map_location)


def save(model: SparseDictionary, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a single TopK :class:`SAE`) as a sparsify hookpoint folder: ``cfg.json`` +
    ``sae.safetensors`` with ``encoder.weight = W_enc``, ``encoder.bias = b_enc``, ``W_dec``, ``b_dec`` (sparsify's
    orientation is saefast's). ``topk`` with ``groups = 1`` → ``topk``; ``topk`` with ``k = 1`` per group →
    ``groupmax`` with ``k = groups``. sparsify's ``cfg.json`` has no place for ``metadata`` (the model and
    hookpoint are the trainer's, one folder up): it is not written.

    Refused: ensembles, a boosting ``as_sae()``, and every other activation (sparsify has only TopK and GroupMax):
    ReLU, JumpReLU and BatchTopK SAEs export to SAELens instead."""
    sae = exportable_sae(model, "sparsify")
    cfg, path = sae.cfg, Path(path)
    if cfg.activation != "topk":
        raise FormatError(f"cannot write a {cfg.activation} SAE in the sparsify format: sparsify's activations are "
                          f"TopK and GroupMax only; write it in the SAELens format instead")
    if cfg.groups == 1:
        activation, k = "topk", cfg.k
    elif cfg.k == 1:
        activation, k = "groupmax", cfg.groups
    else:
        raise FormatError(f"cannot write this SAE in the sparsify format: it keeps the top {cfg.k} latents of each of "
                          f"{cfg.groups} groups (an ensemble's as_sae()), which sparsify has no activation for")
    with torch.no_grad():
        tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
    config = {"activation": activation, "expansion_factor": max(cfg.n_latents // cfg.d_in, 1),
              "normalize_decoder": bool(cfg.normalize_decoder), "num_latents": cfg.n_latents, "k": k,
              "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write_bytes(path / CONFIG_FILE, json.dumps(config).encode())
