"""Splicing an SAE (or ensemble) into a model, and the language-model cost of doing so.

:func:`splice` replaces a layer's output with the dictionary's reconstruction during a forward. :func:`spliced_lm`
runs a causal LM on held-out token windows three ways — clean, spliced, and with the layer's output zeroed — and
reports what the field reports first (SAELens ``evals.py``, SAEBench "core"):

    ce_loss_score = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
    kl_score      = (KL_zero − KL_spliced) / KL_zero
    ce_increase   = CE_spliced − CE_clean

``CE`` is the mean next-token cross-entropy over every predicted position, ``KL`` the mean over those positions
of ``KL(p_clean ‖ p_other)`` of the next-token distributions. The splice touches only the positions the
dictionary was trained on: the harvest leaves out BOS and pad tokens and the first positions of each window
(attention sinks), so those keep their clean activation, and the report says which they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence, Sized
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.harvest import kept_positions
from ..data.hooks import abbreviate_names, hidden_state, module_names
from ..models import SparseDictionary
from ..progress import progress_bar

SpliceMode = Literal["replace", "error", "ablate"]
MODES = ("replace", "error", "ablate")


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor swapped for ``hidden`` (a tensor, or the first of a tuple)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    raise TypeError(f"cannot splice into a module output of type {type(output).__name__}")


@contextlib.contextmanager
def splice(model: nn.Module, layer: str, dictionary: SparseDictionary | None, mode: SpliceMode = "replace",
           positions: torch.Tensor | None = None, ablate: Sequence[int] | torch.Tensor | None = None,
           backend: str | None = None) -> Iterator[None]:
    """Within the block, the output ``x`` of ``model``'s module ``layer`` (``[B, T, D]``) becomes, at the chosen
    positions:

    * ``replace``: ``x̂`` (the dictionary's reconstruction);
    * ``error``: ``x̂ + (x − x̂).detach()`` — the value of ``x``, with gradients that flow through the dictionary;
    * ``ablate``: ``x̂_ablated + (x − x̂)`` — the latents ``ablate`` (global indices ``j·M + i``) zeroed in the
      code and the reconstruction error kept, so only their contribution leaves.

    ``dictionary=None`` zero-ablates the layer instead (``x → 0``). ``positions`` (``[B, T]`` bool) picks the
    positions for the next forward; None takes every position. The reconstruction runs in fp32 and is cast back
    to the layer's dtype."""
    if mode not in MODES:
        raise ValueError(f"unknown splice mode {mode!r}; choose one of {', '.join(MODES)}")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"model has no module {layer!r}; valid names: {abbreviate_names(module_names(model))}")
    if dictionary is not None and mode == "ablate" and ablate is None:
        raise ValueError("mode='ablate' needs the latents to ablate (ablate=[...])")
    if dictionary is None and mode != "replace":
        raise ValueError("zero ablation (dictionary=None) has no reconstruction: use mode='replace'")
    ablated = None
    if ablate is not None:
        ablated = torch.as_tensor(ablate, dtype=torch.long).reshape(-1)
        total = dictionary.n_latents_total if dictionary is not None else 0
        if ablated.numel() and (int(ablated.min()) < 0 or int(ablated.max()) >= total):
            raise ValueError(f"ablate holds latent indices outside 0..{total - 1}")

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        x = hidden_state(layer, output)
        if dictionary is not None and x.shape[-1] != dictionary.cfg.d_in:
            raise ValueError(f"layer {layer!r} outputs d={x.shape[-1]} but the dictionary expects "
                             f"d_in={dictionary.cfg.d_in}")
        where = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if positions is None else positions
        if where.shape != x.shape[:-1]:
            raise ValueError(f"positions must be [B, T] = {tuple(x.shape[:-1])}, got {tuple(where.shape)}")
        rows = x[where.to(x.device)]
        new = x.clone()
        if rows.shape[0]:
            new[where.to(x.device)] = _spliced_rows(rows, dictionary, mode, ablated, backend).to(x.dtype)
        return _replace_hidden(output, new)

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _spliced_rows(x: torch.Tensor, dictionary: SparseDictionary | None, mode: str, ablated: torch.Tensor | None,
                  backend: str | None) -> torch.Tensor:
    if dictionary is None:
        return torch.zeros_like(x)
    if mode == "ablate":
        return ablate_rows(dictionary, x, ablated, backend)
    x32 = x.float()
    x_hat = dictionary.reconstruct(x32, backend=backend)
    return x_hat if mode == "replace" else x_hat + (x32 - x_hat).detach()


def ablate_rows(dictionary: SparseDictionary, x: torch.Tensor, latents: Sequence[int] | torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
    """Rows ``x [N, D]`` with the latents ``A`` (global indices ``j·M + i``) taken out, in fp32:
    ``x' = decode(z with z_A = 0) + (x − x̂)``, ``z = encode(x)``, ``x̂ = decode(z)`` — the ``ablate`` mode of
    :func:`splice`, which calls this. Only the ablated latents' contribution ``Σ_{l∈A} z_l·α·W_dec[l]`` leaves; the
    reconstruction error stays. An empty ``A`` returns ``x`` itself (a float32 copy), not ``x̂ + (x − x̂)`` with
    its rounding."""
    ablated = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    total = dictionary.n_latents_total
    if ablated.numel() and (int(ablated.min()) < 0 or int(ablated.max()) >= total):
        raise ValueError(f"latents to ablate must lie in 0..{total - 1}")
    x32 = x.float()
    if ablated.numel() == 0:
        return x32.clone()
    codes = dictionary.encode(x32, backend=backend)
    keep = ~torch.isin(codes.global_indices(), ablated.to(x.device))
    x_hat = dictionary.decode(codes, backend=backend)
    return dictionary.decode(codes, backend=backend, mask=keep) + (x32 - x_hat)


def loss_scores(ce_clean: float, ce_spliced: float, ce_zero: float, kl_spliced: float, kl_zero: float
                ) -> dict[str, float]:
    """``ce_loss_score = (CE_zero − CE_spliced)/(CE_zero − CE_clean)``, ``kl_score = (KL_zero − KL_spliced)/KL_zero``,
    ``ce_increase = CE_spliced − CE_clean`` (NaN where a denominator is 0)."""
    ce_gap, nan = ce_zero - ce_clean, float("nan")
    return {"ce_loss_score": (ce_zero - ce_spliced) / ce_gap if ce_gap else nan,
            "kl_score": (kl_zero - kl_spliced) / kl_zero if kl_zero else nan,
            "ce_increase": ce_spliced - ce_clean}


def _next_token_terms(logits: torch.Tensor, clean_logp: torch.Tensor, input_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the predicted positions of the cross-entropy and of ``KL(p_clean ‖ p)``."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:].to(logits.device)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).sum()
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return ce, kl


@torch.no_grad()
def spliced_lm(model: nn.Module, layer: str, dictionary: SparseDictionary, windows: Iterable[torch.Tensor],
               batch_size: int = 8, special_ids: Sequence[int] = (), exclude_first: int = 2,
               backend: str | None = None, progress: bool = False) -> dict[str, Any]:
    """The LM cost of replacing ``layer``'s output with ``dictionary``'s reconstruction, on token ``windows``
    (1-D id tensors of one length): clean, spliced and zero-ablated forwards of each batch, then
    :func:`loss_scores` of the mean cross-entropies and KLs, and the reconstruction's explained variance and L0
    (summed over members) on the spliced positions. Positions that hold one of ``special_ids`` or are among the
    first ``exclude_first`` of a window keep their clean activation (the harvest never stored them). ``progress``:
    a bar over the windows (three forwards each)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layer not in dict(model.named_modules()):
        raise ValueError(f"model has no module {layer!r}; valid names: {abbreviate_names(module_names(model))}")
    device = next(model.parameters()).device
    special = torch.tensor(list(special_ids), dtype=torch.long)
    was_training, dict_training = model.training, dictionary.training
    model.eval()
    dictionary.eval()
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablation": 0.0, "kl_spliced": 0.0, "kl_zero_ablation": 0.0}
    predicted, positions, spliced_rows, l0_sum, sse, x_sum, x_sq = 0, 0, 0, 0.0, 0.0, None, None
    total = len(windows) if isinstance(windows, Sized) else None
    bar = progress_bar(total=total, desc="spliced", unit="window", enabled=progress)
    try:
        for batch in _batches(windows, batch_size):
            bar.update(batch.shape[0])
            ids = batch.to(device)
            where = kept_positions(batch, special, exclude_first)
            with _capture(model, layer) as seen:
                clean_logits = model(input_ids=ids).logits
            clean_logp = F.log_softmax(clean_logits[:, :-1].float(), dim=-1)
            ce, _ = _next_token_terms(clean_logits, clean_logp, ids)
            sums["ce_clean"] += float(ce)
            for key, source in (("spliced", dictionary), ("zero_ablation", None)):
                with splice(model, layer, source, positions=where, backend=backend):
                    logits = model(input_ids=ids).logits
                ce, kl = _next_token_terms(logits, clean_logp, ids)
                sums[f"ce_{key}"] += float(ce)
                sums[f"kl_{key}"] += float(kl)
            predicted += ids.shape[0] * (ids.shape[1] - 1)
            positions += ids.numel()
            x = seen[0][where.to(device)].float()
            if x.shape[0]:
                codes = dictionary.encode(x, backend=backend)  # one encode serves the L0 and the reconstruction
                x_hat = dictionary.decode(codes, backend=backend)
                l0_sum += float((codes.values != 0).sum())
                sse += float(((x - x_hat) ** 2).sum())
                x_sum = x.sum(0).double() if x_sum is None else x_sum + x.sum(0).double()
                x_sq = float((x.double() ** 2).sum()) + (x_sq or 0.0)
                spliced_rows += x.shape[0]
    finally:
        bar.close()
        model.train(was_training)
        dictionary.train(dict_training)
    if predicted == 0:
        raise ValueError("no token windows to evaluate on")
    means = {key: value / predicted for key, value in sums.items()}
    variance = (x_sq - float((x_sum ** 2).sum()) / spliced_rows) if spliced_rows else float("nan")
    return {
        **means,
        **loss_scores(means["ce_clean"], means["ce_spliced"], means["ce_zero_ablation"], means["kl_spliced"],
                      means["kl_zero_ablation"]),
        "explained_variance": 1 - sse / variance if spliced_rows and variance > 0 else float("nan"),
        "l0": l0_sum / spliced_rows if spliced_rows else float("nan"),
        "predicted_tokens": predicted,
        "spliced_positions": spliced_rows,
        "kept_clean": {"first_positions": exclude_first, "token_ids": sorted(int(i) for i in special_ids),
                       "positions": positions - spliced_rows},
        "layer": layer,
    }


def _batches(windows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for window in windows:
        batch.append(torch.as_tensor(window, dtype=torch.long).reshape(-1))
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


@contextlib.contextmanager
def _capture(model: nn.Module, layer: str) -> Iterator[list[torch.Tensor]]:
    """The clean output of ``layer`` in the next forward (``seen[0]``)."""
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, output: seen.append(hidden_state(layer, output).detach()))
    try:
        yield seen
    finally:
        handle.remove()

