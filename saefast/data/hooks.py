"""Hook points of a model: naming modules (globs, layer numbers), and capturing their outputs in a forward.

:func:`resolve_hooks` turns module names, glob patterns and decoder-block numbers into module names;
:class:`Capture` keeps the hidden states those modules output and stops the forward once all of them have run, so
the layers after the last hook never run.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def module_names(model: nn.Module) -> list[str]:
    """Every named module of ``model`` but the root."""
    return [name for name, _ in model.named_modules() if name]  # the root ("") outputs logits, not hidden states


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0..2,5"``."""
    values = sorted(set(values))
    runs: list[str] = []
    start = prev = values[0]
    for value in values[1:] + [None]:  # type: ignore[list-item]
        if value is not None and value == prev + 1:
            prev = value
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if value is not None:
            start = prev = value
    return ",".join(runs)


def abbreviate_names(names: Sequence[str], limit: int = 40) -> str:
    """Module names with numbered siblings collapsed: ``model.layers.{0..29}.mlp`` stands for 30 names."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".")
        template = ".".join("{}" if part.isdigit() else part for part in parts)
        groups.setdefault(template, []).append(tuple(int(part) for part in parts if part.isdigit()))
    shown = []
    for template, indices in groups.items():
        fills = ["{" + _ranges([index[j] for index in indices]) + "}" for j in range(len(indices[0]))]
        shown.append(template.format(*fills) if fills else template)
    more = f", … and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def decoder_blocks(model: nn.Module) -> tuple[str, int]:
    """``(name, count)`` of the model's list of transformer blocks (``model.layers``, ``transformer.h``, ...).

    It is the first ``nn.ModuleList`` whose length is ``config.num_hidden_layers``; without a config, the only
    ModuleList of the model.
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = [(name, len(module)) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if isinstance(n_layers, int):
        found = [entry for entry in lists if entry[1] == n_layers]
        why = f"no nn.ModuleList of config.num_hidden_layers={n_layers} modules"
    else:
        found = lists if len(lists) == 1 else []
        why = "no config.num_hidden_layers and not exactly one nn.ModuleList"
    if not found:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} ({why}); name the module "
                         f"to hook instead, one of: {abbreviate_names(module_names(model))}")
    return found[0]


def layer_hook(model: nn.Module, layer: int) -> str:
    """Module name of transformer block ``layer`` (negative counts from the end): ``model.layers.15`` for Llama."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    name, count = decoder_blocks(model)
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {count} layers ({name}), "
                         f"valid layers are 0..{count - 1} (or -{count}..-1)")
    return f"{name}.{layer % count}"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over dotted module names: ``*``, ``?`` and ``[...]`` stay inside one name segment, ``**`` spans
    segments — so ``model.layers.*`` is the blocks themselves, not every submodule of every block."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^.]*")
        elif char == "?":
            out.append("[^.]")
        elif char == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace("\\-", "-")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out))


def resolve_hooks(model: nn.Module, patterns: str | int | Sequence[str | int]) -> list[str]:
    """Module names to hook, in the order given, without duplicates.

    Each pattern is an exact module name, a glob (``model.layers.1?``, ``model.layers.*``: fnmatch syntax,
    but ``*``/``?`` do not cross dots and ``**`` does), or a layer number (int, or a string of digits that is not
    itself a module name) mapped by :func:`layer_hook`. A pattern matching
    nothing raises ValueError listing the valid names.
    """
    if isinstance(patterns, (str, int)):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no hooks given: name at least one module or layer")
    names = module_names(model)
    known = set(names)
    resolved: list[str] = []
    for pattern in patterns:
        if isinstance(pattern, int) and not isinstance(pattern, bool):
            matches = [layer_hook(model, pattern)]
        elif not isinstance(pattern, str) or not pattern:
            raise TypeError(f"a hook must be a module name, glob or layer number, got {pattern!r}")
        elif pattern in known:
            matches = [pattern]
        elif re.fullmatch(r"-?\d+", pattern):
            matches = [layer_hook(model, int(pattern))]
        elif any(char in pattern for char in "*?["):
            regex = _glob_regex(pattern)
            matches = [name for name in names if regex.fullmatch(name)]
        else:
            matches = []
        if not matches:
            close = difflib.get_close_matches(str(pattern), names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            try:
                blocks, count = decoder_blocks(model)
                hint += (f" Transformer blocks: {blocks}.{{0..{count - 1}}} (or just the layer number; globs like "
                         f"{blocks}.* work too).")
            except ValueError:
                pass
            raise ValueError(f"hook {pattern!r} matches no module of {type(model).__name__}.{hint} All module "
                             f"names ({{a..b}} = numbered siblings): {abbreviate_names(names)}")
        resolved.extend(match for match in matches if match not in resolved)
    return resolved




class _StopForward(Exception):
    """Thrown by the last hook to end the forward early; caught by :meth:`Capture.run`."""


def hidden_state(name: str, output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output: the tensor, or the first element of a tuple / ModelOutput."""
    if not isinstance(output, torch.Tensor):
        try:
            output = output[0]
        except (TypeError, IndexError, KeyError):
            pass
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"module {name!r} outputs {type(output).__name__}, not a hidden-state tensor; hook a "
                        f"module whose output is a [batch, seq, d] tensor (e.g. a transformer block)")
    return output


class Capture:
    """Context manager: forward hooks that keep the outputs of modules ``names`` and stop the forward early.

    ``with Capture(model, names) as capture: outputs = capture.run(input_ids)`` → ``{name: [B, T, d]}``.
    With ``stop=True`` the forward ends as soon as every hooked module has run, so later layers never run.
    A module that runs several times in one forward (a shared block) contributes its first output.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], stop: bool = True):
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules or not name]
        if missing or not names:
            raise ValueError(f"cannot hook {missing or 'nothing'}; valid names: "
                             f"{abbreviate_names(module_names(model))}")
        self.model = model
        self.names = list(names)
        self.stop = stop
        self.outputs: dict[str, torch.Tensor] = {}
        self._modules = [modules[name] for name in self.names]
        self._handles: list[Any] = []
        # use_cache=False: a KV cache would only cost memory here; not every model's forward takes the flag.
        params = inspect.signature(model.forward).parameters
        self._kwargs = {"use_cache": False} if "use_cache" in params else {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in self.outputs:
                self.outputs[name] = hidden_state(name, output)
            if self.stop and len(self.outputs) == len(self.names):
                raise _StopForward
        return hook

    def __enter__(self) -> Capture:
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in zip(self.names, self._modules)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def run(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward on ``input_ids`` ``[B, T]``; returns ``{name: hidden state [B, T, d]}``."""
        if not self._handles:
            raise RuntimeError("Capture.run must be called inside `with Capture(...)`")
        self.outputs = {}
        try:
            self.model(input_ids=input_ids, **self._kwargs)
        except _StopForward:
            pass
        missing = [name for name in self.names if name not in self.outputs]
        if missing:
            raise RuntimeError(f"hooked modules {missing} never ran in the forward of {type(self.model).__name__}")
        batch, seq = input_ids.shape
        for name, hidden in self.outputs.items():
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (batch, seq):
                raise ValueError(f"module {name!r} outputs shape {tuple(hidden.shape)} for input [{batch}, {seq}]; "
                                 f"harvesting needs [batch, seq, d] hidden states (hook a transformer block)")
        return dict(self.outputs)


@torch.no_grad()
def layer_width(model: nn.Module, layer: str) -> int:
    """The last dimension of module ``layer``'s output (its ``d``), from a two-token forward that stops there."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with Capture(model, [layer]) as capture:
            return int(capture.run(torch.zeros((1, 2), dtype=torch.long, device=device))[layer].shape[-1])
    finally:
        model.train(was_training)
