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

Distributed (``harvest(..., distributed=True)`` on every rank; ``torchrun ... -m saefast harvest``): which positions
a batch stores, and so where every shard ends, follows from the token ids alone, so each rank first computes the
single-process shard plan without the model. The shards are shared out in order, whole: rank r gets a contiguous
run of them (the first ``n_shards % ranks`` ranks one more; a rank left without one waits), starts at its first
shard's first window and writes them as a store of its own, ``OUT/.harvest-parts/rank<r>-of-<ranks>``, resumable
like any harvest (its metadata records its share, so a changed plan is refused). Once every rank has finished and
its files are durable, rank 0 joins the parts (:func:`~saefast.data.store.merge.concatenate`: the files are
hard-linked under their global shard numbers, the manifest is written last, atomically) and removes them. The
result is the single-process store byte for byte: the same shards, files, manifest, metadata and state. Re-running
the same command after a crash or a kill continues every rank from its own last complete shard; running it with
another number of processes is refused until the harvest is finished.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from ..distributed import (
    DistributedError,
    active,
    agree_on_errors,
    describe,
    gather_objects,
    is_main,
    rank,
    settings_differences,
    world_size,
)
from ..interrupts import Interrupted, deferred_interrupts
from ..progress import progress_bar
from .hf import SOURCE_ATTR
from .hooks import Capture, abbreviate_names, decoder_blocks, layer_hook, resolve_hooks  # noqa: F401 (re-exported)
from .store import MANIFEST, STORE_DTYPES, ActivationStore, StoreError, StoreWriter
from .store.format import read_manifest
from .store.merge import concatenate
from .text import token_windows

T = TypeVar("T")

FORMAT = "saefast-harvest"
VERSION = 1
TOKEN_IDS = "token_ids"
"""Name of the store extra holding each stored token's id (int32)."""
PARTS = ".harvest-parts"
"""The folder of ``out`` where the ranks of a distributed harvest write their parts (removed once joined)."""
_PART_NAME = re.compile(r"rank\d+-of-(\d+)")


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


@dataclass
class _Job:
    """A :func:`harvest` call whose arguments are checked."""

    out: Path
    names: list[str]
    tokens: int
    source: Iterable[torch.Tensor]
    text_meta: dict[str, Any]
    context: int
    batch_size: int
    dtype: torch.dtype
    shard_tokens: int
    special_ids: list[int]
    exclude_first: int
    device: torch.device
    progress: bool
    metadata: dict[str, Any] | None
    log: Callable[[str], None] | None

    @property
    def special(self) -> torch.Tensor:
        """The dropped token ids as a LongTensor."""
        return torch.tensor(self.special_ids, dtype=torch.long)


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
    distributed: bool = False,
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

    ``distributed=True``: called on every rank of the initialised default process group (e.g. after
    :func:`saefast.distributed.init_from_env` under ``torchrun``) with the same arguments, the ranks share out the
    work shard by shard and return the same store as a single process would write (module docstring,
    "Distributed"); ``out`` must be on a filesystem every rank sees. Only rank 0 shows progress and logs. An error
    on some ranks raises :class:`~saefast.distributed.DistributedError` naming them on every rank; an error every
    rank hits alike (bad input) is raised as it is. With one process in the group it is the plain harvest.
    """
    if distributed and not active():
        raise ValueError("distributed=True needs an initialised torch.distributed process group: start the job "
                         "with torchrun and call saefast.distributed.init_from_env() (saefast harvest does), or "
                         "call torch.distributed.init_process_group first")
    split = distributed and world_size() > 1
    check = functools.partial(_checked_job, model, out, hooks, tokens, tokenizer, texts, windows, context,
                              batch_size, dtype, shard_tokens, exclude_special, exclude_first, prepend_bos, device,
                              progress and (not split or is_main()), metadata, log)
    job = _agreed(check) if split else check()  # bad input fails on every rank before any of them writes
    was_training = model.training
    model.eval()  # dropout off; restored on the way out
    try:
        return (_harvest_split if split else _harvest)(model, job)
    finally:
        model.train(was_training)


def _checked_job(model: nn.Module, out: str | os.PathLike, hooks: str | int | Sequence[str | int], tokens: int,
                 tokenizer: Any, texts: Sequence[str] | str | None, windows: Iterable[torch.Tensor] | None,
                 context: int, batch_size: int, dtype: torch.dtype, shard_tokens: int, exclude_special: bool,
                 exclude_first: int, prepend_bos: bool | None, device: str | torch.device | None, progress: bool,
                 metadata: dict[str, Any] | None, log: Callable[[str], None] | None) -> _Job:
    """:func:`harvest`'s arguments checked (ValueError/TypeError saying what is wrong) and its input made."""
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
    return _Job(Path(out), names, tokens, source, text_meta, context, batch_size, dtype, shard_tokens, special_ids,
                exclude_first, torch.device(device), progress, metadata, log)


def _store_metadata(model: nn.Module, job: _Job) -> tuple[dict[str, int], dict[str, Any]]:
    """``({hook: width}, the store's metadata)``: the caller's ``metadata`` and the harvest's record."""
    with Capture(model, job.names) as capture, torch.inference_mode():
        probe = capture.run(torch.zeros(1, 2, dtype=torch.long, device=job.device))  # width of each hook, ~free
    dims = {name: int(probe[name].shape[-1]) for name in job.names}
    record = {
        "format": FORMAT, "version": VERSION,
        "model": {"source": model_label(model), "class": type(model).__name__,
                  "fingerprint": model_fingerprint(model)},
        "hooks": dims, "text": job.text_meta, "context": job.context,
        "exclude": {"first_positions": job.exclude_first, "token_ids": job.special_ids},
        "dtype": str(job.dtype).removeprefix("torch."),
    }
    return dims, {**(job.metadata or {}), "harvest": record}


def _writer(path: Path, dims: dict[str, int], job: _Job, metadata: dict[str, Any]) -> StoreWriter:
    """The writer of a harvest store (or of one rank's part of it) at ``path``, resuming what is there."""
    return StoreWriter(path, hooks=dims, dtype=job.dtype, extras={TOKEN_IDS: torch.int32}, metadata=metadata)


def _reuse(writer: StoreWriter, job: _Job) -> ActivationStore | None:
    """The finished store, when ``writer``'s is complete with enough tokens (None while it is incomplete)."""
    if not writer.complete:
        return None
    if writer.tokens < job.tokens:
        raise ValueError(f"{job.out} is a complete store of {writer.tokens} tokens, fewer than the {job.tokens} "
                         f"requested; remove it or harvest into another directory")
    if is_main():  # a distributed harvest stopped between writing the joined manifest and removing its parts
        shutil.rmtree(job.out / PARTS, ignore_errors=True)
    return ActivationStore(job.out, hook=job.names[0])


def _check_split(out: Path, ranks: int) -> None:
    """Refuse to continue in ``out`` a harvest that ran on another number of processes: its shards were shared
    out otherwise (StoreError saying how to resume it)."""
    if (out / MANIFEST).exists():
        if ranks > 1 and not read_manifest(out)["complete"]:
            raise StoreError(f"{out} holds a harvest in progress by a single process; resume it the same way "
                             f"(without torchrun / distributed=True) or remove it")
        return
    folder = out / PARTS
    found = {int(match[1]) for part in (folder.iterdir() if folder.is_dir() else ())
             if (match := _PART_NAME.fullmatch(part.name))}
    other = sorted(found - {ranks})
    if other:
        raise StoreError(f"{out} holds a harvest in progress split over {other[0]} processes; resume it with as "
                         f"many (torchrun --nproc_per_node={other[0]} ...) or remove it")


class _Batch(NamedTuple):
    """One forward batch of a harvest, known from the token ids alone."""

    ids: torch.Tensor
    """``[B, context]`` token windows."""
    mask: torch.Tensor
    """``[B, context]`` the positions kept; the first ``take`` of them are stored (the budget may cut the last)."""
    take: int
    done: int
    """Rows stored once this batch's shard is written (meaningful where ``state`` is set)."""
    state: dict[str, Any] | None
    """Set when the batch ends a shard: the resume state written with it."""


def _batches(stream: Iterator[torch.Tensor], job: _Job, tokens: int, done: int = 0, consumed: int = 0,
             hasher: Any = None) -> Iterator[_Batch]:
    """The batches of ``job.batch_size`` windows a harvest runs, from ``stream`` (window ``consumed`` on, with
    ``done`` rows stored before it) until ``tokens`` rows are stored. A shard ends once it holds
    ``job.shard_tokens`` rows or the budget is reached; its state counts the windows consumed and hashes them
    (``hasher``: over the windows before ``consumed``). It needs no model, so every rank of a distributed harvest
    computes the same shard plan, and a rank starting at a shard's first window continues it exactly."""
    hasher = hashlib.sha256() if hasher is None else hasher
    pending = 0
    while done + pending < tokens:
        windows = list(itertools.islice(stream, job.batch_size))
        if not windows:
            raise ValueError(f"not enough text: the windows ran out after {consumed} windows and {done + pending} "
                             f"harvestable tokens, but tokens={tokens} were requested; add text or lower tokens")
        ids = torch.stack(windows)
        mask = kept_positions(ids, job.special, job.exclude_first)
        take = min(int(mask.sum()), tokens - done - pending)
        pending += take
        consumed += len(windows)
        for window in windows:
            hasher.update(window.numpy().tobytes())
        state = None
        if pending >= job.shard_tokens or done + pending >= tokens:
            done, pending = done + pending, 0
            state = {"windows": consumed, "windows_sha256": hasher.hexdigest(), "batch_size": job.batch_size}
        yield _Batch(ids, mask, take, done, state)


def _skip_done(stream: Iterator[torch.Tensor], start: int, state: dict[str, Any], where: Path) -> Any:
    """Resume: skip (and hash) the windows ``[start, state["windows"])`` of ``stream``, stored already in
    ``where``, without the model; StoreError if they are not the windows that were stored. Returns the hasher."""
    consumed = int(state.get("windows", start))
    hasher = hashlib.sha256()
    for index in range(start, consumed):
        window = next(stream, None)
        if window is None:
            raise StoreError(f"{where} was written from {consumed} windows, but this input has only {index}: "
                             f"different text; remove {where} or use another directory")
        hasher.update(window.numpy().tobytes())
    if consumed > start and hasher.hexdigest() != state.get("windows_sha256"):
        which = f"the first {consumed} token windows" if start == 0 else f"token windows {start}..{consumed - 1}"
        raise StoreError(f"{which} differ from those that wrote {where} (different text or tokenization); remove "
                         f"it or harvest into another directory")
    return hasher


def _fill(model: nn.Module, job: _Job, writer: StoreWriter, batches: Iterator[_Batch], total: int,
          desc: str) -> None:
    """Run the model on ``batches`` and append their stored rows to ``writer``, a shard wherever a batch ends one,
    until it holds ``total`` rows. A SIGINT or SIGTERM stops after the batch under way (module docstring)."""
    pending: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
    pending_n = 0
    bar = progress_bar(total=total, initial=writer.tokens, unit="tok", unit_scale=True, enabled=job.progress,
                       desc=desc, dynamic_ncols=True)
    try:
        with Capture(model, job.names) as capture, torch.inference_mode(), deferred_interrupts() as request:
            for batch in batches:
                outputs = capture.run(batch.ids.to(job.device))
                mask = batch.mask.to(job.device)
                pending.append(({name: outputs[name][mask][:batch.take].to(job.dtype).cpu() for name in job.names},
                                batch.ids[batch.mask][:batch.take].to(torch.int32)))
                pending_n += batch.take
                bar.update(batch.take)
                if batch.state is not None:
                    writer.append({name: torch.cat([p[0][name] for p in pending]) for name in job.names},
                                  {TOKEN_IDS: torch.cat([p[1] for p in pending])}, state=batch.state)
                    pending, pending_n = [], 0
                if writer.tokens < total:  # a finished harvest completes; else stop here, keeping the shards written
                    request.check(saved=f"{writer.tokens:,} of {total:,} tokens in {writer.path} (the "
                                  f"{pending_n:,} harvested since the last shard come again on resume)"
                                  if writer.tokens else "")
    finally:
        bar.close()


def _harvest(model: nn.Module, job: _Job) -> ActivationStore:
    """:func:`harvest` in one process: open the store, resume it, fill it."""
    dims, metadata = _store_metadata(model, job)
    _check_split(job.out, 1)
    writer = _writer(job.out, dims, job, metadata)
    store = _reuse(writer, job)
    if store is not None:
        return store
    done, state, tokens, out = writer.tokens, writer.state, job.tokens, job.out
    if done:
        _say(f"resuming the harvest in {out} at {done:,} of {tokens:,} tokens", job.log, job.progress)
    if done and "windows" not in state:
        raise StoreError(f"{out} holds {done} tokens but no harvest state: it was not written by harvest()")
    if done >= tokens:  # interrupted between the last shard and finish(), or written with a larger budget
        if done > tokens:
            warnings.warn(f"{out} already holds {done} tokens from an interrupted harvest with a larger budget; "
                          f"keeping all {done} (> tokens={tokens}): the store is complete with more tokens than "
                          f"asked. To get exactly {tokens}, harvest into another directory", stacklevel=2)
        writer.finish()
        return ActivationStore(out, hook=job.names[0])

    stream = _checked_windows(job.source, job.context)
    hasher = _skip_done(stream, 0, state, out)
    _fill(model, job, writer, _batches(stream, job, tokens, done, int(state.get("windows", 0)), hasher), tokens,
          f"harvest {', '.join(job.names)}")
    writer.finish()
    return ActivationStore(out, hook=job.names[0])


# ------------------------------------------------------------------------------------------ distributed


def _agree(error: BaseException | None) -> None:
    """:func:`~saefast.distributed.agree_on_errors`, except that an error every rank raised alike (bad input is the
    same on every rank) is raised as it is, so it reads as in one process, and that a rank stopped by a signal
    raises its own :class:`~saefast.interrupts.Interrupted` (what it saved, the signal's exit status)."""
    messages = gather_objects(None if error is None else describe(error))
    if error is not None and len(set(messages)) == 1:  # the same on every rank: they all raise here
        raise error
    try:
        agree_on_errors(error)
    except DistributedError:
        if isinstance(error, Interrupted):
            raise error from None
        raise


def _agreed(step: Callable[[], T]) -> T:
    """``step()`` on this rank, then every rank agrees on the errors (:func:`_agree`) before any goes on: a rank
    that failed does not leave the others waiting at their next collective."""
    try:
        result = step()
    except (Exception, Interrupted) as err:  # Interrupted: a signal, which torchrun passes to every rank
        _agree(err)
        raise  # not reached: _agree raises on every rank
    _agree(None)
    return result


def _share(n_shards: int, ranks: int, rank_: int) -> tuple[int, int]:
    """The shards ``[lo, hi)`` of rank ``rank_``: contiguous, in rank order, as even as possible."""
    base, extra = divmod(n_shards, ranks)
    lo = rank_ * base + min(rank_, extra)
    return lo, lo + base + (rank_ < extra)


class _Part(NamedTuple):
    """One rank's share of a distributed harvest: shards ``[lo, hi)`` of the single-process plan, their windows
    and their rows, written as a store of its own at ``path``."""

    path: Path
    shards: tuple[int, int]
    windows: tuple[int, int]
    tokens: tuple[int, int]

    @property
    def rows(self) -> int:
        """Rows of the store this part holds when complete."""
        return self.tokens[1] - self.tokens[0]

    def record(self, rank_: int, ranks: int) -> dict[str, Any]:
        """What the part's metadata says of it: another plan (budget, batch or shard size) refuses to resume it."""
        return {"rank": rank_, "ranks": ranks, "shards": list(self.shards), "windows": list(self.windows),
                "tokens": list(self.tokens)}


def _parts(out: Path, ends: list[tuple[int, dict[str, Any]]], ranks: int) -> list[_Part]:
    """Every rank's part of the shards whose ends are ``ends`` (rows stored, state); empty for a rank left without
    a shard."""
    bounds = [(0, 0)] + [(state["windows"], done) for done, state in ends]
    parts = []
    for r in range(ranks):
        lo, hi = _share(len(ends), ranks, r)
        parts.append(_Part(out / PARTS / f"rank{r}-of-{ranks}", (lo, hi), (bounds[lo][0], bounds[hi][0]),
                           (bounds[lo][1], bounds[hi][1])))
    return parts


def _recorded(stream: Iterator[torch.Tensor], into: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``stream``, appending each window to ``into`` as it passes."""
    for window in stream:
        into.append(window)
        yield window


def _harvest_split(model: nn.Module, job: _Job) -> ActivationStore:
    """:func:`harvest` on every rank of the process group (module docstring, "Distributed")."""
    ranks, me, out = world_size(), rank(), job.out

    def plan() -> tuple[dict[str, int], dict[str, Any], Sequence[torch.Tensor], list[tuple[int, dict[str, Any]]]]:
        dims, metadata = _store_metadata(model, job)
        source = job.source
        if isinstance(source, Sequence):
            stream = _checked_windows(source, job.context)
        else:  # an iterator: keep the windows the plan reads, to cut the ranks' shares from
            source = []
            stream = _recorded(_checked_windows(job.source, job.context), source)
        ends = [(batch.done, batch.state) for batch in _batches(stream, job, job.tokens) if batch.state]
        return dims, metadata, source, ends  # type: ignore[return-value]

    dims, metadata, source, ends = _agreed(plan)
    differs = settings_differences({"store": metadata, "shards": ends})
    if differs:  # e.g. another model or text on some rank: their parts would not make one store
        raise ValueError("the ranks disagree on the harvest: " + "; ".join(differs))
    parts = _parts(out, ends, ranks)
    mine = parts[me]

    def open_part() -> tuple[ActivationStore | None, StoreWriter | None]:
        if (out / MANIFEST).exists():
            store = _reuse(_writer(out, dims, job, metadata), job)
            if store is not None:
                return store, None
        _check_split(out, ranks)
        if not mine.rows:
            return None, None
        return None, _writer(mine.path, dims, job, {**metadata, "part": mine.record(me, ranks)})

    store, writer = _agreed(open_part)
    everyone = gather_objects((store is not None, 0 if writer is None else writer.tokens))

    def check_shared() -> None:  # rank 0 joins the parts: it must see them
        unseen = [r for r, part in enumerate(parts) if part.rows and not part.path.is_dir()]
        if is_main() and (len({reused for reused, _ in everyone}) > 1 or unseen):
            raise StoreError(f"the ranks do not see the same {out}: it must be on a filesystem they share"
                             + (f" (rank 0 cannot see the parts of ranks {unseen})" if unseen else ""))

    _agreed(check_shared)
    if store is not None:
        return store
    done = sum(rows for _, rows in everyone)
    if done and is_main():
        _say(f"resuming the harvest in {out} at {done:,} of {job.tokens:,} tokens (split over {ranks} ranks)",
             job.log, job.progress)

    def fill() -> None:
        if writer is None or writer.complete:
            return
        start, state = mine.windows[0], writer.state
        stream = _checked_windows((source[i] for i in range(start, len(source))), job.context, start)
        hasher = _skip_done(stream, start, state, mine.path)
        batches = _batches(stream, job, mine.tokens[1], mine.tokens[0] + writer.tokens,
                           int(state.get("windows", start)), hasher)
        _fill(model, job, writer, batches, mine.rows,
              f"harvest {', '.join(job.names)} (rank 0: {mine.rows:,} of the {job.tokens:,} tokens)")
        writer.finish()

    _agreed(fill)  # also a barrier: past it, every rank's part is complete and durable
    _agreed(lambda: _join(job, parts, metadata, ends[-1][1]) if is_main() else None)
    return ActivationStore(out, hook=job.names[0])


def _join(job: _Job, parts: list[_Part], metadata: dict[str, Any], state: dict[str, Any]) -> None:
    """Rank 0, once every rank has finished its part: write the store the parts make, then remove them."""
    for part in parts:
        if part.rows:
            manifest = read_manifest(part.path)
            if not manifest["complete"] or manifest["tokens"] != part.rows:
                raise StoreError(f"{part.path} holds {manifest['tokens']} of its {part.rows} tokens: its rank did "
                                 f"not finish its share")
    concatenate(job.out, [part.path for part in parts if part.rows], metadata, state)
    shutil.rmtree(job.out / PARTS)
