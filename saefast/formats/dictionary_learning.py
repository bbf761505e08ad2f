"""saprmarks/dictionary_learning SAEs: a folder with ``ae.pt`` (the state dict) and ``config.json``
(``{"trainer": trainer.config, ...}``, as ``dictionary_learning.training.trainSAE`` writes them).

``config.json``'s ``trainer.dict_class`` names the architecture; each maps exactly onto
``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec``:

* ``AutoEncoder`` (``bias``, ``encoder.weight [M, D]``, ``encoder.bias``, ``decoder.weight [D, M]``):
  ``f = ReLU(E(x − bias) + e)``, ``x̂ = W f + bias`` → ``relu`` with ``W_dec = W^T``, ``b_dec = bias``;
* ``AutoEncoderNew`` (``encoder.{weight,bias}``, ``decoder.{weight,bias}``): ``f = ReLU(E x + e)``,
  ``x̂ = W f + d`` → ``relu``, ``b_dec = d``, ``b_enc = e + E d`` (saefast subtracts ``b_dec`` first);
* ``AutoEncoderTopK`` (``encoder``/``decoder`` as above, ``b_dec``, buffers ``k``, ``threshold``): top-``k`` of
  ``ReLU(E(x − b_dec) + e)`` → ``topk`` (their forward ignores ``threshold``);
* ``BatchTopKSAE`` (same keys) and ``MatryoshkaBatchTopKSAE`` (``W_enc [D, M]``, ``b_enc``, ``W_dec [M, D]``,
  ``b_dec``, ``k``, ``threshold``, ``group_sizes``): their forward (``use_threshold=True``) is
  ``f = r·[r > θ]`` with ``r = ReLU(pre)`` and one scalar θ → ``batchtopk`` with the inference threshold
  ``max(θ, 0)`` for every latent (θ < 0, never estimated, makes their forward a plain ReLU: threshold 0);
* ``JumpReluAutoEncoder`` (``W_enc [D, M]``, ``b_enc``, ``W_dec [M, D]``, ``b_dec``, ``threshold [M]``):
  ``f = ReLU(pre·[pre > θ])`` with ``pre = x W_enc + b_enc`` (``b_dec`` is not subtracted: their
  ``apply_b_dec_to_input`` is False and not saved) → ``jumprelu``, ``log_threshold = log θ``,
  ``b_enc' = b_enc + W_enc^T b_dec``.

The weights are kept as stored (``normalize_decoder=False``): dictionary_learning's own
``AutoEncoder.from_pretrained`` rescales latents by the decoder column norms by default (same reconstruction,
different feature magnitudes); saefast's features are those of the state dict as saved. BatchTopK models load in
eval mode so that the stored threshold, not a batch top-k, decides the codes.

``.pt`` files are read with ``torch.load(weights_only=True)`` only: a file holding pickled objects is refused.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..config import SAEConfig
from ..models.sae import SAE
from . import FormatError
from .common import build_sae, common_dtype, fold_input_bias

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"

ARCHITECTURES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
                 "JumpReluAutoEncoder")
"""The ``trainer.dict_class`` values this module reads."""

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----- shared with the other ``.pt`` formats (openai) ----------------------------------------------------------


def read_pt(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers only. A file holding
    any other pickled object (a class instance, a function) is refused without being unpickled."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only names the first global it refused ("Unsupported global: GLOBAL module.Name"); any other
        # unpickling failure is a file that is not a torch .pt at all.
        refused = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", str(err))
        if refused:
            raise FormatError(f"{path}: holds pickled objects that are not plain tensors or containers "
                              f"({refused.group(1)}); saefast only reads .pt files with "
                              f"torch.load(weights_only=True) and will not unpickle them") from err
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
        raise FormatError(f"{path}: not a readable torch .pt file "
                          f"({detail.group(1).strip() if detail else type(err).__name__})") from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise FormatError(f"{path}: not a readable torch .pt file ({type(err).__name__}: {err})") from err


def tensor_entry(path: Path, state: dict[str, Any], key: str, shape: tuple[int, ...],
                 floating: bool = True) -> torch.Tensor:
    """``state[key]``, checked: present, a tensor of ``shape`` and (``floating``) of a floating dtype, else
    FormatError naming ``path`` and ``key``."""
    if key not in state:
        raise FormatError(f"{path}: missing key {key!r} (has {', '.join(sorted(map(str, state)))})")
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise FormatError(f"{path}: {key!r} must be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise FormatError(f"{path}: {key!r} has shape {list(value.shape)}, expected {list(shape)}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise FormatError(f"{path}: {key!r} has dtype {value.dtype}, expected a floating dtype")
    return value


def matrix_dims(path: Path, state: dict[str, Any], key: str) -> tuple[int, int]:
    """The two sizes of the 2-D tensor ``state[key]`` (FormatError naming ``path`` and ``key`` otherwise)."""
    if key not in state:
        raise FormatError(f"{path}: missing key {key!r} (has {', '.join(sorted(map(str, state)))})")
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FormatError(f"{path}: {key!r} must be a 2-D weight matrix, got {got}")
    return int(value.shape[0]), int(value.shape[1])


# ----- dictionary_learning -------------------------------------------------------------------------------------


def _files(path: Path) -> tuple[Path, Path]:
    """``(ae.pt, config.json)`` for a folder, or for the path of its ``ae.pt``."""
    folder = path.parent if path.is_file() else path
    return folder / WEIGHTS_FILE, folder / CONFIG_FILE


def detect(path: Path) -> bool:
    """A folder (or its ``ae.pt``) with ``ae.pt`` and a ``config.json`` whose ``trainer`` names a ``dict_class``."""
    weights, config = _files(Path(path))
    if not (weights.is_file() and config.is_file()) or (Path(path).is_file() and Path(path).name != WEIGHTS_FILE):
        return False
    try:
        trainer = json.loads(config.read_text()).get("trainer")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(trainer, dict) and "dict_class" in trainer


def _trainer_config(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise FormatError(f"{config_path}: not readable JSON ({err})") from err
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise FormatError(f"{config_path}: missing field 'trainer' (the trainer config dictionary_learning writes)")
    if "dict_class" not in trainer:
        raise FormatError(f"{config_path}: missing field 'trainer.dict_class'")
    return trainer


def _config_int(config_path: Path, trainer: dict[str, Any], field: str, from_weights: int, weights: Path,
                source: str) -> None:
    """``trainer[field]``, where present, must equal what the weights say (``from_weights``, read from ``source``)."""
    if field in trainer and trainer[field] is not None and trainer[field] != from_weights:
        raise FormatError(f"{config_path}: field 'trainer.{field}' = {trainer[field]!r} disagrees with the weights "
                          f"in {weights} ({source} = {from_weights})")


def _scalar(path: Path, state: dict[str, Any], key: str, integer: bool) -> float | int:
    """A 0-d tensor ``state[key]`` as a Python number (an integer dtype for ``integer``)."""
    value = tensor_entry(path, state, key, (), floating=not integer)
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise FormatError(f"{path}: {key!r} has dtype {value.dtype}, expected an integer dtype")
    return int(value.item()) if integer else float(value.item())


def _check_keys(path: Path, state: dict[str, Any], expected: set[str], dict_class: str) -> None:
    """Exactly the keys of ``dict_class``'s state dict: an unknown key may hold something that changes the
    function."""
    missing = sorted(expected - set(state))
    if missing:
        raise FormatError(f"{path}: missing key {missing[0]!r} of the {dict_class} state dict "
                          f"(has {', '.join(sorted(map(str, state)))})")
    extra = sorted(set(map(str, state)) - expected)
    if extra:
        raise FormatError(f"{path}: unexpected key {extra[0]!r} for the {dict_class} state dict")


def load(path: Path, map_location: str | torch.device = "cpu") -> SAE:
    """The dictionary_learning SAE at ``path`` (its folder or its ``ae.pt``) as an :class:`SAE` whose
    ``encode(x).to_dense()`` equals their ``ae(x, output_features=True)[1]`` and ``reconstruct(x)`` their
    ``ae(x)`` (mappings in the module docstring). FormatError naming the file and key/field for anything that does
    not fit (unknown ``dict_class``, missing or mis-shaped keys, ``config.json`` disagreeing with the weights)."""
    weights_path, config_path = _files(Path(path))
    for needed in (weights_path, config_path):
        if not needed.is_file():
            raise FormatError(f"{needed}: missing (a dictionary_learning SAE is a folder with {WEIGHTS_FILE} and "
                              f"{CONFIG_FILE})")
    trainer = _trainer_config(config_path)
    dict_class = trainer["dict_class"]
    if dict_class not in ARCHITECTURES:
        raise FormatError(f"{config_path}: field 'trainer.dict_class' = {dict_class!r} is an architecture saefast "
                          f"cannot read exactly (it reads {', '.join(ARCHITECTURES)})")
    state = read_pt(weights_path, map_location)
    if not isinstance(state, dict):
        raise FormatError(f"{weights_path}: expected a state dict (name → tensor), got {type(state).__name__}")
    if {"ae", "optimizer", "step"} <= set(state):
        raise FormatError(f"{weights_path}: is a mid-training backup (keys 'step', 'ae', 'optimizer'), whose biases "
                          f"may still be in normalised-activation units; load the final {WEIGHTS_FILE} instead")
    state = {str(k): v for k, v in state.items()}
    if dict_class == "AutoEncoder" and "decoder.bias" in state and "bias" not in state:
        dict_class = "AutoEncoderNew"  # StandardTrainer(dict_class=AutoEncoderNew) still writes "AutoEncoder"
    sae = _LOADERS[dict_class](weights_path, state, dict_class)
    _config_int(config_path, trainer, "activation_dim", sae.cfg.d_in, weights_path, "input width D")
    _config_int(config_path, trainer, "dict_size", sae.cfg.n_latents, weights_path, "latents M")
    if sae.cfg.activation in ("topk", "batchtopk"):
        _config_int(config_path, trainer, "k", sae.cfg.k, weights_path, "buffer 'k'")
    if dict_class == "MatryoshkaBatchTopKSAE" and trainer.get("group_sizes") is not None:
        sizes = [int(s) for s in state["group_sizes"].tolist()]
        if list(trainer["group_sizes"]) != sizes:
            raise FormatError(f"{config_path}: field 'trainer.group_sizes' = {trainer['group_sizes']!r} disagrees "
                              f"with {weights_path} ('group_sizes' = {sizes})")
    return sae


def _linear_pair(path: Path, state: dict[str, Any]) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M, D, W_enc [M, D], b_enc [M], W_dec [M, D])`` from ``nn.Linear`` encoder/decoder keys (the decoder is
    stored ``[D, M]``: its columns are the latents' directions)."""
    M, D = matrix_dims(path, state, "encoder.weight")
    W_enc = tensor_entry(path, state, "encoder.weight", (M, D))
    b_enc = tensor_entry(path, state, "encoder.bias", (M,))
    W_dec = tensor_entry(path, state, "decoder.weight", (D, M)).T
    return M, D, W_enc, b_enc, W_dec


def _parameter_pair(path: Path, state: dict[str, Any]) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """``(M, D, W_enc [M, D], b_enc, W_dec [M, D], b_dec)`` from raw ``W_enc [D, M]``/``W_dec [M, D]`` keys."""
    D, M = matrix_dims(path, state, "W_enc")
    W_enc = tensor_entry(path, state, "W_enc", (D, M)).T
    b_enc = tensor_entry(path, state, "b_enc", (M,))
    W_dec = tensor_entry(path, state, "W_dec", (M, D))
    b_dec = tensor_entry(path, state, "b_dec", (D,))
    return M, D, W_enc, b_enc, W_dec, b_dec


def _k(path: Path, state: dict[str, Any], M: int) -> int:
    k = _scalar(path, state, "k", integer=True)
    if not 1 <= k <= M:
        raise FormatError(f"{path}: 'k' = {k} must be in [1, {M}]")
    return k


def _standard(path: Path, state: dict[str, Any], dict_class: str) -> SAE:
    _check_keys(path, state, {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}, dict_class)
    M, D, W_enc, b_enc, W_dec = _linear_pair(path, state)
    bias = tensor_entry(path, state, "bias", (D,))
    dtype = common_dtype(path, {"encoder.weight": W_enc, "encoder.bias": b_enc, "decoder.weight": W_dec,
                                "bias": bias})
    cfg = SAEConfig(d_in=D, n_latents=M, activation="relu", normalize_decoder=False)
    return build_sae(cfg, dtype, W_enc, b_enc, W_dec, bias)


def _standard_new(path: Path, state: dict[str, Any], dict_class: str) -> SAE:
    _check_keys(path, state, {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}, dict_class)
    M, D, W_enc, b_enc, W_dec = _linear_pair(path, state)
    b_dec = tensor_entry(path, state, "decoder.bias", (D,))
    dtype = common_dtype(path, {"encoder.weight": W_enc, "encoder.bias": b_enc, "decoder.weight": W_dec,
                                "decoder.bias": b_dec})
    cfg = SAEConfig(d_in=D, n_latents=M, activation="relu", normalize_decoder=False)
    return build_sae(cfg, dtype, W_enc, fold_input_bias(W_enc, b_enc, b_dec, None), W_dec, b_dec)


def _topk_family(path: Path, state: dict[str, Any], dict_class: str) -> SAE:
    _check_keys(path, state, {"b_dec", "k", "threshold", "encoder.weight", "encoder.bias", "decoder.weight"},
                dict_class)
    M, D, W_enc, b_enc, W_dec = _linear_pair(path, state)
    b_dec = tensor_entry(path, state, "b_dec", (D,))
    k = _k(path, state, M)
    theta = _scalar(path, state, "threshold", integer=False)
    dtype = common_dtype(path, {"encoder.weight": W_enc, "encoder.bias": b_enc, "decoder.weight": W_dec,
                                "b_dec": b_dec})
    if dict_class == "AutoEncoderTopK":  # their forward is top-k; the threshold buffer is unused there
        cfg = SAEConfig(d_in=D, n_latents=M, k=k, activation="topk", normalize_decoder=False)
        return build_sae(cfg, dtype, W_enc, b_enc, W_dec, b_dec)
    return _batchtopk(D, M, k, theta, dtype, W_enc, b_enc, W_dec, b_dec)


def _batchtopk(D: int, M: int, k: int, theta: float, dtype: torch.dtype, W_enc: torch.Tensor, b_enc: torch.Tensor,
               W_dec: torch.Tensor, b_dec: torch.Tensor) -> SAE:
    """Their ``r·[r > θ]``, ``r = ReLU(pre)``, is ``pre·[pre > max(θ, 0)]``: saefast's threshold inference."""
    cfg = SAEConfig(d_in=D, n_latents=M, k=k, activation="batchtopk", normalize_decoder=False)
    threshold = torch.full((M,), max(theta, 0.0), dtype=dtype)
    return build_sae(cfg, dtype, W_enc, b_enc, W_dec, b_dec, threshold=threshold)


def _matryoshka(path: Path, state: dict[str, Any], dict_class: str) -> SAE:
    _check_keys(path, state, {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"}, dict_class)
    M, D, W_enc, b_enc, W_dec, b_dec = _parameter_pair(path, state)
    k = _k(path, state, M)
    theta = _scalar(path, state, "threshold", integer=False)
    sizes = state["group_sizes"]
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 1 or sizes.is_floating_point() \
            or int(sizes.sum()) != M or bool((sizes <= 0).any()):
        raise FormatError(f"{path}: 'group_sizes' must be positive integers summing to n_latents={M}")
    dtype = common_dtype(path, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    # A loaded Matryoshka SAE has every group active: its forward is BatchTopK's threshold inference.
    return _batchtopk(D, M, k, theta, dtype, W_enc, b_enc, W_dec, b_dec)


def _jumprelu(path: Path, state: dict[str, Any], dict_class: str) -> SAE:
    _check_keys(path, state, {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, dict_class)
    M, D, W_enc, b_enc, W_dec, b_dec = _parameter_pair(path, state)
    theta = tensor_entry(path, state, "threshold", (M,))
    if not bool((theta > 0).all()):
        bad = int((theta <= 0).nonzero()[0])
        raise FormatError(f"{path}: 'threshold'[{bad}] = {float(theta[bad])} is not > 0; saefast's JumpReLU "
                          f"learns log θ, so a threshold ≤ 0 cannot be represented")
    dtype = common_dtype(path, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": theta})
    cfg = SAEConfig(d_in=D, n_latents=M, activation="jumprelu", normalize_decoder=False)
    # Their encoder does not subtract b_dec (apply_b_dec_to_input is False and not saved): fold it into b_enc.
    b_enc = fold_input_bias(W_enc, b_enc, b_dec, None)
    log_threshold = theta.double().log().to(dtype)
    if not math.isfinite(float(log_threshold.abs().max())):
        raise FormatError(f"{path}: 'threshold' has values whose logarithm is not finite in {dtype}")
    return build_sae(cfg, dtype, W_enc, b_enc, W_dec, b_dec, log_threshold=log_threshold)


_LOADERS = {
    "AutoEncoder": _standard,
    "AutoEncoderNew": _standard_new,
    "AutoEncoderTopK": _topk_family,
    "BatchTopKSAE": _topk_family,
    "MatryoshkaBatchTopKSAE": _matryoshka,
    "JumpReluAutoEncoder": _jumprelu,
}
