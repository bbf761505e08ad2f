"""The static HTML feature browser: :func:`write_site` turns collected latent statistics into a folder of pages
that open from ``file://`` (no server, no network, no CDN; plain JS and inline SVG, all vendored).

Layout of ``out/``::

    index.html            the ensemble views and a sortable, filterable table of every latent
    latent.html           one latent's page, chosen by its hash: latent.html#m=<member>&l=<latent>
    assets/browser.css    copied from the package data (saefast/browse/assets/)
    assets/browser.js
    data/index.js         window.SAEFAST_INDEX = <INDEX>;
    data/shard-00000.js   window.saefastShard(0, {"<member>/<latent>": <LATENT>, ...});
    ...

Data is loaded with ``<script>`` tags, because Chromium refuses fetch/XHR of files from ``file://``. A latent page
loads ``index.js``, finds the latent's row and injects that row's shard script only, so a site of 100 k latents
opens fast (index.js plus one shard per page). Shard ``s`` holds the latents whose row position in
``INDEX["rows"]`` lies in ``[s * shard_size, (s + 1) * shard_size)``; the writer fills in each row's shard.

The data contract (version 1):

INDEX::

    {"format": "saefast-browser", "version": 1, "title": str,
     "model": {"kind": "single" | "bagging" | "boosting", "members": J, "chains": C, "latents_per_member": M,
               "activation": str, "k": int | None},
     "data": {"store": str, "hook": str, "tokens": int, "lm": str | None},
     "columns": ["member", "latent", "frequency", "max_activation", "mean_activation", "shard"],
     "rows": [[member, latent, frequency, max_activation, mean_activation, shard], ...],
     "ensemble": {"shared_threshold": float, "shared_matrix": [[J x J floats]] | None,
                  "stage_variance": [float, one per boosting stage] | None,
                  "classes": {class_name: [[member, latent], ...]} | None},
     "generated": {"saefast": version str}}

One row per latent. The writer sets each row's shard (a row of the first five columns only is accepted too).

LATENT (the values of ``latents``, keyed by ``(member, latent)``)::

    {"member": j, "latent": m,
     "frequency": float (fraction of tokens it fires on), "max_activation": float,
     "mean_activation": float (over firing tokens),
     "histogram": {"edges": [B + 1 floats], "counts": [B ints]},
     "top": [CONTEXT, ...] (descending value),
     "quantiles": [{"quantile": float in (0, 1], "examples": [CONTEXT, ...]}, ...],
     "logits": {"promoted": [[token str, float], ...], "suppressed": [[token str, float], ...]} | None,
     "neighbours": [{"member": j2, "latent": m2, "cosine": float}, ...]}

``neighbours``: the nearest latent by decoder cosine in each other member.

CONTEXT::

    {"tokens": [str, ...], "activations": [float, ...] (this latent's activation at each token),
     "focus": int (the index of the token the example was selected for; for a top example the argmax of
                   activations),
     "value": float}

Non-finite floats are written as JavaScript's ``NaN`` / ``Infinity`` (the data files are scripts, not JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from saefast.files import atomic_write_bytes

FORMAT = "saefast-browser"
VERSION = 1
COLUMNS = ["member", "latent", "frequency", "max_activation", "mean_activation", "shard"]
ASSETS = ("browser.css", "browser.js")

_INDEX_KEYS = ("format", "version", "title", "model", "data", "columns", "rows", "ensemble", "generated")
_MODEL_KEYS = ("kind", "members", "chains", "latents_per_member", "activation", "k")
_DATA_KEYS = ("store", "hook", "tokens", "lm")
_ENSEMBLE_KEYS = ("shared_threshold", "shared_matrix", "stage_variance", "classes")
_LATENT_KEYS = ("member", "latent", "frequency", "max_activation", "mean_activation", "histogram", "top",
                "quantiles", "logits", "neighbours")
_CONTEXT_KEYS = ("tokens", "activations", "focus", "value")
_KINDS = ("single", "bagging", "boosting")
_SHARD_FILE = re.compile(r"shard-(\d+)\.js")


def write_site(out: str | Path, index: dict, latents: dict[tuple[int, int], dict], shard_size: int = 256) -> Path:
    """Write the browser for ``index`` and ``latents`` (the module docstring's contract) into the folder ``out``.

    The whole input is validated first (a ValueError names the problem; nothing is written then). Every file is
    written atomically; the data comes first and ``index.html`` last, so a crash mid-way leaves the previous site's
    pages pointing at complete files. Shards left over from an earlier, larger site in ``out`` are removed. The
    caller's ``index`` is not modified (the written copy has the shard numbers filled in). Returns
    ``out/index.html``.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    rows = _validate_index(index)
    _validate_latents(rows, latents)

    out = Path(out)
    # The written index: the caller's, with fresh row lists carrying their shard number.
    written = dict(index)
    written["rows"] = [list(row[:5]) + [position // shard_size] for position, row in enumerate(rows)]
    n_shards = (len(rows) + shard_size - 1) // shard_size

    for shard in range(n_shards):
        chunk = rows[shard * shard_size : (shard + 1) * shard_size]
        payload = {f"{row[0]}/{row[1]}": latents[(row[0], row[1])] for row in chunk}
        _write_script(out / "data" / _shard_name(shard), f"window.saefastShard({shard}, {_dumps(payload)});\n")
    _remove_stale_shards(out / "data", n_shards)
    for name in ASSETS:
        atomic_write_bytes(out / "assets" / name, _asset(name))
    _write_script(out / "data" / "index.js", f"window.SAEFAST_INDEX = {_dumps(written)};\n")
    atomic_write_bytes(out / "latent.html", _asset("latent.html"))
    atomic_write_bytes(out / "index.html", _asset("index.html"))
    return out / "index.html"


def _validate_index(index: Any) -> list[list]:
    """Check ``index`` against the INDEX contract; return its rows. Raises ValueError naming the first problem."""
    if not isinstance(index, Mapping):
        raise ValueError(f"index must be a dict, got {type(index).__name__}")
    _require(index, _INDEX_KEYS, "index")
    if index["format"] != FORMAT or index["version"] != VERSION:
        raise ValueError(f"index is format {index['format']!r} version {index['version']!r}; "
                         f"write_site writes {FORMAT!r} version {VERSION}")
    _require(index["model"], _MODEL_KEYS, "index['model']")
    if index["model"]["kind"] not in _KINDS:
        raise ValueError(f"index['model']['kind'] must be one of {_KINDS}, got {index['model']['kind']!r}")
    _require(index["data"], _DATA_KEYS, "index['data']")
    _require(index["ensemble"], _ENSEMBLE_KEYS, "index['ensemble']")
    if not isinstance(index["generated"], Mapping) or "saefast" not in index["generated"]:
        raise ValueError("index['generated'] must be a dict with the key 'saefast' (the version string)")
    if list(index["columns"]) != COLUMNS:
        raise ValueError(f"index['columns'] must be {COLUMNS}, got {index['columns']!r}")
    rows = index["rows"]
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"index['rows'] must be a list, got {type(rows).__name__}")
    seen: set[tuple[int, int]] = set()
    for position, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) not in (5, 6):
            raise ValueError(f"index['rows'][{position}] must be a list of the columns {COLUMNS}, got {row!r}")
        key = (row[0], row[1])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in key):
            raise ValueError(f"index['rows'][{position}]: member and latent must be ints, got {key!r}")
        if key in seen:
            raise ValueError(f"index['rows'][{position}]: latent {key} appears twice")
        seen.add(key)
    shared = index["ensemble"]["shared_matrix"]
    members = index["model"]["members"]
    if shared is not None and (len(shared) != members or any(len(line) != members for line in shared)):
        raise ValueError(f"index['ensemble']['shared_matrix'] must be {members} x {members} (model members)")
    return list(rows)


def _validate_latents(rows: list[list], latents: Any) -> None:
    """Check that every row has a LATENT entry of the contract and every entry a row. Raises ValueError."""
    if not isinstance(latents, Mapping):
        raise ValueError(f"latents must be a dict keyed by (member, latent), got {type(latents).__name__}")
    keys = {(row[0], row[1]) for row in rows}
    for position, row in enumerate(rows):
        key = (row[0], row[1])
        if key not in latents:
            raise ValueError(f"index['rows'][{position}] is latent {key}, which has no entry in latents")
    extra = [key for key in latents if key not in keys]
    if extra:
        raise ValueError(f"latents has {len(extra)} entries without a row in index['rows'], e.g. {extra[0]!r}")
    for key, entry in latents.items():
        where = f"latents[{key!r}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        _require(entry, _LATENT_KEYS, where)
        if (entry["member"], entry["latent"]) != tuple(key):
            raise ValueError(f"{where} says member {entry['member']!r}, latent {entry['latent']!r}")
        histogram = entry["histogram"]
        _require(histogram, ("edges", "counts"), f"{where}['histogram']")
        if len(histogram["edges"]) != len(histogram["counts"]) + 1:
            raise ValueError(f"{where}['histogram'] needs one more edge than counts, got "
                             f"{len(histogram['edges'])} edges and {len(histogram['counts'])} counts")
        for i, context in enumerate(entry["top"]):
            _validate_context(context, f"{where}['top'][{i}]")
        for q, quantile in enumerate(entry["quantiles"]):
            _require(quantile, ("quantile", "examples"), f"{where}['quantiles'][{q}]")
            for i, context in enumerate(quantile["examples"]):
                _validate_context(context, f"{where}['quantiles'][{q}]['examples'][{i}]")
        if entry["logits"] is not None:
            _require(entry["logits"], ("promoted", "suppressed"), f"{where}['logits']")
        for i, neighbour in enumerate(entry["neighbours"]):
            _require(neighbour, ("member", "latent", "cosine"), f"{where}['neighbours'][{i}]")


def _validate_context(context: Any, where: str) -> None:
    """Check one CONTEXT: its keys, one activation per token, and a focus index inside the tokens."""
    _require(context, _CONTEXT_KEYS, where)
    tokens, activations, focus = context["tokens"], context["activations"], context["focus"]
    if len(tokens) != len(activations):
        raise ValueError(f"{where} has {len(tokens)} tokens but {len(activations)} activations")
    if isinstance(focus, bool) or not isinstance(focus, int) or not 0 <= focus < len(tokens):
        raise ValueError(f"{where}['focus'] must be a token index in [0, {len(tokens)}), got {focus!r}")


def _require(obj: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise a ValueError listing the ``keys`` that the dict ``obj`` lacks (or saying it is no dict)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(obj).__name__}")
    missing = [key for key in keys if key not in obj]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing}")


def _dumps(obj: Any) -> str:
    """Compact JSON for a script file. ASCII-only (``\\uXXXX`` escapes), so a token holding a lone surrogate or an
    odd byte still writes, and the file reads the same whatever encoding the browser assumes."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True, default=_plain)


def _plain(obj: Any) -> Any:
    """JSON fallback for numpy/torch scalars and arrays (``.tolist()``); anything else is a TypeError."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} into the browser's data")


def _write_script(path: Path, text: str) -> None:
    """Write one data script atomically."""
    atomic_write_bytes(path, text.encode("ascii"))


def _shard_name(shard: int) -> str:
    """The file name of shard ``shard`` (browser.js builds the same name)."""
    return f"shard-{shard:05d}.js"


def _remove_stale_shards(folder: Path, n_shards: int) -> None:
    """Delete ``shard-*.js`` files numbered ``n_shards`` or above: leftovers of an earlier, larger site."""
    for path in folder.glob("shard-*.js"):
        match = _SHARD_FILE.fullmatch(path.name)
        if match and int(match.group(1)) >= n_shards:
            path.unlink()


def _asset(name: str) -> bytes:
    """The bytes of the packaged asset ``saefast/browse/assets/<name>``."""
    return resources.files("saefast.browse").joinpath("assets", name).read_bytes()
