"""SAELens 6.x SAEs: a folder with ``cfg.json`` and ``sae_weights.safetensors`` (``SAE.save_model``).

SAELens stores ``W_enc [d_in, d_sae]`` (``x @ W_enc``), ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
and, for JumpReLU, ``threshold [d_sae]``. Its forward is ``x̂ = h(pre) @ W_dec + b_dec`` with
``pre = (x − a·b_dec) @ W_enc + b_enc`` and ``a = apply_b_dec_to_input`` (0 or 1). ``cfg.json``'s ``architecture``
picks ``h``; each maps exactly onto saefast's ``x̂ = W_dec·h(W_enc(x − b_dec) + b_enc) + b_dec`` with
saefast's ``W_enc = W_encᵀ``:

* ``standard``: ``h = ReLU`` → ``relu``;
* ``topk``: ``ReLU`` of the top ``k`` entries of ``pre`` → ``topk``. With ``rescale_acts_by_decoder_norm`` SAELens
  encodes ``z = TopK(pre ⊙ n)`` and decodes ``(z ⊘ n) @ W_dec`` with ``n_i = ‖W_dec[i]‖``: the same function as
  an SAE with ``W_enc[i]·n_i``, ``b_enc[i]·n_i`` and ``W_dec[i]/n_i`` (positive scales keep the top-k choice), and
  with the same codes ``z`` — so that is what loads;
* ``jumprelu``: ``z = ReLU(pre)·[pre > θ]`` → ``jumprelu`` with ``log_threshold = log θ``. A threshold θ ≤ 0 acts
  as θ = 0 (the ReLU already zeroes ``pre ≤ 0``), which saefast holds as ``log_threshold = −inf`` (``θ = 0``,
  ``z = pre·[pre > 0]``). SAELens saves its BatchTopK SAEs this way (one threshold for every latent).

With ``apply_b_dec_to_input = False`` SAELens does not subtract ``b_dec`` before encoding; saefast always does, so
the encoder bias is folded: ``W_enc(x − b_dec) + b_enc' = W_enc x + b_enc`` for ``b_enc' = b_enc + W_enc b_dec``.

``reshape_activations = hook_z`` only flattens SAELens' ``[..., n_heads, d_head]`` inputs: saefast reads them
flattened, ``[N, d_in]``.

Refused, with the field named: ``normalize_activations`` other than ``none`` (the scale lives outside the weights),
other architectures (gated, transcoders, ...), a pre-6.0 ``activation_fn_str`` other than ``relu``/``topk``, a
``finetuning_scaling_factor``. Pre-6.0 configs (no ``metadata.sae_lens_version``; ``activation_fn_str``,
``activation_fn_kwargs.k``) are read the way SAELens converts them.

Weights load exactly as stored (same dtype; only the folds above change them), with ``normalize_decoder=False``
so that further training does not renormalise decoder rows that SAELens left at other norms.

:func:`save` writes what ``sae_lens.SAE.load_from_disk`` reads: ``relu`` → ``standard``, ``topk`` → ``topk``,
``jumprelu`` → ``jumprelu`` (``θ = exp(log_threshold)``), ``batchtopk`` → ``jumprelu`` with its inference threshold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..config import SAEConfig
from ..files import atomic_write_bytes
from ..models.dictionary import SparseDictionary
from ..models.sae import SAE
from ..version import __version__ as saefast_version
from . import FormatError
from .common import build_sae, common_dtype

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
"""The SAELens architectures this module reads (BatchTopK SAEs are saved by SAELens as ``jumprelu``)."""
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens version :func:`save` writes into ``metadata.sae_lens_version``: the config layout it follows (SAELens
converts configs of older versions as pre-6.0 ones)."""

_FLOAT_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                 torch.float64: "float64"}
_DTYPE_NAMES = {name: dtype for dtype, name in _FLOAT_DTYPES.items()}

ENSEMBLE_REFUSAL = ("export ensemble.as_sae() for ReLU/JumpReLU bagging; TopK/BatchTopK ensembles keep a per-member "
                    "top-k no SAELens/sparsify architecture has, and boosting cannot be encoded by one SAE")


# ----- reading helpers (shared with the sparsify format) ---------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object, else FormatError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` (on the CPU), else FormatError naming the file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FormatError(f"{path}: not a readable safetensors file ({err})") from None


def config_int(path: Path, config: dict[str, Any], field: str, default: int | None = None) -> int:
    """``config[field]`` as a positive int (an integral float is accepted), else FormatError naming it."""
    value = config.get(field, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FormatError(f"{path}: field {field!r} must be a positive integer, got {value!r}")
    return value


def weight(path: Path, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], origin: str,
           ) -> torch.Tensor:
    """``tensors[key]``: present, of ``shape`` (``origin`` says where that shape comes from), floating and finite;
    else FormatError naming the file and the key."""
    if key not in tensors:
        raise FormatError(f"{path}: missing key {key!r} (has {', '.join(sorted(tensors)) or 'no tensors'})")
    tensor = tensors[key]
    if tuple(tensor.shape) != tuple(shape):
        raise FormatError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from {origin}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise FormatError(f"{path}: {key!r} has dtype {tensor.dtype}, expected a floating dtype")
    if key != "threshold" and not bool(torch.isfinite(tensor).all()):
        raise FormatError(f"{path}: {key!r} holds non-finite values")
    return tensor


def check_no_extra_keys(path: Path, tensors: dict[str, torch.Tensor], known: set[str], why: str) -> None:
    """Refuse tensors saefast would ignore: an unknown parameter changes the function."""
    extra = sorted(set(tensors) - known)
    if extra:
        raise FormatError(f"{path}: unexpected key(s) {', '.join(map(repr, extra))} ({why}); expected only "
                          f"{', '.join(sorted(known))}")


def exportable_sae(model: SparseDictionary, format_name: str) -> SAE:
    """``model`` if it is a single SAE that another library can run, else FormatError saying why not."""
    if not isinstance(model, SAE):
        raise FormatError(f"cannot write a {type(model).__name__} in the {format_name} format: {ENSEMBLE_REFUSAL}")
    if model.decode_only:
        raise FormatError(f"cannot write this SAE in the {format_name} format: it is a boosting ensemble's as_sae(), "
                          f"whose decoder is exact but whose encoder is not (boosting cannot be encoded by one SAE)")
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _FLOAT_DTYPES:
        raise FormatError(f"cannot write weights of dtype {dtype}; use one of {', '.join(_FLOAT_DTYPES.values())}")
    return _FLOAT_DTYPES[dtype]


# ----- SAELens ---------------------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    """A folder holding ``cfg.json`` and ``sae_weights.safetensors``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _major_version(value: Any) -> int | None:
    match = re.match(r"\s*(\d+)", str(value)) if value is not None else None
    return int(match.group(1)) if match else None


def _architecture(config_path: Path, config: dict[str, Any]) -> tuple[str, int | None]:
    """``(architecture, k)`` of a 6.x config, or of a pre-6.0 one converted the way SAELens converts it
    (``activation_fn_str`` / ``activation_fn``, ``activation_fn_kwargs.k``)."""
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    version = config.get("sae_lens_version") or metadata.get("sae_lens_version")
    major = _major_version(version)
    architecture = config.get("architecture", "standard" if major is None or major < 6 else None)
    if architecture is None:
        raise FormatError(f"{config_path}: missing field 'architecture' (one of {', '.join(ARCHITECTURES)})")
    k = config.get("k")
    if major is None or major < 6:
        field = "activation_fn_str" if "activation_fn_str" in config else "activation_fn"
        activation = config.get(field, "relu")
        kwargs = config.get("activation_fn_kwargs") or {}
        if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
            architecture, k = "topk", kwargs["k"]
        elif activation != "relu" and architecture == "standard":
            raise FormatError(f"{config_path}: field {field!r} is {activation!r}; saefast reads the pre-6.0 "
                              f"activations 'relu' and 'topk' (with activation_fn_kwargs.k)")
        if config.get("finetuning_scaling_factor"):
            raise FormatError(f"{config_path}: field 'finetuning_scaling_factor' is set; saefast does not read "
                              f"SAELens' fine-tuning scale")
    if architecture not in ARCHITECTURES:
        raise FormatError(f"{config_path}: field 'architecture' is {architecture!r}, which saefast cannot read; it "
                          f"reads {', '.join(ARCHITECTURES)} (BatchTopK SAEs are saved by SAELens as jumprelu)")
    return architecture, k


def _normalization(config_path: Path, config: dict[str, Any]) -> None:
    """Only ``normalize_activations = none`` is read: any other normalises the input outside the weights."""
    value = config.get("normalize_activations", "none")
    if value is False or value is None:  # pre-6.0 booleans
        value = "none"
    if value != "none":
        raise FormatError(f"{config_path}: field 'normalize_activations' is {value!r}; saefast reads only 'none' "
                          f"(fold the normalisation into the weights first, e.g. SAELens' "
                          f"fold_activation_norm_scaling_factor)")


def load(path: Path, map_location: str | torch.device = "cpu") -> SAE:
    """The SAELens SAE in the folder ``path`` as an :class:`SAE` whose ``encode`` equals SAELens' ``encode`` and
    whose ``reconstruct`` equals its forward ``x̂ = h((x − a·b_dec) @ W_enc + b_enc) @ W_dec + b_dec``."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = read_json(config_path)
    architecture, k = _architecture(config_path, config)
    _normalization(config_path, config)
    D, M = config_int(config_path, config, "d_in"), config_int(config_path, config, "d_sae")
    apply_b_dec = config.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise FormatError(f"{config_path}: field 'apply_b_dec_to_input' must be true or false, got {apply_b_dec!r}")
    rescale = config.get("rescale_acts_by_decoder_norm", False) if architecture == "topk" else False
    if not isinstance(rescale, bool):
        raise FormatError(f"{config_path}: field 'rescale_acts_by_decoder_norm' must be true or false, got {rescale!r}")

    tensors = read_safetensors(weights_path)
    scale = tensors.pop("scaling_factor", None)  # pre-6.0 files: all ones means none (as SAELens reads it)
    if scale is not None and not bool((scale == 1).all()):
        raise FormatError(f"{weights_path}: key 'scaling_factor' is not all ones; saefast does not read SAELens' "
                          f"fine-tuning scale")
    origin = f"{config_path.name} (d_in={D}, d_sae={M})"
    names = {"W_enc": (D, M), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
    if architecture == "jumprelu":
        names["threshold"] = (M,)
    check_no_extra_keys(weights_path, tensors, set(names), f"a SAELens {architecture} SAE has no others")
    w = {key: weight(weights_path, tensors, key, shape, origin) for key, shape in names.items()}
    dtype = common_dtype(weights_path, w)

    W_enc, b_enc, W_dec, b_dec = w["W_enc"].T.double(), w["b_enc"].double(), w["W_dec"].double(), w["b_dec"].double()
    if not apply_b_dec:  # saefast subtracts b_dec first: W_enc(x − b_dec) + b_enc' = W_enc x + b_enc
        b_enc = b_enc + W_enc @ b_dec
    log_threshold = None
    if architecture == "topk" and rescale:
        norms = w["W_dec"].double().norm(dim=1)
        if not bool((norms > 0).all()):
            raise FormatError(f"{weights_path}: 'W_dec' has zero rows, which rescale_acts_by_decoder_norm divides by")
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if architecture == "jumprelu":
        theta = w["threshold"]
        if bool(torch.isnan(theta).any()) or bool(torch.isposinf(theta).any()):
            raise FormatError(f"{weights_path}: 'threshold' holds NaN or +inf")
        # ReLU(pre)·[pre > θ] with θ ≤ 0 equals pre·[pre > 0]: θ = 0, log θ = −inf.
        log_threshold = theta.double().clamp_min(0).log()

    if architecture == "topk":
        k = config_int(config_path, {"k": k}, "k")
        if k > M:
            raise FormatError(f"{config_path}: field 'k' is {k}, more than d_sae={M}")
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[architecture]
    cfg = SAEConfig(d_in=D, n_latents=M, k=k if activation == "topk" else min(32, M), activation=activation,
                    normalize_decoder=False)
    return build_sae(cfg, dtype, W_enc, b_enc, W_dec, b_dec, log_threshold, map_location=map_location)


def save(model: SparseDictionary, path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` (a single :class:`SAE`) as a SAELens 6.x folder: ``cfg.json`` + ``sae_weights.safetensors``.

    ``relu`` → ``standard``; ``topk`` → ``topk`` (``rescale_acts_by_decoder_norm = False``); ``jumprelu`` →
    ``jumprelu`` with ``threshold = exp(log_threshold)``; ``batchtopk`` → ``jumprelu`` with its inference threshold
    (``z = pre·[pre > θ]``, what saefast runs in eval mode), once training has estimated it. SAELens' weights are
    the transposed encoder ``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_in]``; ``apply_b_dec_to_input = True``.
    ``metadata`` (``model_name``, ``hook_name``, ``context_size``, ...) goes into the config's ``metadata``;
    ``metadata["dtype"]`` sets the dtype SAELens loads the weights in (default: the model's).

    Refused: ensembles (see :data:`ENSEMBLE_REFUSAL`), a boosting ``as_sae()``, TopK/BatchTopK with ``groups > 1``
    (a per-group top-k), BatchTopK whose threshold was never estimated. ReLU/JumpReLU act latent by latent, so a
    bagging ensemble's ``as_sae()`` (grouped) exports exactly.
    """
    sae = exportable_sae(model, "SAELens")
    cfg, path = sae.cfg, Path(path)
    metadata = dict(metadata or {})
    if cfg.activation in ("topk", "batchtopk") and cfg.groups > 1:
        raise FormatError(f"cannot write this SAE in the SAELens format: its {cfg.activation} is taken per group of "
                          f"latents (groups={cfg.groups}, an ensemble's as_sae()); {ENSEMBLE_REFUSAL}")
    dtype_name = _dtype_name(sae.W_enc.dtype)
    if "dtype" in metadata:
        dtype_name = str(metadata.pop("dtype")).removeprefix("torch.")
        if dtype_name not in _DTYPE_NAMES:
            raise FormatError(f"metadata 'dtype' is {dtype_name!r}; use one of {', '.join(_DTYPE_NAMES)}")
    with torch.no_grad():
        tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        architecture = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[
            cfg.activation]
        if cfg.activation == "jumprelu":
            tensors["threshold"] = sae.log_threshold.exp()
        elif cfg.activation == "batchtopk":
            if bool((sae.threshold < 0).any()):
                raise FormatError("cannot write this BatchTopK SAE in the SAELens format: its inference threshold has "
                                  "not been estimated yet (train it first); SAELens runs BatchTopK SAEs as JumpReLU "
                                  "with that threshold")
            tensors["threshold"] = sae.threshold
        tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
    config: dict[str, Any] = {
        "architecture": architecture, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": dtype_name, "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        # SAELens' own convention (its pre-6.0 converter): attention-output SAEs read the flattened heads
        "reshape_activations": "hook_z" if str(metadata.get("hook_name", "")).endswith("hook_z") else "none",
    }
    if architecture == "topk":
        config.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    config["metadata"] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                          **metadata, "saefast_version": saefast_version, "saefast_activation": cfg.activation}
    try:
        text = json.dumps(config, indent=2)
    except (TypeError, ValueError) as err:
        raise FormatError(f"metadata must be JSON-serialisable ({err})") from None
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_FILE, safetensors_bytes(tensors))
    atomic_write_bytes(path / CONFIG_FILE, text.encode())

