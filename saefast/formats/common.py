"""What the format readers share: one dtype for all the weights, an :class:`SAE` built from given parameters, and the
fold of another input bias into saefast's encoder bias."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import SAEConfig
from ..models.sae import SAE
from . import FormatError

__all__ = ["build_sae", "common_dtype", "fold_input_bias"]


def common_dtype(path: Path, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of ``tensors`` (FormatError naming the first key that differs)."""
    names = list(tensors)
    dtype = tensors[names[0]].dtype
    for name in names[1:]:
        if tensors[name].dtype != dtype:
            raise FormatError(f"{path}: {name!r} is {tensors[name].dtype} but {names[0]!r} is {dtype}; "
                              f"mixed-precision weights are not supported")
    return dtype


def build_sae(cfg: SAEConfig, dtype: torch.dtype, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
              b_dec: torch.Tensor, log_threshold: torch.Tensor | None = None,
              threshold: torch.Tensor | None = None, map_location: str | torch.device | None = None) -> SAE:
    """An :class:`SAE` of ``cfg`` holding exactly these parameters (``W_enc, W_dec [M, D]``, ``b_enc [M]``,
    ``b_dec [D]``; ``log_threshold [M]`` for jumprelu; ``threshold [M]`` for batchtopk) in ``dtype``, marked as
    having its ``b_dec`` set (so training does not re-initialise it), in eval mode, on ``map_location`` (None: where
    the weights are)."""
    sae = SAE(cfg).to(device=W_enc.device, dtype=dtype)  # where map_location put the weights
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        if log_threshold is not None:
            sae.log_threshold.copy_(log_threshold)
        if threshold is not None:
            sae.threshold.copy_(threshold)
        sae.b_dec_initialized.fill_(True)
    return sae.eval() if map_location is None else sae.eval().to(map_location)


def fold_input_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                    subtracted: torch.Tensor | None) -> torch.Tensor:
    """saefast always encodes ``W_enc(x − b_dec) + b_enc'``; a format that subtracts ``c`` instead (None: nothing)
    encodes ``W_enc(x − c) + b_enc``. Equal for every ``x`` with ``b_enc' = b_enc + W_enc(b_dec − c)`` (computed
    in float64, rounded once)."""
    shift = b_dec.double() if subtracted is None else b_dec.double() - subtracted.double()
    return (b_enc.double() + W_enc.double() @ shift).to(b_enc.dtype)
