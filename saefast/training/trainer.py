"""Training loop for SAEs and ensembles: Adam with warm-up and decay, fp32 master weights, bf16 autocast on CUDA.

Bagging ensembles train all members in one stacked forward/backward per step (each on its own loss, so
the update of each member equals training it alone). Boosting ensembles train stage after stage: stage
``j`` reads ``r_j = x − Σ_{i<j} x̂_i`` computed by the frozen earlier stages, with a fresh Adam whose
state for every other member stays zero, so their weights do not move at all. A multi-chain boosting
ensemble (``chains=C``) trains stage ``j`` of all ``C`` chains in one stacked step, chain ``c`` on its own
residual ``r_j^c`` (an ``[N, C, D]`` stage input).

With ``bootstrap=True`` (bootstrap bagging) the step of member ``j`` reads its own resample ``x[idx_j]``,
``idx_j = bootstrap_indices(N, seed_j, t, seed)`` (:mod:`.bootstrap`) with ``seed_j`` its init seed, ``t`` the
0-based optimizer step and ``seed`` :attr:`TrainConfig.seed`: an ``[N, J, D]`` input, one row set per member.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..devices import to_device
from ..interrupts import Interval, StopRequest, deferred_interrupts
from ..models import SparseDictionary
from ..models.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from ..progress import Progress, progress_bar
from ..validation import changed_fields, check_activations
from .bootstrap import resample
from .dead_count import DeadCountAhead
from .memory import reuse_freed_memory
from .step import training_step


class DataExhausted(RuntimeError):
    """A one-shot iterator of batches ran out before the requested number of steps."""


class BatchStream:
    """Endless batches from ``source``: re-iterates a re-iterable source (epochs), stops a one-shot iterator.

    Batches may be tensors ``[N, D]`` or tuples whose first element is one (e.g. ``(x, labels)``).
    """

    def __init__(self, source: Iterable):
        if isinstance(source, torch.Tensor):
            raise TypeError("batches must be an iterable of [N, D] tensors, not one tensor (wrap it in a list)")
        self.source = source
        self.iterator: Iterator = iter(source)
        self.one_shot = self.iterator is source
        self.consumed = 0

    def next(self) -> torch.Tensor:
        """The next batch (tensor part only)."""
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.one_shot:
                raise DataExhausted(f"the batch iterator ran out after {self.consumed} batches") from None
            self.iterator = iter(self.source)
            try:
                batch = next(self.iterator)
            except StopIteration:
                if self.consumed:  # a source that counts its own epochs (e.g. store.batches(epochs=2)) is done
                    raise DataExhausted(f"the batch source ran out after {self.consumed} batches") from None
                raise ValueError("batches is empty") from None
        self.consumed += 1
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        return batch


def _prepare(x: torch.Tensor, model: SparseDictionary, where: str) -> torch.Tensor:
    """Validate a training batch and move it to the model's device in fp32 (the master-weight dtype)."""
    check_activations(x, model.cfg.d_in, name=where)
    return to_device(x, model.W_enc.device, torch.float32)


def differences(saved: dict[str, Any], now: dict[str, Any], where: str = "the checkpoint") -> list[str]:
    """``"name: <saved> in <where>, <now> now"`` for every field (nested ones as ``a.b``) that differs."""
    return [f"{name}: {old!r} in {where}, {new!r} now" for name, old, new in changed_fields(saved, now)]


def _signature(model: SparseDictionary) -> dict[str, Any]:
    """What must match for a checkpoint to resume into ``model`` (the member seeds included: they fix the
    bootstrap resamples)."""
    return {"kind": type(model).__name__, "config": model.cfg.to_dict(),
            "members": getattr(model, "members", 1), "combine": getattr(model, "combine", None),
            "chains": getattr(model, "chains", 1), "seeds": model.member_seeds()}


def train(
    model: SparseDictionary,
    batches: Iterable,
    steps: int | None = None,
    lr: float | None = None,
    config: TrainConfig | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` (an :class:`SAE` or :class:`Ensemble`) on ``batches`` of activations ``[N, d_in]``.

    Loss per member: ``fvu + aux_coef·AuxK + sparsity`` (see ``SAEConfig``). ``steps`` counts optimizer
    steps (per stage for boosting); any other :class:`TrainConfig` field can be passed by name, or a whole
    ``config``. ``b_dec`` is initialised from the first batch a stage sees (its own residual for boosting,
    its own resample with ``bootstrap=True``). Returns the history: one dict of metrics every ``log_every``
    steps and at the end of each stage. The model is left in eval mode.

    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_minutes`` (and ``checkpoint_every`` steps)
    and at the end. Run from the main thread, a SIGINT (Ctrl-C) or SIGTERM lets the step under way finish, writes a
    checkpoint (with ``checkpoint_dir``) and raises :class:`saefast.interrupts.Interrupted` (a
    ``KeyboardInterrupt``); ``resume=True`` continues from it, giving the uninterrupted run's weights.
    """
    if config is None:
        if steps is not None:
            options["steps"] = steps
        if lr is not None:
            options["lr"] = lr
        config = TrainConfig(**options)
    elif steps is not None or lr is not None or options:
        raise ValueError("pass either config=TrainConfig(...) or keyword options, not both")
    if not isinstance(model, SparseDictionary):
        raise TypeError(f"model must be an SAE or Ensemble, got {type(model).__name__}")
    if getattr(model, "decode_only", False):
        raise ValueError("a decode-only SAE (boosting as_sae) cannot be trained")
    if config.bootstrap and getattr(model, "combine", None) == "boosting":
        raise ValueError("bootstrap=True applies to single SAEs and bagging ensembles: a boosting stage reads the "
                         "residual of the earlier stages, not a resample of the batch")
    return _Trainer(model, config).run(BatchStream(batches))


class _Trainer:
    def __init__(self, model: SparseDictionary, config: TrainConfig):
        self.model = model
        self.config = config
        self.device = model.W_enc.device
        self.autocast = config.autocast and self.device.type == "cuda"
        # The backend is decided once, for the whole run.
        self.backend = model.resolve_backend(config.backend, self.device)
        self.history: list[dict[str, Any]] = []
        self.start_stage, self.start_step, self.skip_batches, self.start_tokens = 0, 0, 0, 0
        self.resume_optimizer: dict[str, Any] | None = None
        self.interval = Interval(config.checkpoint_minutes if config.checkpoint_dir else 0)
        self.stop = StopRequest()
        if self.device.type == "cpu":
            reuse_freed_memory()  # every step re-allocates its large temporaries: keep them paged in

    def _maybe_resume(self) -> None:
        cfg = self.config
        if not (cfg.resume and (Path(cfg.checkpoint_dir) / CONFIG_FILE).is_file()):
            return
        saved, optimizer_state, state = load_checkpoint(cfg.checkpoint_dir, map_location=self.device)
        changed = differences(_signature(saved), _signature(self.model))
        if changed:
            raise ValueError(f"the checkpoint in {cfg.checkpoint_dir} is for a different model: "
                             + "; ".join(changed))
        if state:
            # Checkpoints before the train settings were recorded hold only these two.
            saved_train = state.get("train") or {"bootstrap": bool(state.get("bootstrap", False)),
                                                 "seed": state.get("seed")}
            now = {key: value for key, value in cfg.resume_fields().items() if key in saved_train}
            finished = state["stage"] >= len(self.model.stages())
            if finished and saved_train.get("steps", cfg.steps) != cfg.steps:
                raise ValueError(
                    f"the run in {cfg.checkpoint_dir} finished all its {saved_train['steps']} steps; it cannot be "
                    f"extended to steps={cfg.steps}, because the learning-rate schedule (warm-up and decay) of "
                    f"the steps it took depends on steps: start a new run with steps={cfg.steps} instead")
            changed = differences(saved_train, now)
            if changed:
                raise ValueError(f"the checkpoint in {cfg.checkpoint_dir} was trained with other settings: "
                                 + "; ".join(changed) + "; resume with the checkpoint's settings")
        self.model.load_state_dict(saved.state_dict())
        if state:
            self.start_stage, self.start_step = state["stage"], state["step"]
            self.skip_batches = state["batches_consumed"]
            self.start_tokens = state.get("stage_tokens", 0)
            self.history = list(state.get("history", []))
        self.resume_optimizer = optimizer_state

    def _save(self, optimizer: torch.optim.Optimizer, stage: int, step: int, tokens: int, stream: BatchStream) -> None:
        state = {"stage": stage, "step": step, "stage_tokens": tokens, "batches_consumed": stream.consumed,
                 "bootstrap": self.config.bootstrap, "seed": self.config.seed, "train": self.config.resume_fields(),
                 "stages": len(self.model.stages()), "history": self.history}
        save_checkpoint(self.config.checkpoint_dir, self.model, optimizer.state_dict(), state)
        self.interval.reset()

    def run(self, stream: BatchStream) -> list[dict[str, Any]]:
        cfg, model = self.config, self.model
        torch.manual_seed(cfg.seed)
        self._maybe_resume()
        stages = model.stages()
        if self.start_stage >= len(stages):  # a finished run: nothing to train, no batch to read
            model.eval()
            return self.history
        for _ in range(self.skip_batches):
            stream.next()
        stages = model.stages()
        total = cfg.steps * len(stages)
        bar = progress_bar(total=total, initial=self.start_stage * cfg.steps + self.start_step, enabled=cfg.progress,
                           desc=f"train {type(model).__name__.lower()}", unit="step", dynamic_ncols=True)
        model.train()
        try:
            with deferred_interrupts() as self.stop:
                for stage in range(self.start_stage, len(stages)):
                    first = self.start_step if stage == self.start_stage else 0
                    if not self._run_stage(stream, stage, stages[stage], first, bar):
                        break
        finally:
            bar.close()
            model.eval()
        return self.history

    def _run_stage(self, stream: BatchStream, stage: int, members: slice, first: int, bar: Progress) -> bool:
        cfg, model = self.config, self.model
        # A fresh Adam per stage: members outside the stage get exactly zero gradients and zero moments,
        # hence exactly zero updates.
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        if self.resume_optimizer is not None and stage == self.start_stage and first > 0:
            optimizer.load_state_dict(self.resume_optimizer)
        tokens = self.start_tokens if stage == self.start_stage and first > 0 else 0
        b_dec_ready = model.b_dec_ready(members)  # read once per stage, not every step (a device sync)
        dead_count = DeadCountAhead(model, members)
        for step in range(first, cfg.steps):
            try:
                raw = stream.next()
            except DataExhausted as err:
                warnings.warn(f"training stopped early at stage {stage}, step {step} of {cfg.steps}: {err}. The model "
                              f"has only those steps, and the learning rate never reached its decay; give a "
                              f"re-iterable source (a list, store.batches(..., epochs=None)) or fewer steps",
                              stacklevel=3)
                return False
            x = _prepare(raw, model, where=f"batch {stream.consumed - 1}")
            x_in = model.stage_input(x, stage, self.backend)
            if cfg.bootstrap:  # [N, J, D]: member j reads x[bootstrap_indices(N, seed_j, step, cfg.seed)]
                x_in = resample(model, x_in, members, step, cfg.seed)
            if not b_dec_ready:
                model.init_b_dec_(x_in, members)
                b_dec_ready = True
            max_dead = dead_count.take()
            dead_count.issue(x.shape[0])
            terms, _ = training_step(model, optimizer, x_in, members, lr=cfg.lr_at(step), backend=self.backend,
                                     grad_clip=cfg.grad_clip, max_dead=max_dead,
                                     autocast_dtype=torch.bfloat16 if self.autocast else None)
            tokens += x.shape[0]
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last:
                record = self._log(stage, step, tokens, optimizer, terms, members)
                bar.set_postfix(loss=f"{record['loss']:.4f}", fvu=f"{record['fvu']:.4f}", l0=f"{record['l0']:.1f}")
            bar.update(1)
            every = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            if cfg.checkpoint_dir and (last or every or self.interval.due() or self.stop.requested):
                if last:
                    self._save(optimizer, stage + 1, 0, 0, stream)
                else:
                    self._save(optimizer, stage, step + 1, tokens, stream)
            if self.stop.requested:
                self._stopped(stage, step + 1)
        optimizer.zero_grad(set_to_none=True)  # the stage's gradients are not needed any more
        return True

    def _stopped(self, stage: int, steps_done: int) -> None:
        """Stop on the signal that arrived during the step just finished (its checkpoint is written)."""
        cfg = self.config
        where = f"step {steps_done} of {cfg.steps}" + (f" in stage {stage + 1} of {len(self.model.stages())}"
                                                      if len(self.model.stages()) > 1 else "")
        saved = f"checkpoint at {where} saved in {cfg.checkpoint_dir}" if cfg.checkpoint_dir else ""
        self.stop.check(saved=saved)

    def _log(self, stage: int, step: int, tokens: int, optimizer, terms, members: slice) -> dict[str, Any]:
        """Append (and return) one history record; its device values reach the host in one transfer."""
        dead = self.model.dead_latents(members)
        J = terms.fvu.numel()
        scalars = torch.stack([terms.loss.detach().float(), terms.aux.float().mean(), terms.sparsity.float().mean(),
                               dead.float().mean()])
        values = torch.cat([scalars, terms.fvu.float().reshape(-1), terms.l0.float().reshape(-1)]).tolist()
        (loss, aux, sparsity, dead_fraction), fvu, l0 = values[:4], values[4:4 + J], values[4 + J:]
        record = {
            "stage": stage,
            "step": step + 1,
            "tokens": tokens,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": loss,
            "fvu": sum(fvu) / J,
            "fvu_per_member": fvu,
            "aux": aux,
            "sparsity": sparsity,
            "l0": sum(l0) / J,
            "l0_per_member": l0,
            "dead_fraction": dead_fraction,
        }
        self.history.append(record)
        return record
