"""SAE-ception cycles: train an SAE on the hooked layer, sharpen its class codes, fine-tune with the cosine loss
to the sharpened targets, repeat (:class:`SAECeption`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..config import SAEConfig
from ..data.hooks import abbreviate_names, module_names
from ..devices import to_device
from ..eval import evaluate
from ..files import atomic_write_bytes
from ..interrupts import Interrupted, StopRequest, deferred_interrupts
from ..models import SAE, Ensemble, SparseDictionary, load
from ..progress import progress_bar
from ..training import train as train_sae
from ..validation import changed_fields
from .aux_loss import AuxiliaryLoss, cosine_loss
from .checks import check_labels, inference
from .stats import class_masks, class_stats
from .targets import TARGETS, Target, example_targets, random_targets, targets


@dataclass
class Split:
    """Examples of a classification task: ``inputs`` (a tensor ``[N, ...]``, or a dict of them such as
    ``{"input_ids", "attention_mask"}``, passed as ``model(**inputs)``) and ``labels [N]`` int class ids.

    Batches are always drawn by indexing every field with the same index tensor, so labels, inputs and
    per-example targets stay aligned through every shuffle."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        fields = self.inputs.items() if isinstance(self.inputs, Mapping) else [("inputs", self.inputs)]
        for name, tensor in fields:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
                raise TypeError(f"{name} must be a tensor with a leading example axis")
        n = {tensor.shape[0] for _, tensor in fields}
        if len(n) != 1:
            raise ValueError(f"inputs disagree on the number of examples: {sorted(n)}")
        self.labels = check_labels(self.labels, n.pop())
        if len(self) == 0:
            raise ValueError("a split needs at least one example")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """``inputs`` of the examples ``index``."""
        if isinstance(self.inputs, Mapping):
            return {name: tensor[index] for name, tensor in self.inputs.items()}
        return self.inputs[index]

    def position_mask(self, index: torch.Tensor, length: int, skip: int = 0) -> torch.Tensor:
        """``[len(index), length]`` bool: the positions that count — the ``attention_mask`` (all, without one), less
        the first ``skip`` of every sequence."""
        if isinstance(self.inputs, Mapping) and "attention_mask" in self.inputs:
            mask = self.inputs["attention_mask"][index].bool()
            if mask.shape[1] != length:
                raise ValueError(f"attention_mask has {mask.shape[1]} positions but the hooked layer {length}")
        else:
            mask = torch.ones(index.numel(), length, dtype=torch.bool)
        if skip:
            mask = mask.clone()
            mask[:, :skip] = False
        return mask


def _as_split(split: Split | tuple, name: str) -> Split:
    if isinstance(split, Split):
        return split
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return Split(*split)
    raise TypeError(f"{name} must be a Split or an (inputs, labels) pair, got {type(split).__name__}")


def _forward(model: nn.Module, inputs: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    if isinstance(inputs, Mapping):
        return model(**{name: to_device(tensor, device) for name, tensor in inputs.items()})
    return model(to_device(inputs, device))


def _chunks(n: int, size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(size)


class _ShuffledRows:
    """Re-iterable batches of rows of ``x``: a fresh seeded permutation every epoch (for SAE training)."""

    def __init__(self, x: torch.Tensor, batch_size: int, seed: int):
        self.x, self.batch_size, self.epoch, self.seed = x, batch_size, 0, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        for index in _chunks(self.x.shape[0], self.batch_size, generator):
            yield self.x[index]


@dataclass
class SharpenConfig:
    """One SAE-ception run: the task training, the SAE of every cycle and the sharpening."""

    cycles: int = 2
    """Fine-tuning cycles after the baseline (the history has ``cycles + 1`` rows)."""
    layer: str | None = None
    """Module whose output is sharpened (``model.named_modules()`` name); default ``model.hook_layer``."""
    epochs: int = 30
    """Task epochs of the baseline (cycle 0); 0 for a model that is already trained."""
    finetune_epochs: int = 10
    """Task epochs of every later cycle, with the auxiliary loss."""
    lr: float = 1e-3
    """Adam learning rate of the task model."""
    batch_size: int = 64
    """Task batch size."""
    aux_coef: float = 1.0
    """``λ``: weight of ``mean(1 − cos(h, t))``."""
    target: Target = "class"
    """``class`` (SAE-ception), ``complement``, ``example`` (per-example top-N), ``random`` (unit vectors)."""
    top_n: int | None = 25
    """Latents kept per class (or per example, for ``target="example"``)."""
    top_percent: float | None = None
    """Instead of ``top_n``: this percentage of the latents per class."""
    members: int = 1
    """SAEs per cycle: 1 is a single SAE; more make an ensemble (statistics over the concatenated dictionary)."""
    combine: Literal["bagging", "boosting"] = "bagging"
    """How an ensemble's members combine."""
    sae_steps: int = 2000
    """Optimizer steps of each cycle's SAE."""
    sae_lr: float = 1e-3
    """Learning rate of each cycle's SAE."""
    sae_batch_size: int = 256
    """Activation rows per SAE step."""
    skip_positions: int = 0
    """Per-token layers: the first positions of every sequence left out of the SAE, the targets and the auxiliary
    loss — a causal LM's attention-sink position 0 has a residual norm ~100× the others' and would swamp the SAE."""
    eval_batch_size: int = 256
    """Examples per forward when collecting activations and accuracy."""
    metric_sample_size: int = 2000
    """Examples the silhouette scores subsample (seeded)."""
    seed: int = 0
    """Seeds the task data order, the SAEs (cycle ``c``: ``seed + 1000·c``) and the random targets."""
    backend: str | None = None
    """Op backend of the SAE work (see :mod:`saefast.ops`)."""
    progress: bool = False
    """Progress bars (a live bar on a terminal, a plain line every 30 s in a log; see :mod:`saefast.progress`)."""

    def __post_init__(self) -> None:
        for name in ("cycles", "epochs", "finetune_epochs", "skip_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SharpenConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("batch_size", "members", "sae_steps", "sae_batch_size", "eval_batch_size", "metric_sample_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SharpenConfig.{name} must be a positive int, got {value!r}")
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.combine not in ("bagging", "boosting"):
            raise ValueError(f"unknown combine {self.combine!r}; choose 'bagging' or 'boosting'")
        if self.target != "random" and (self.top_n is None) == (self.top_percent is None):
            raise ValueError("set exactly one of top_n and top_percent")
        if self.target == "example" and self.top_n is None:
            raise ValueError("target='example' keeps each example's top_n latents: set top_n")
        if self.top_n is not None and (isinstance(self.top_n, bool) or not isinstance(self.top_n, int)
                                       or self.top_n < 1):
            raise ValueError(f"SharpenConfig.top_n must be a positive int, got {self.top_n!r}")
        if self.top_percent is not None and not 0 < self.top_percent <= 100:
            raise ValueError(f"SharpenConfig.top_percent must be in (0, 100], got {self.top_percent!r}")
        for name in ("lr", "sae_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SharpenConfig.{name} must be > 0")
        if not self.aux_coef >= 0:
            raise ValueError("SharpenConfig.aux_coef must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


RESUME_FREE = ("cycles", "progress")
""":class:`SharpenConfig` fields a resumed run may change: neither changes what a cycle computes (more ``cycles``
extends a finished run)."""

HISTORY_FILE = "history.json"
MODEL_FILE = "model.safetensors"
RNG_FILE = "rng.safetensors"


@dataclass
class _Layer:
    """Activations of the hooked layer over a split: ``[N, D]`` or ``[N, T, D]`` with the counted positions."""

    acts: torch.Tensor
    positions: torch.Tensor | None  # [N, T] bool (see Split.position_mask), or None for [N, D]

    def rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row per counted position: ``(x [n, D], labels [n], example [n])`` (a sequence's label on every token)."""
        if self.acts.dim() == 2:
            return self.acts, labels, torch.arange(labels.shape[0])
        example = torch.arange(labels.shape[0]).view(-1, 1).expand_as(self.positions)[self.positions]
        return self.acts[self.positions], labels[example], example


def _example_means(sums: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """``[N, W]`` per-example sums over their positions → means (``example [n]``: each position's example), fp32."""
    counts = torch.bincount(example, minlength=sums.shape[0]).clamp_min(1).to(sums.dtype)
    return (sums / counts.view(-1, 1)).float()


def _mean_cosine(layer: _Layer, table: torch.Tensor) -> float:
    """Mean ``cos(h, t)`` over the counted positions: how close the layer is to its targets."""
    return float(1 - cosine_loss(layer.acts, table, layer.positions))


class SAECeption:
    """The SAE-ception cycle on a classifier ``model``: logits ``[B, C]`` from ``model(inputs)`` (``model(**inputs)``
    for a dict of inputs).

    ``run()``: cycle 0 trains the task (``epochs``, cross-entropy) — the baseline; every cycle then collects the
    hooked layer's activations on the training split, trains a fresh SAE (or ensemble) on them, computes the class
    statistics and masks, and logs the test accuracy and the class structure of the SAE codes; cycles ``1..C``
    first fine-tune the model for ``finetune_epochs`` with ``cross-entropy + λ·mean(1 − cos(h, t))``, the targets
    ``t`` computed once at the start of the cycle from the previous cycle's SAE and masks on the training split
    (fixed during the cycle, aligned to the examples by index).

    A hooked output ``[B, T, D]`` (a transformer block) is handled per token: the SAE trains on the tokens the
    split's ``attention_mask`` counts (less the first ``skip_positions`` of each sequence), each labelled with its
    sequence's class; the auxiliary loss averages over those tokens; class-structure metrics use each example's
    mean code over its tokens.

    With ``out``: after every cycle ``out/cycle_<c>/sae`` (checkpoint), ``out/cycle_<c>/masks.safetensors``, the
    task model's ``state_dict`` ``out/cycle_<c>/model.safetensors`` and torch's global RNG state
    ``out/cycle_<c>/rng.safetensors`` are written atomically, then ``out/history.json``, last: a cycle counts once it
    is in the history. An ``out`` that already holds a run is refused unless ``resume=True``, which loads the history,
    every cycle's SAE and masks and the last cycle's model and RNG state, and continues with the next cycle — giving
    the uninterrupted run's results (bit for bit on CPU). Its settings must equal the saved ones (all but
    :data:`RESUME_FREE`), as must the data (a SHA-256 of the splits).

    Run from the main thread, a SIGINT or SIGTERM abandons the cycle under way (after the SAE's training step or the
    task's batch under way) and raises :class:`~saefast.interrupts.Interrupted`, saying which cycles are saved.
    """

    def __init__(self, model: nn.Module, sae: SAEConfig, train: Split | tuple, test: Split | tuple,
                 config: SharpenConfig | None = None, out: str | Path | None = None, log: Callable | None = None,
                 resume: bool = False, **options: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(sae, SAEConfig):
            raise TypeError(f"sae must be an SAEConfig, got {type(sae).__name__}")
        if config is None:
            config = SharpenConfig(**options)
        elif options:
            raise ValueError("pass either config=SharpenConfig(...) or keyword options, not both")
        self.model, self.sae_config, self.config = model, sae, config
        self.train_split, self.test_split = _as_split(train, "train"), _as_split(test, "test")
        layer = config.layer or getattr(model, "hook_layer", None)
        if not layer:
            raise ValueError("name the layer to sharpen: SharpenConfig(layer=...) (or give the model a hook_layer)")
        if layer not in dict(model.named_modules()):
            raise ValueError(f"model has no module {layer!r}; valid names: {abbreviate_names(module_names(model))}")
        self.layer = layer
        self.n_classes = int(max(self.train_split.labels.max(), self.test_split.labels.max())) + 1
        self.device = next(model.parameters()).device
        self.out = Path(out) if out is not None else None
        if resume and self.out is None:
            raise ValueError("resume=True continues the run saved in out: pass out=")
        self.resume = bool(resume)
        self._stop = StopRequest()  # run() shares the signal handlers' request
        self._data: str | None = None
        self.log = log
        self.history: list[dict[str, Any]] = []
        self.saes: list[SparseDictionary] = []
        self.masks: list[torch.Tensor] = []

    # --- pieces ------------------------------------------------------------------------------------------

    def _fit(self, epochs: int, cycle: int, targets: torch.Tensor | None) -> dict[str, float]:
        """Train the task model; with ``targets`` ([N, D] or [N, T, D] per training example) add the aux loss."""
        cfg, split = self.config, self.train_split
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter")
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + cycle)
        aux = AuxiliaryLoss(self.model, self.layer, cfg.aux_coef) if targets is not None else None
        # The epoch's sums stay on the device (read once per epoch, not twice per batch: each read is a sync).
        totals = {name: torch.zeros((), device=self.device) for name in ("task_loss", "aux_loss")}
        self.model.train()
        try:
            for _ in progress_bar(range(epochs), desc=f"cycle {cycle} task", unit="epoch", enabled=cfg.progress,
                                  leave=False):
                for total in totals.values():  # only the last epoch's sums are returned
                    total.zero_()
                for index in _chunks(len(split), cfg.batch_size, generator):
                    self._stop.check()  # a stop abandons the cycle: nothing of it is saved
                    logits = _forward(self.model, split.take(index), self.device)
                    loss = F.cross_entropy(logits, to_device(split.labels[index], self.device))
                    totals["task_loss"] += loss.detach().float() * index.numel()
                    if aux is not None:
                        positions = None
                        if aux.activation.dim() == 3:
                            positions = split.position_mask(index, aux.activation.shape[1], cfg.skip_positions)
                        extra = aux(to_device(targets[index], self.device), positions)
                        totals["aux_loss"] += extra.detach().float() * index.numel()
                        loss = loss + extra
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            if aux is not None:
                aux.remove()
        sums = torch.stack(list(totals.values())).tolist()  # one read
        return {name: value / len(split) for name, value in zip(totals, sums)}

    @torch.no_grad()
    def _accuracy(self, split: Split) -> float:
        self.model.eval()
        correct = 0
        for index in _chunks(len(split), self.config.eval_batch_size):
            logits = _forward(self.model, split.take(index), self.device)
            correct += int((logits.argmax(-1).cpu() == split.labels[index]).sum())
        return correct / len(split)

    @torch.no_grad()
    def _activations(self, split: Split) -> _Layer:
        self.model.eval()
        parts = []
        with AuxiliaryLoss(self.model, self.layer) as hook:
            for index in _chunks(len(split), self.config.eval_batch_size):
                _forward(self.model, split.take(index), self.device)
                parts.append(hook.activation.float().cpu())
        acts = torch.cat(parts)
        if acts.dim() not in (2, 3):
            raise ValueError(f"layer {self.layer!r} outputs {tuple(acts.shape[1:])} per example; sharpening needs "
                             f"[D] or [T, D]")
        positions = None
        if acts.dim() == 3:
            positions = split.position_mask(torch.arange(len(split)), acts.shape[1], self.config.skip_positions)
            empty = int((~positions.any(1)).sum())
            if empty:
                raise ValueError(f"{empty} example(s) have no counted position (attention_mask, skip_positions="
                                 f"{self.config.skip_positions}): give every sequence a token to sharpen")
        return _Layer(acts, positions)

    def _new_sae(self, cycle: int) -> SparseDictionary:
        cfg, seed = self.config, self.config.seed + 1000 * cycle
        if cfg.members == 1:
            sae = SAE(self.sae_config, seed=seed)
        else:
            sae = Ensemble(self.sae_config, cfg.members, cfg.combine, seed=seed)
        return sae.to(self.device)

    def _targets(self, layer: _Layer, cycle: int) -> torch.Tensor:
        """Fixed targets of every training example (per position for [N, T, D]) from the previous cycle's SAE."""
        cfg, labels = self.config, self.train_split.labels
        x, row_labels, _ = layer.rows(labels)
        if cfg.target == "random":
            rows = random_targets(x.shape[0], x.shape[1], seed=cfg.seed * 1009 + cycle)
        else:
            sae, masks = self.saes[-1], self.masks[-1]
            parts = []
            for index in _chunks(x.shape[0], 4096):
                xb, yb = x[index].to(self.device), row_labels[index].to(self.device)
                if cfg.target == "example":
                    parts.append(example_targets(sae, xb, cfg.top_n, backend=cfg.backend).cpu())
                else:
                    parts.append(targets(sae, xb, yb, masks, complement=cfg.target == "complement",
                                         backend=cfg.backend).cpu())
            rows = torch.cat(parts)
        if layer.acts.dim() == 2:
            return rows
        table = torch.zeros_like(layer.acts)
        table[layer.positions] = rows
        return table

    @torch.no_grad()
    def _pooled_codes(self, sae: SparseDictionary, layer: _Layer, labels: torch.Tensor) -> torch.Tensor:
        """Each example's mean code over its positions, ``[N, L]`` (index-add of the sparse slots, never N_tok × L)."""
        x, _, example = layer.rows(labels)
        N, L = labels.shape[0], sae.n_latents_total
        pooled = torch.zeros(N * L, dtype=torch.float64)
        with inference(sae):
            for index in _chunks(x.shape[0], 4096):
                codes = sae.encode(x[index].to(self.device), backend=self.config.backend)
                flat = (example[index].view(-1, 1, 1) * L + codes.global_indices().cpu()).reshape(-1)
                pooled.index_add_(0, flat, codes.values.reshape(-1).double().cpu())
        return _example_means(pooled.view(N, L), example)

    def _metrics(self, sae: SparseDictionary, layer: _Layer) -> dict[str, Any]:
        try:
            from ..eval.class_metrics import class_structure, davies_bouldin, silhouette
        except ImportError as err:
            raise ImportError("the per-cycle metrics need scikit-learn: pip install 'saefast[sharpen]'") from err

        labels = self.test_split.labels
        x, _, example = layer.rows(labels)
        quality = evaluate(sae, x.to(self.device))
        codes = self._pooled_codes(sae, layer, labels)
        structure = class_structure(codes, labels, sample_size=self.config.metric_sample_size, seed=self.config.seed)
        sums = torch.zeros(labels.shape[0], x.shape[1], dtype=torch.float64).index_add_(0, example, x.double())
        pooled_acts = _example_means(sums, example)
        return {
            "sae_explained_variance": quality["explained_variance"],
            "sae_l0": quality["l0"],
            "sae_dead_fraction": quality["dead_fraction"],
            **{key: value for key, value in structure.items() if key not in ("n", "classes")},
            "layer_silhouette": silhouette(pooled_acts, labels, sample_size=self.config.metric_sample_size,
                                           seed=self.config.seed),
            "layer_davies_bouldin": davies_bouldin(pooled_acts, labels),
        }

    def _data_sha256(self) -> str:
        """SHA-256 of both splits (every input tensor and the labels): a resumed run must see the same data."""
        digest = hashlib.sha256()
        for split in (self.train_split, self.test_split):
            fields = sorted(split.inputs.items()) if isinstance(split.inputs, Mapping) else [("inputs", split.inputs)]
            for name, tensor in [*fields, ("labels", split.labels)]:
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _report(self) -> dict[str, Any]:
        """What ``history.json`` holds besides the history: the settings and data a resumed run must match."""
        if self._data is None:
            self._data = self._data_sha256()
        return {"config": self.config.to_dict(), "sae": self.sae_config.to_dict(), "layer": self.layer,
                "data_sha256": self._data}

    def _save(self, cycle: int, sae: SparseDictionary, masks: torch.Tensor) -> None:
        """Write cycle ``cycle``: its SAE, masks, the model and the RNG state, then the history (last: the commit)."""
        if self.out is None:
            return
        directory = self.out / f"cycle_{cycle}"
        directory.mkdir(parents=True, exist_ok=True)
        sae.save(str(directory / "sae"))
        atomic_write_bytes(directory / "masks.safetensors", safetensors_bytes({"masks": masks.cpu().contiguous()}))
        # clone(): tied weights share storage, which safetensors refuses; load_state_dict restores both names.
        state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in self.model.state_dict().items()}
        atomic_write_bytes(directory / MODEL_FILE, safetensors_bytes(state))
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        atomic_write_bytes(directory / RNG_FILE, safetensors_bytes(rng))
        report = {**self._report(), "history": self.history}
        atomic_write_bytes(self.out / HISTORY_FILE, json.dumps(report, indent=2).encode())
        if cycle:  # only the last cycle's model is needed to resume (and it is the sharpened model)
            for name in (MODEL_FILE, RNG_FILE):
                (self.out / f"cycle_{cycle - 1}" / name).unlink(missing_ok=True)

    def _saved(self) -> str:
        """What an interruption leaves: the complete cycles in ``out``."""
        n = len(self.history)
        if self.out is None or not n:
            return ""
        return f"cycle 0 in {self.out}" if n == 1 else f"cycles 0..{n - 1} in {self.out}"

    # --- resuming ------------------------------------------------------------------------------------------

    def _start(self) -> int:
        """The first cycle to run: 0 for a new run (refusing an ``out`` that holds one), else the one after the
        saved cycles, which are loaded."""
        if self.out is None:
            return 0
        path = self.out / HISTORY_FILE
        if not self.resume:
            if path.is_file():
                raise ValueError(f"{self.out} already holds a sharpen run ({HISTORY_FILE}); continue it with "
                                 f"resume=True or choose another out")
            return 0
        if not path.is_file():
            raise ValueError(f"nothing to resume: {self.out} holds no completed sharpen cycle (no {HISTORY_FILE}); "
                             f"start the run without resume")
        try:
            saved = json.loads(path.read_text())
            history = saved["history"]
            if not isinstance(history, list) or [row["cycle"] for row in history] != list(range(len(history))) \
                    or not history:
                raise ValueError("its history is not the cycles 0, 1, ...")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot resume from {path}: {err}") from None
        differs = self._differences(saved)
        if differs:
            raise ValueError(f"cannot resume the sharpen run in {self.out}: it was started with other settings ("
                             + "; ".join(differs) + "); resume with the same ones or choose another out")
        saes, masks = [], []
        last = self.out / f"cycle_{len(history) - 1}"
        try:
            for cycle in range(len(history)):
                directory = self.out / f"cycle_{cycle}"
                saes.append(load(directory / "sae", map_location=self.device))
                mask = safetensors_load((directory / "masks.safetensors").read_bytes())["masks"]
                masks.append(mask.to(self.device) if self.config.target != "random" else mask)
            state = safetensors_load((last / MODEL_FILE).read_bytes())
            rng = safetensors_load((last / RNG_FILE).read_bytes())
        except (OSError, KeyError, SafetensorError) as err:
            raise ValueError(f"cannot resume the sharpen run in {self.out}: {err}") from None
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"cannot resume the sharpen run in {self.out}: its model state does not fit this "
                             f"model: {str(err).splitlines()[0]}") from None
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history, self.saes, self.masks = history, saes, masks
        return len(history)

    def _differences(self, saved: dict[str, Any]) -> list[str]:
        """``field: saved X, requested Y`` for every setting of the saved run this one changes."""
        now = json.loads(json.dumps(self._report()))  # JSON's view of both (tuples → lists)
        for name in RESUME_FREE:
            now["config"].pop(name, None)
        old = {key: saved.get(key, "<absent>") for key in now}
        if isinstance(old["config"], dict):
            old["config"] = {key: value for key, value in old["config"].items() if key not in RESUME_FREE}
        names = {"data_sha256": "data (SHA-256 of the splits)"}
        return [f"{names.get(name, name.removeprefix('config.'))}: saved {before!r}, requested {after!r}"
                for name, before, after in changed_fields(old, now)]

    # --- the cycle -------------------------------------------------------------------------------------------

    def _cycle(self, cycle: int, train_layer: _Layer | None) -> tuple[dict[str, Any], SparseDictionary,
                                                                      torch.Tensor, _Layer]:
        """One cycle: ``(its history record, SAE, masks, the training split's activations after it)``."""
        cfg = self.config
        if cycle == 0:
            losses = self._fit(cfg.epochs, cycle, None) if cfg.epochs else {"task_loss": float("nan")}
            losses["aux_loss"] = None
            cosines = {"target_cosine_start": None, "target_cosine_end": None}
        else:
            fixed = self._targets(train_layer, cycle)
            cosines = {"target_cosine_start": _mean_cosine(train_layer, fixed)}
            losses = self._fit(cfg.finetune_epochs, cycle, fixed)
        record: dict[str, Any] = {"cycle": cycle, **losses,
                                  "train_accuracy": self._accuracy(self.train_split),
                                  "test_accuracy": self._accuracy(self.test_split)}
        train_layer = self._activations(self.train_split)
        if cycle:
            cosines["target_cosine_end"] = _mean_cosine(train_layer, fixed)
        record.update(cosines)
        x, row_labels, _ = train_layer.rows(self.train_split.labels)
        sae = self._new_sae(cycle)
        train_sae(sae, _ShuffledRows(x, cfg.sae_batch_size, cfg.seed + cycle), steps=cfg.sae_steps,
                  lr=cfg.sae_lr, backend=cfg.backend, progress=cfg.progress, seed=cfg.seed + cycle,
                  log_every=cfg.sae_steps)
        self._stop.check()
        stats = class_stats(sae, ((x[i], row_labels[i]) for i in _chunks(x.shape[0], 4096)),
                            n_classes=self.n_classes, backend=cfg.backend)
        masks = (class_masks(stats, cfg.top_n, cfg.top_percent) if cfg.target != "random"
                 else torch.zeros(self.n_classes, sae.n_latents_total, dtype=torch.bool))
        record.update(self._metrics(sae, self._activations(self.test_split)))
        return record, sae, masks, train_layer

    def run(self) -> list[dict[str, Any]]:
        """Run the baseline and ``cycles`` sharpening cycles (after the saved ones, with ``resume``); returns the
        history, one dict per cycle. A SIGINT or SIGTERM abandons the cycle under way and raises
        :class:`~saefast.interrupts.Interrupted` saying which cycles are saved."""
        with deferred_interrupts() as request:
            self._stop = request
            try:
                start = self._start()
                train_layer = self._activations(self.train_split) if start else None
                for cycle in range(start, self.config.cycles + 1):
                    try:
                        record, sae, masks, train_layer = self._cycle(cycle, train_layer)
                    except Interrupted as stop:  # in the task's epochs or the SAE's training: the cycle is lost
                        raise stop.with_saved(self._saved()) from None
                    self.saes.append(sae)
                    self.masks.append(masks)
                    self.history.append(record)
                    self._save(cycle, sae, masks)
                    if self.log is not None:
                        self.log(record)
                    request.check(saved=self._saved())
            finally:
                self._stop = StopRequest()
        return self.history
