"""AuxK's dead-latent count on the host one step ahead, so that a training step never waits for the GPU."""

from __future__ import annotations

import torch

from ..models import SparseDictionary


class DeadCountAhead:
    """The host-side bound on the dead-latent count that :meth:`SparseDictionary.training_terms` takes as
    ``max_dead``, without draining the device queue.

    At the start of step ``t`` (its batch of ``N_t`` tokens known, nothing of it queued yet) the model's
    :meth:`~SparseDictionary.next_dead_count_bound` for step ``t + 1`` is queued and copied to a pinned host buffer,
    and an event marks the copy. Step ``t + 1`` reads it after waiting on that event: the device has to get through
    the start of step ``t``, not through everything queued. The first step of a run or stage has no bound from a
    previous step: it reads the exact count (one sync, inside the model)."""

    def __init__(self, model: SparseDictionary, members: slice):
        self.model, self.members = model, members
        self.active = model.uses_auxk
        self.cuda = model.W_enc.device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.issued = False

    def take(self) -> int | None:
        """The bound issued by the previous step, or None (none issued: the model reads the exact count)."""
        if not self.issued:
            return None
        return self._read_host_copy()

    def _read_host_copy(self) -> int:
        """The host buffer's value once the copy into it has landed (CUDA: waits on its event, not the queue)."""
        if self.event is not None:
            self.event.synchronize()
        return int(self.host)

    def issue(self, n_tokens: int) -> None:
        """Queue the bound for the step after this one (this step's ``n_tokens``) and its copy to the host.

        Not when ``n_tokens ≥ dead_after_tokens``: every latent would count, and AuxK past the fused kernel's
        limit would then encode all ``M`` latents a second time; the next step reads the exact count instead."""
        self.issued = False
        if not self.active or n_tokens >= self.model.cfg.dead_after_tokens:
            return
        bound = self.model.next_dead_count_bound(self.members, n_tokens)
        self.host.copy_(bound, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()
        self.issued = True
