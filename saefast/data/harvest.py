"""Harvest a model's hidden states into an activation store, resumably, running only the layers needed.

:func:`harvest` feeds fixed-length token windows through the model in batches under ``torch.inference_mode()``;
forward hooks keep the hooked modules' outputs and stop the forward once all of them have run
(:class:`~saefast.data.hooks.Capture`), so the layers after them and the LM head never run.

Stored positions: not the first ``exclude_first`` (default 2) of a window — attention sinks, whose residual norm
is ~100× the median on SmolLM2 and would dominate a squared-error loss (the measurements are in the README) — and,
with ``exclude_special``, not BOS or pad tokens (but EOS, even where pad = EOS: the separators between documents
are ordinary tokens).

Resume: each shard records how many windows were consumed and a SHA-256 of their token ids; re-running the same
call on the same ``out`` skips them (checking the hash) and continues, giving the same store bit for bit. A changed
model, hook, text, context or exclusion rule changes the metadata, which the writer refuses (StoreError).

Interruptions: a shard is the unit of work (the interval). A SIGINT or SIGTERM (from the main thread) stops after
the forward batch under way and raises :class:`~saefast.interrupts.Interrupted`; ``kill -9`` or a crash just stops.
Either way the rows not yet written as a shard are dropped and harvested again on resume, so that the resumed store
is the uninterrupted one file for file: shard boundaries show in the order of shuffled batches (blocks never cross
a shard), and flushing a short shard at the signal would change the training that reads the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..interrupts import deferred_interrupts
from ..progress import progress_bar
from .hf import SOURCE_ATTR
from .hooks import Capture, abbreviate_names, decoder_blocks, layer_hook, resolve_hooks  # noqa: F401 (re-exported)
from .store import STORE_DTYPES, ActivationStore, StoreError, StoreWriter
from .text import token_windows

FORMAT = "saefast-harvest"
VERSION = 1
TOKEN_IDS = "token_ids"
"""Name of the store extra holding each stored token's id (int32)."""


def _id_set(value: Any) -> set[int]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def special_token_ids(model: nn.Module, tokenizer: Any = None) -> list[int]:
    """Token ids :func:`harvest` drops with ``exclude_special``: BOS, and pad unless pad is also EOS.

    Read from ``tokenizer`` when given, else from ``model.config``.
    """
    source = tokenizer if tokenizer is not None else getattr(model, "config", None)
    bos = _id_set(getattr(source, "bos_token_id", None))
    pad = _id_set(getattr(source, "pad_token_id", None))
    eos = _id_set(getattr(source, "eos_token_id", None))
    return sorted(bos | (pad - eos))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, shape, dtype and 64 strided samples of its bytes.

    Cheap (no full pass over the weights) yet it tells apart two random inits or two quantizations.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _documents_sha256(documents: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab","c"] ≠ ["a","bc"]
        digest.update(data)
    return digest.hexdigest()


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    vocab = sorted(tokenizer.get_vocab().items())
    return {"class": type(tokenizer).__name__, "vocab_size": len(vocab),
            "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()}


def model_label(model: nn.Module) -> str:
    """The model's source: what :func:`saefast.hf.load_model` recorded, else its config path, else its class."""
    label = getattr(model, SOURCE_ATTR, None)
    if not label:
        label = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return str(label)



def _say(line: str, log: Callable[[str], None] | None, progress: bool) -> None:
    if log is not None:
        log(line)
    elif progress:
        print(line, file=sys.stderr, flush=True)


def kept_positions(ids: torch.Tensor, special: torch.Tensor, exclude_first: int) -> torch.Tensor:
    """``[B, T]`` bool: the positions of token windows ``ids [B, T]`` that :func:`harvest` stores — not one of the
    ``special`` ids and not among the first ``exclude_first`` of a window."""
    mask = ~torch.isin(ids, special) if special.numel() else torch.ones_like(ids, dtype=torch.bool)
    mask[:, :exclude_first] = False
    return mask


def _checked_windows(windows: Iterable[torch.Tensor], context: int, start: int = 0) -> Iterator[torch.Tensor]:
    for index, window in enumerate(windows, start):
        if not isinstance(window, torch.Tensor) or window.dtype.is_floating_point or window.is_complex():
            raise TypeError(f"token window {index} must be an integer torch.Tensor of token ids, got "
                            f"{getattr(window, 'dtype', type(window).__name__)}")
        if window.dim() != 1 or window.numel() != context:
            raise ValueError(f"token window {index} has shape {tuple(window.shape)}; every window must be 1-D with "
                             f"context={context} tokens")
        yield window.to(device="cpu", dtype=torch.long)


def _available(windows: Sequence[torch.Tensor], special: torch.Tensor, exclude_first: int,
               context: int, need: int) -> int:
    """Kept tokens in ``windows``, counting only until ``need`` is reached."""
    total = 0
    for start in range(0, len(windows), 1024):
        stop = min(start + 1024, len(windows))
        chunk = torch.stack(list(_checked_windows((windows[i] for i in range(start, stop)), context, start)))
        total += int(kept_positions(chunk, special, exclude_first).sum())
        if total >= need:
            break
    return total


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def harvest(
    model: nn.Module,
    out: str | os.PathLike,
    hooks: str | int | Sequence[str | int],
    tokens: int,
    *,
    tokenizer: Any = None,
    texts: Sequence[str] | str | None = None,
    windows: Iterable[torch.Tensor] | None = None,
    context: int = 256,
    batch_size: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    shard_tokens: int = 65536,
    exclude_special: bool = True,
    exclude_first: int = 2,
    prepend_bos: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> ActivationStore:
    """Store exactly ``tokens`` hidden-state rows of modules ``hooks`` of ``model`` in the store ``out``.

    The input is either ``texts`` (documents) + ``tokenizer``, cut into windows of ``context`` tokens by
    :func:`saefast.text.token_windows` (``prepend_bos``: None = BOS when the tokenizer has one), or ``windows``,
    an iterable of 1-D LongTensors of length ``context`` used as given. Batches of ``batch_size`` windows run on
    ``device`` (default: the model's); per window, the first ``exclude_first`` positions and the BOS/pad tokens
    (``exclude_special``, see :func:`special_token_ids`) are dropped; the rest are stored in ``dtype`` with their
    token ids as the int32 extra ``"token_ids"``, in shards of at least ``shard_tokens`` rows (whole batches).

    Re-running on an incomplete ``out`` resumes it exactly (module docstring); a complete store with at least
    ``tokens`` rows is returned as is. Too little input raises ValueError saying how many tokens there were —
    before any compute when the input is sized (texts, lists, :class:`~saefast.text.TokenWindows`).
    ``metadata`` (JSON-able) is stored next to the harvest's own record under the key ``"harvest"``.
    A resumed harvest says so in one line, ``resuming the harvest in OUT at N of M tokens``, passed to ``log``
    (default: printed to stderr when ``progress``). A SIGINT or SIGTERM stops after the batch under way, keeping
    the shards written, and raises :class:`~saefast.interrupts.Interrupted` (module docstring).
    """
    _check_positive_int("tokens", tokens)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("shard_tokens", shard_tokens)
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an int >= 2 tokens, got {context!r}")
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or not 0 <= exclude_first < context:
        raise ValueError(f"exclude_first is the number of leading window positions not stored: an int in "
                         f"[0, context={context}), got {exclude_first!r}")
    if dtype not in STORE_DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)} (the store's dtypes), got {dtype!r}")
    if metadata is not None and (not isinstance(metadata, dict) or "harvest" in metadata):
        raise ValueError("metadata must be a dict without the reserved key 'harvest'")
    names = resolve_hooks(model, hooks)

    if (texts is None) == (windows is None):
        raise ValueError("pass exactly one input: texts= (with tokenizer=) or windows=")
    if texts is not None:
        if tokenizer is None:
            raise ValueError("texts= needs tokenizer= to make token windows (or pass pre-tokenized windows=)")
        documents = [texts] if isinstance(texts, str) else list(texts)
        if not documents or not all(isinstance(doc, str) for doc in documents):
            raise ValueError("texts must be a non-empty list of strings")
        made = token_windows(tokenizer, documents, context, prepend_bos)
        source: Iterable[torch.Tensor] = made
        text_meta: dict[str, Any] = {
            "kind": "texts", "documents": len(documents), "sha256": _documents_sha256(documents),
            "tokenizer": _tokenizer_identity(tokenizer), "stream_tokens": made.stream.numel(),
            "bos_prepended": made.bos_id is not None,
        }
    else:
        if prepend_bos is not None:
            raise ValueError("prepend_bos applies to texts=; windows= are used exactly as given")
        source = windows  # type: ignore[assignment]
        text_meta = {"kind": "windows"}  # their content is checked on resume by the windows hash in the state

    special_ids = special_token_ids(model, tokenizer) if exclude_special else []
    if isinstance(source, Sequence):  # sized input: too little text fails here, before any compute
        special = torch.tensor(special_ids, dtype=torch.long)
        available = _available(source, special, exclude_first, context, tokens)
        if available < tokens:
            where = (f"{text_meta['documents']} documents → {text_meta['stream_tokens']} tokens → "
                     f"{len(source)} windows of {context}" if texts is not None else f"{len(source)} windows")
            raise ValueError(f"not enough text: the input gives {available} harvestable tokens ({where}, minus "
                             f"the excluded positions), but tokens={tokens} were requested; add text or lower "
                             f"tokens")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    was_training = model.training
    model.eval()  # dropout off; restored on the way out
    try:
        return _harvest(model, out, names, tokens, source, text_meta, context, batch_size, dtype,
                        shard_tokens, special_ids, exclude_first, device, progress, metadata, log)
    finally:
        model.train(was_training)


def _harvest(model: nn.Module, out: str | os.PathLike, names: list[str], tokens: int,
             source: Iterable[torch.Tensor], text_meta: dict[str, Any], context: int, batch_size: int,
             dtype: torch.dtype, shard_tokens: int, special_ids: list[int], exclude_first: int,
             device: torch.device, progress: bool, metadata: dict[str, Any] | None,
             log: Callable[[str], None] | None = None) -> ActivationStore:
    """:func:`harvest` after its arguments are checked: open the store, resume it, fill it."""
    special = torch.tensor(special_ids, dtype=torch.long)
    with Capture(model, names) as capture, torch.inference_mode():
        probe = capture.run(torch.zeros(1, 2, dtype=torch.long, device=device))  # width of each hook, ~free
    dims = {name: int(probe[name].shape[-1]) for name in names}
    record = {
        "format": FORMAT, "version": VERSION,
        "model": {"source": model_label(model), "class": type(model).__name__,
                  "fingerprint": model_fingerprint(model)},
        "hooks": dims, "text": text_meta, "context": context,
        "exclude": {"first_positions": exclude_first, "token_ids": special_ids},
        "dtype": str(dtype).removeprefix("torch."),
    }
    writer = StoreWriter(out, hooks=dims, dtype=dtype, extras={TOKEN_IDS: torch.int32},
                         metadata={**(metadata or {}), "harvest": record})
    if writer.complete:
        if writer.tokens >= tokens:
            return ActivationStore(out, hook=names[0])
        raise ValueError(f"{out} is a complete store of {writer.tokens} tokens, fewer than the {tokens} "
                         f"requested; remove it or harvest into another directory")
    done = writer.tokens
    state = dict(writer.state or {})
    if done:
        _say(f"resuming the harvest in {out} at {done:,} of {tokens:,} tokens", log, progress)
    if done and "windows" not in state:
        raise StoreError(f"{out} holds {done} tokens but no harvest state: it was not written by harvest()")
    if done >= tokens:  # interrupted between the last shard and finish(), or written with a larger budget
        if done > tokens:
            warnings.warn(f"{out} already holds {done} tokens from an interrupted harvest with a larger budget; "
                          f"keeping all {done} (> tokens={tokens}): the store is complete with more tokens than "
                          f"asked. To get exactly {tokens}, harvest into another directory", stacklevel=2)
        writer.finish()
        return ActivationStore(out, hook=names[0])


    consumed = int(state.get("windows", 0))
    hasher = hashlib.sha256()
    stream = _checked_windows(source, context)
    for index in range(consumed):  # resume: skip (and hash) the windows already in the store, without the model
        window = next(stream, None)
        if window is None:
            raise StoreError(f"{out} was written from {consumed} windows, but this input has only {index}: "
                             f"different text; remove {out} or use another directory")
        hasher.update(window.numpy().tobytes())
    if consumed and hasher.hexdigest() != state.get("windows_sha256"):
        raise StoreError(f"the first {consumed} token windows differ from those that wrote {out} (different text "
                         f"or tokenization); remove it or harvest into another directory")

    pending: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    pending_n = 0
    bar = progress_bar(total=tokens, initial=done, unit="tok", unit_scale=True, enabled=progress,
                       desc=f"harvest {', '.join(names)}", dynamic_ncols=True)
    try:
        with Capture(model, names) as capture, torch.inference_mode(), deferred_interrupts() as request:
            while done < tokens:
                batch_list = []
                for window in stream:
                    batch_list.append(window)
                    if len(batch_list) == batch_size:
                        break
                if not batch_list:
                    raise ValueError(f"not enough text: the windows ran out after {consumed} windows and "
                                     f"{done + pending_n} harvestable tokens, but tokens={tokens} were requested; "
                                     f"add text or lower tokens")
                batch = torch.stack(batch_list)
                outputs = capture.run(batch.to(device))
                mask = kept_positions(batch, special, exclude_first)
                take = min(int(mask.sum()), tokens - done - pending_n)
                rows = {name: outputs[name][mask.to(device)][:take].to(dtype).cpu() for name in names}
                pending.append((rows, batch[mask][:take].to(torch.int32)))
                pending_n += take
                consumed += len(batch_list)
                for window in batch_list:
                    hasher.update(window.numpy().tobytes())
                bar.update(take)
                if pending_n >= shard_tokens or done + pending_n >= tokens:
                    writer.append({name: torch.cat([p[0][name] for p in pending]) for name in names},
                                  {TOKEN_IDS: torch.cat([p[1] for p in pending])},
                                  state={"windows": consumed, "windows_sha256": hasher.hexdigest(),
                                         "batch_size": batch_size})
                    done += pending_n
                    pending, pending_n = [], 0
                if done < tokens:  # a finished harvest completes; else stop here, keeping the shards written
                    request.check(saved=f"{done:,} of {tokens:,} tokens in {out} (the {pending_n:,} harvested "
                                  f"since the last shard come again on resume)" if done else "")
    finally:
        bar.close()
    writer.finish()
    return ActivationStore(out, hook=names[0])
