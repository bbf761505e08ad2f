"""openai/sparse_autoencoder SAEs: an ``Autoencoder.state_dict()`` saved with ``torch.save`` (a ``.pt`` file, or a
folder holding ``state_dict.pt``).

Their model (``sparse_autoencoder/model.py``)::

    latents = activation(encoder(x − pre_bias) + latent_bias)      encoder.weight [M, D]
    recons  = decoder(latents) + pre_bias                         decoder.weight [D, M]

is saefast's ``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec`` with ``W_enc = encoder.weight``,
``b_enc = latent_bias``, ``W_dec = decoder.weightᵀ``, ``b_dec = pre_bias`` (exact: no bias to fold), and ``h`` from the
state dict's ``activation`` entry: ``"ReLU"`` (the default of their ``from_state_dict``) → ``relu``; ``"TopK"`` with
``activation_state_dict = {"k": k, "postact_fn": "ReLU"}`` → ``topk`` (their TopK takes the top ``k`` pre-activations,
then ReLU: saefast's TopK). Other activations (``Identity``, a TopK without ReLU) are refused.

Their ``Autoencoder.from_state_dict`` also switches on input layer normalisation for ``TopK`` state dicts
(``normalize=True``): ``x_n = (x − μ)/(σ + 1e-5)`` per token (σ the unbiased standard deviation), the autoencoder runs
on ``x_n``, and the output is ``recons·σ + μ``. That per-token normalisation is not part of an SAE; the loaded SAE is
the autoencoder of ``x_n`` (a warning says so): ``sae.encode(layer_norm(x)[0])`` gives their latents and
``sae.reconstruct(x_n)·σ + μ`` their reconstruction (:func:`layer_norm`).

Read with ``torch.load(weights_only=True)`` only: a file holding pickled objects is refused.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ..models.sae import SAE
from . import FormatError
from .common import build_sae, common_dtype
from .dictionary_learning import matrix_dims, read_pt, tensor_entry

STATE_DICT_FILE = "state_dict.pt"
SUFFIXES = (".pt", ".pth")
STATISTICS = ("stats_last_nonzero", "latents_activation_frequency", "latents_mean_square")
"""Training statistics buffers of their ``Autoencoder``: ``[M]``, not part of the function."""
REQUIRED = ("encoder.weight", "latent_bias", "pre_bias", "decoder.weight")
ACTIVATION_KEYS = ("activation", "activation_state_dict", "activation.k", "activation.postact_fn")
"""``Autoencoder.state_dict`` adds ``activation`` (class name) and ``activation_state_dict``; for TopK the recursive
``Module.state_dict`` also writes TopK's own ``k``/``postact_fn`` as ``activation.k``, ``activation.postact_fn``."""
LAYER_NORM_EPS = 1e-5


def layer_norm(x: torch.Tensor, eps: float = LAYER_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Their ``LN``: ``(x_n, μ, σ)`` with ``μ = mean(x)``, ``σ = std(x − μ)`` (unbiased) over the last axis and
    ``x_n = (x − μ)/(σ + eps)``. Their TopK autoencoder's reconstruction of ``x`` is ``sae.reconstruct(x_n)·σ + μ``."""
    mu = x.mean(dim=-1, keepdim=True)
    centred = x - mu
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + eps), mu, std


def _weights_file(path: Path) -> Path:
    return path / STATE_DICT_FILE if path.is_dir() else path


def _pickle_mentions(path: Path, names: tuple[bytes, ...]) -> bool:
    """Whether the pickle inside the torch zip ``path`` spells every one of ``names`` (read as bytes, never
    unpickled: detection must not run anything)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                return False
            blob = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return False
    return all(name in blob for name in names)


def detect(path: Path) -> bool:
    """A ``.pt``/``.pth`` file (or a folder with ``state_dict.pt``) whose state dict has ``pre_bias`` and
    ``latent_bias`` keys."""
    weights = _weights_file(Path(path))
    return weights.is_file() and weights.suffix in SUFFIXES and _pickle_mentions(weights, (b"pre_bias",
                                                                                           b"latent_bias"))


def _activation(path: Path, state: dict[str, Any], M: int) -> tuple[str, int | None]:
    """``("relu", None)`` or ``("topk", k)`` from the state dict's activation entries, checked for agreement."""
    name = state.get("activation", "ReLU")  # their from_state_dict's default
    options = state.get("activation_state_dict", {})
    if not isinstance(options, dict):
        raise FormatError(f"{path}: 'activation_state_dict' must be a dict, got {type(options).__name__}")
    if name == "ReLU":
        stray = [key for key in ("activation.k", "activation.postact_fn") if key in state]
        if options or stray:
            raise FormatError(f"{path}: 'activation' is 'ReLU' but the state dict has TopK settings "
                              f"({', '.join(stray) or 'activation_state_dict'})")
        return "relu", None
    if name != "TopK":
        raise FormatError(f"{path}: 'activation' = {name!r} is an activation saefast cannot represent "
                          f"(it reads 'ReLU' and 'TopK')")
    if "k" not in options:
        raise FormatError(f"{path}: missing key 'activation_state_dict.k' of a TopK autoencoder")
    k, postact = options["k"], options.get("postact_fn", "ReLU")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= M:
        raise FormatError(f"{path}: 'activation_state_dict.k' = {k!r} must be an int in [1, {M}]")
    if postact != "ReLU":
        raise FormatError(f"{path}: 'activation_state_dict.postact_fn' = {postact!r}: saefast's TopK applies ReLU "
                          f"to the selected values, so only 'ReLU' is exact")
    for key, expected in (("activation.k", k), ("activation.postact_fn", postact)):
        if key in state and state[key] != expected:
            raise FormatError(f"{path}: {key!r} = {state[key]!r} disagrees with 'activation_state_dict."
                              f"{key.split('.')[1]}' = {expected!r}")
    return "topk", k


def load(path: Path, map_location: str | torch.device = "cpu") -> SAE:
    """The openai/sparse_autoencoder ``Autoencoder`` state dict at ``path`` (a ``.pt`` file or a folder with
    ``state_dict.pt``) as an :class:`SAE`: ``encode(x).to_dense()`` equals their latents and ``reconstruct(x)``
    their ``recons`` — for TopK state dicts, of the layer-normalised input (see :func:`layer_norm`; a UserWarning
    says so). FormatError naming the file and key for anything that does not fit."""
    weights = _weights_file(Path(path))
    if not weights.is_file():
        raise FormatError(f"{weights}: missing (an openai/sparse_autoencoder SAE is a .pt state dict)")
    state = read_pt(weights, map_location)
    if not isinstance(state, dict):
        raise FormatError(f"{weights}: expected a state dict (name → tensor), got {type(state).__name__}")
    state = {str(k): v for k, v in state.items()}
    if "decoder.linear.weight" in state:
        raise FormatError(f"{weights}: key 'decoder.linear.weight' is a tied decoder, which their from_state_dict "
                          f"does not load either; untie it (decoder.weight = encoder.weight.T) first")
    unexpected = sorted(set(state) - set(REQUIRED) - set(STATISTICS) - set(ACTIVATION_KEYS))
    if unexpected:
        raise FormatError(f"{weights}: unexpected key {unexpected[0]!r} for an openai/sparse_autoencoder "
                          f"Autoencoder state dict")
    M, D = matrix_dims(weights, state, "encoder.weight")
    W_enc = tensor_entry(weights, state, "encoder.weight", (M, D))
    latent_bias = tensor_entry(weights, state, "latent_bias", (M,))
    pre_bias = tensor_entry(weights, state, "pre_bias", (D,))
    W_dec = tensor_entry(weights, state, "decoder.weight", (D, M)).T
    for key in STATISTICS:
        if key in state:
            tensor_entry(weights, state, key, (M,), floating=False)
    dtype = common_dtype(weights, {"encoder.weight": W_enc, "latent_bias": latent_bias, "pre_bias": pre_bias,
                                   "decoder.weight": W_dec})
    activation, k = _activation(weights, state, M)
    if activation == "topk":
        warnings.warn(f"{weights}: a TopK autoencoder, which openai's from_state_dict runs on layer-normalised "
                      f"inputs (normalize=True); the loaded SAE is the autoencoder of x_n = (x − μ)/(σ + 1e-5): "
                      f"use saefast.formats.openai.layer_norm(x) and de-normalise x̂·σ + μ", UserWarning,
                      stacklevel=3)
        cfg = SAEConfig(d_in=D, n_latents=M, k=k, activation="topk", normalize_decoder=False)
    else:
        cfg = SAEConfig(d_in=D, n_latents=M, activation="relu", normalize_decoder=False)
    return build_sae(cfg, dtype, W_enc, latent_bias, W_dec, pre_bias)
