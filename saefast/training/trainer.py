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

With ``parallel=`` (inside a torch.distributed process group, e.g. under ``torchrun``) the same loop runs on every
rank of a ``members × data`` mesh (:mod:`saefast.distributed`): each rank trains its member shard
(:mod:`.parallel`) on its share of every batch; gradients and token statistics are summed over the data group;
ranks agree every step on the batch size, stop signals and checkpoints; rank 0 shows the progress and the metrics
of the whole model; checkpoints are sharded (:mod:`saefast.models.sharded`) and resume on any world size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .. import distributed
from ..config import SAEConfig, TrainConfig
from ..devices import to_device
from ..distributed import LOCAL, Layout, TokenShards
from ..interrupts import Interrupted, Interval, StopRequest, deferred_interrupts
from ..models import SparseDictionary, sharded
from ..models.checkpoint import save_checkpoint
from ..progress import Progress, progress_bar
from ..validation import changed_fields, check_activations
from .bootstrap import resample
from .dead_count import DeadCountAhead
from .memory import reuse_freed_memory
from .optimizer import SAEAdam
from .parallel import gather_member_values, gather_members, member_indices, select_members, signature
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


def _described_model(description: dict[str, Any]) -> SparseDictionary:
    """A model (untrained) of the shape a checkpoint's description records: what its signature is computed from."""
    cls = SparseDictionary.class_of_kind(description["kind"])
    if cls is None:
        raise ValueError(f"the checkpoint holds an unknown kind of model {description['kind']!r}")
    return cls.from_checkpoint_fields(SAEConfig.from_dict(description["config"]), description)


def train(
    model: SparseDictionary,
    batches: Iterable,
    steps: int | None = None,
    lr: float | None = None,
    config: TrainConfig | None = None,
    parallel: str | None = None,
    member_shards: int | None = None,
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

    ``parallel`` (``"members"``, ``"data"`` or ``"members,data"``), called on every rank of a torch.distributed
    process group with the same full ``model`` and settings: ``"members"`` trains each rank's share of the members
    (bagging members, boosting chains) — the model single-process training gives, bit for bit; ``"data"`` has each
    rank read its own share of every global batch (``store.batches(N, shard=(rank, P))``), sums the gradients and
    the statistics that steer training over the ranks and trains the model a single process trains on batches of
    ``N``, to float rounding (BatchTopK: the batch top-k is per rank); ``"members,data"``: a mesh of
    ``member_shards`` × ``P / member_shards``. Afterwards ``model`` holds every trained member on every rank; with
    ``checkpoint_dir``, checkpoints are sharded per member shard, rank 0 writes the final model there, and
    ``resume`` works on any number of ranks. See ``docs/guides/scaling.md``.
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
    if parallel is None:
        return _Trainer(model, config).run(BatchStream(batches))
    return _train_distributed(model, batches, config, parallel, member_shards)


def _train_distributed(model: SparseDictionary, batches: Iterable, config: TrainConfig, parallel: str,
                       member_shards: int | None) -> list[dict[str, Any]]:
    """:func:`train` with ``parallel``: agree on the settings, build the mesh, train each rank's member shard, put
    the members back together and write the final model (rank 0)."""
    _, split_data = distributed.parse_parallel(parallel)
    if not distributed.active():
        distributed.make_layout(parallel, model.W_enc.device)  # raises: says how to start a process group
    settings = {"parallel": parallel, "member_shards": member_shards, "model": signature(model),
                "train": config.resume_fields(), "checkpoint_dir": config.checkpoint_dir, "resume": config.resume,
                "backend": config.backend, "log_every": config.log_every, "grad_clip": config.grad_clip}
    mismatched = distributed.settings_differences(settings)
    if mismatched:
        raise distributed.DistributedError("the ranks were given different settings: " + "; ".join(mismatched))
    error = None
    try:
        if split_data and config.bootstrap:
            raise ValueError("bootstrap=True resamples each member's whole batch; with parallel='data' a rank holds "
                             "only its share: train bootstrap bagging with parallel='members'")
        shards, _ = distributed.mesh_shape(parallel, distributed.world_size(), member_shards)
        member_indices(model, shards, 0)  # J not divisible by P, a single SAE, one boosting chain
    except (ValueError, TypeError) as err:
        error = err
    distributed.agree_on_errors(error)
    layout = distributed.make_layout(parallel, model.W_enc.device, member_shards)
    part = select_members(model, layout.member_shards, layout.member_rank)
    trainer = _Trainer(part, config, layout=layout, full=model)
    history = trainer.run(BatchStream(batches))
    gather_members(model, part, layout)
    model.eval()
    if config.checkpoint_dir and trainer.finished:
        if distributed.is_main():  # the whole model, where sf.load and the single-process tools look for it
            save_checkpoint(config.checkpoint_dir, model, None, trainer.train_state(len(model.stages()), 0, 0))
        distributed.barrier()
    return history


class _Trainer:
    """The loop of one process. Distributed (``layout``): ``model`` is this rank's member shard of ``full``."""

    def __init__(self, model: SparseDictionary, config: TrainConfig, layout: Layout | None = None,
                 full: SparseDictionary | None = None):
        self.model = model
        self.full = model if full is None else full
        self.layout = layout
        self.tokens: TokenShards = TokenShards(layout.data_group) if layout is not None else LOCAL
        self.main = distributed.is_main()
        self.finished = False  # set when this run took the last step (not when it resumed a finished one)
        self.stream_consumed = 0
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
        if not cfg.resume or sharded.newest(cfg.checkpoint_dir) is None:
            return
        layout = self.layout or Layout(1, 1, 0, 0)
        indices = member_indices(self.full, layout.member_shards, layout.member_rank)
        description = sharded.describe(cfg.checkpoint_dir)
        changed = differences(signature(_described_model(description)), signature(self.full))
        if changed:
            raise ValueError(f"the checkpoint in {cfg.checkpoint_dir} is for a different model: "
                             + "; ".join(changed))
        state = description.get("train_state")
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
        _, weights, optimizer_state = sharded.load_members(cfg.checkpoint_dir, indices, self.device)
        self.model.load_state_dict(weights)
        if state:
            self.start_stage, self.start_step = state["stage"], state["step"]
            self.skip_batches = state["batches_consumed"]
            self.start_tokens = state.get("stage_tokens", 0)
            self.history = list(state.get("history", []))
        self.resume_optimizer = optimizer_state

    def train_state(self, stage: int, step: int, tokens: int) -> dict[str, Any]:
        """What a checkpoint records to resume at ``(stage, step)``, ``tokens`` into the stage."""
        return {"stage": stage, "step": step, "stage_tokens": tokens, "batches_consumed": self.stream_consumed,
                "bootstrap": self.config.bootstrap, "seed": self.config.seed, "train": self.config.resume_fields(),
                "stages": len(self.model.stages()), "history": self.history}

    def _save(self, optimizer: torch.optim.Optimizer, stage: int, step: int, tokens: int) -> None:
        state = self.train_state(stage, step, tokens)
        root, layout = self.config.checkpoint_dir, self.layout
        if layout is None:
            save_checkpoint(root, self.model, optimizer.state_dict(), state)
        else:
            # Each member shard is written by one rank of its data group; the manifest that publishes the
            # generation comes only once every shard is durable, so a rank killed mid-write leaves the last one.
            tag = sharded.generation_tag(stage, step)
            if layout.writes_shard:
                sharded.write_shard(root, tag, layout.member_rank, self.model, optimizer.state_dict())
            distributed.barrier()
            if self.main:
                shards = [member_indices(self.full, layout.member_shards, s) for s in range(layout.member_shards)]
                sharded.write_manifest(root, tag, self.full, shards, state,
                               {"member_shards": layout.member_shards, "data_shards": layout.data_shards})
            distributed.barrier()
        self.interval.reset()

    def run(self, stream: BatchStream) -> list[dict[str, Any]]:
        cfg, model = self.config, self.model
        torch.manual_seed(cfg.seed)
        self._maybe_resume()
        if self.layout is not None and cfg.checkpoint_dir:
            distributed.barrier()  # every rank has read the checkpoint it resumes from
            if self.main:
                sharded.remove_unpublished(cfg.checkpoint_dir)
        stages = model.stages()
        if self.start_stage >= len(stages):  # a finished run: nothing to train, no batch to read
            model.eval()
            return self.history
        for _ in range(self.skip_batches):
            stream.next()
        self.stream_consumed = stream.consumed
        total = cfg.steps * len(stages)
        bar = progress_bar(total=total, initial=self.start_stage * cfg.steps + self.start_step,
                           enabled=cfg.progress and self.main,
                           desc=f"train {type(model).__name__.lower()}", unit="step", dynamic_ncols=True)
        model.train()
        try:
            with deferred_interrupts() as self.stop:
                for stage in range(self.start_stage, len(stages)):
                    first = self.start_step if stage == self.start_stage else 0
                    if not self._run_stage(stream, stage, stages[stage], first, bar):
                        break
                else:
                    self.finished = True
        finally:
            bar.close()
            model.eval()
        return self.history

    def _run_stage(self, stream: BatchStream, stage: int, members: slice, first: int, bar: Progress) -> bool:
        cfg, model = self.config, self.model
        # A fresh Adam per stage: members outside the stage get exactly zero gradients and zero moments,
        # hence exactly zero updates.
        # SAEAdam: torch.optim.Adam's update and state dict, one fused pass per parameter (projection and
        # renormalisation of the decoder rows included).
        optimizer = SAEAdam(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, backend=self.backend)
        if self.resume_optimizer is not None and stage == self.start_stage and first > 0:
            optimizer.load_state_dict(self.resume_optimizer)
        tokens = self.start_tokens if stage == self.start_stage and first > 0 else 0
        b_dec_ready = model.b_dec_ready(members)  # read once per stage, not every step (a device sync)
        dead_count = DeadCountAhead(model, members)
        for step in range(first, cfg.steps):
            try:
                raw, exhausted = stream.next(), None
            except DataExhausted as err:
                raw, exhausted = None, err
            n_tokens = self._global_tokens(raw, exhausted)
            if n_tokens is None:
                warnings.warn(f"training stopped early at stage {stage}, step {step} of {cfg.steps}: "
                              f"{exhausted or 'another rank ran out of batches'}. The model has only those steps, and "
                              f"the learning rate never reached its decay; give a re-iterable source (a list, "
                              f"store.batches(..., epochs=None)) or fewer steps", stacklevel=3)
                return False
            self.stream_consumed = stream.consumed
            x = _prepare(raw, model, where=f"batch {stream.consumed - 1}")
            x_in = model.stage_input(x, stage, self.backend)
            if cfg.bootstrap:  # [N, J, D]: member j reads x[bootstrap_indices(N, seed_j, step, cfg.seed)]
                x_in = resample(model, x_in, members, step, cfg.seed)
            if not b_dec_ready:
                model.init_b_dec_(x_in, members, self.tokens)
                b_dec_ready = True
            max_dead = dead_count.take()
            dead_count.issue(n_tokens)
            terms, _ = training_step(model, optimizer, x_in, members, lr=cfg.lr_at(step), backend=self.backend,
                                     grad_clip=cfg.grad_clip, max_dead=max_dead,
                                     autocast_dtype=torch.bfloat16 if self.autocast else None,
                                     tokens=self.tokens, n_tokens=n_tokens)
            tokens += n_tokens
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last:
                record = self._log(stage, step, tokens, optimizer, terms, members)
                bar.set_postfix(loss=f"{record['loss']:.4f}", fvu=f"{record['fvu']:.4f}", l0=f"{record['l0']:.1f}")
            bar.update(1)
            every = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
            due, stop = self._due_and_stop()
            if cfg.checkpoint_dir and (last or every or due or stop):
                if last:
                    self._save(optimizer, stage + 1, 0, 0)
                else:
                    self._save(optimizer, stage, step + 1, tokens)
            if stop:
                self._stopped(stage, step + 1, stop)
        optimizer.zero_grad(set_to_none=True)  # the stage's gradients are not needed any more
        return True

    def _global_tokens(self, batch: Any, exhausted: BaseException | None) -> int | None:
        """The global batch's token count, or None when any rank has run out of batches (all ranks stop together).
        One process: this batch's rows."""
        local = 0 if batch is None else int(batch.shape[0])
        if self.layout is None:
            return None if exhausted is not None else local
        everyone = distributed.exchange([local, int(exhausted is not None)])
        if any(flag for _, flag in everyone):
            return None
        # ranks of one data group share out the batch; the member shards each read all of it
        return sum(n for n, _ in everyone) // self.layout.member_shards

    def _due_and_stop(self) -> tuple[bool, int]:
        """Whether a time-based checkpoint is due, and the signal to stop on (0: none), read once per step.
        Distributed, both are decided the same on every rank, and only from the exchanged values: a signal that
        reached any rank stops them all after this step, each saving its shard first, and a signal that arrives
        after the exchange waits for the next step (a rank deciding alone would leave the others at a barrier)."""
        due, signum = self.interval.due(), int(self.stop.signum or 0)
        if self.layout is None:
            return due, signum
        everyone = distributed.exchange([int(due), signum])
        return any(flag for flag, _ in everyone), max(s for _, s in everyone)

    def _stopped(self, stage: int, steps_done: int, signum: int) -> None:
        """Stop on the signal that arrived during the step just finished (its checkpoint is written)."""
        cfg = self.config
        where = f"step {steps_done} of {cfg.steps}" + (f" in stage {stage + 1} of {len(self.model.stages())}"
                                                      if len(self.model.stages()) > 1 else "")
        saved = f"checkpoint at {where} saved in {cfg.checkpoint_dir}" if cfg.checkpoint_dir else ""
        raise Interrupted(signum, saved)

    def _log(self, stage: int, step: int, tokens: int, optimizer, terms, members: slice) -> dict[str, Any]:
        """Append (and return) one history record; its device values reach the host in one transfer. Distributed:
        the metrics of the whole model and the global batch (the ranks' token shares summed, the member shards'
        members gathered), the same record on every rank."""
        dead = self.model.dead_latents(members)
        if self.layout is not None:
            return self._log_distributed(stage, step, tokens, optimizer, terms, dead)
        J = terms.fvu.numel()
        scalars = torch.stack([terms.loss.detach().float(), terms.aux.float().mean(), terms.sparsity.float().mean(),
                               dead.float().mean()])
        values = torch.cat([scalars, terms.fvu.float().reshape(-1), terms.l0.float().reshape(-1)]).tolist()
        (loss, aux, sparsity, dead_fraction), fvu, l0 = values[:4], values[4:4 + J], values[4 + J:]
        return self._record(stage, step, tokens, optimizer, loss, fvu, l0, aux, sparsity, dead_fraction)

    def _log_distributed(self, stage: int, step: int, tokens: int, optimizer, terms, dead: torch.Tensor,
                         ) -> dict[str, Any]:
        per_member = self.tokens.sum(torch.stack([t.float().reshape(-1) for t in
                                                  (terms.fvu, terms.l0, terms.aux, terms.sparsity)]))
        per_member = gather_member_values(per_member, self.layout)
        dead_fraction = gather_member_values(dead.float().reshape(-1, dead.shape[-1]).mean(-1), self.layout)
        fvu, l0, aux, sparsity = per_member.tolist()
        loss = sum(fvu) + self.model.cfg.aux_coef * sum(aux) + sum(sparsity)
        return self._record(stage, step, tokens, optimizer, loss, fvu, l0, sum(aux) / len(aux),
                            sum(sparsity) / len(sparsity), float(dead_fraction.mean()))

    def _record(self, stage: int, step: int, tokens: int, optimizer, loss: float, fvu: list[float],
                l0: list[float], aux: float, sparsity: float, dead_fraction: float) -> dict[str, Any]:
        J = len(fvu)
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
