"""One rank of ``sf.train(..., parallel=...)`` in a process group made by the caller (used by test_distributed.py).

``python -m torch.distributed.run --nproc_per_node=2 api_worker.py KIND ACTIVATION PARALLEL OUT``: trains the
reference in one process first (before the group exists), then the same model with ``parallel``, each rank on its
share of the batches; rank 0 writes both models and whether every rank ended with the same weights to ``OUT``.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

torch.set_num_threads(1)

import saefast as sf  # noqa: E402

kind, activation, parallel, out = sys.argv[1:5]
extra = {"relu": {"l1_coef": 1e-3}, "jumprelu": {"l0_coef": 1e-3}}.get(activation, {})
cfg = sf.SAEConfig(d_in=24, n_latents=40, k=4, activation=activation, dead_after_tokens=200,
                   b_dec_init="geometric_median", **extra)
generator = torch.Generator().manual_seed(0)
mixing = torch.randn(24, 24, generator=generator)
batches = [torch.randn(96, 24, generator=generator) @ mixing for _ in range(5)]
options = {"steps": 10, "progress": False, "log_every": 5, "bootstrap": kind == "bootstrap", "grad_clip": 1.0}


def make():
    if kind == "sae":
        return sf.SAE(cfg, seed=3)
    if kind == "boosting":
        return sf.Ensemble.boosting(cfg, members=2, seed=3, chains=2)
    return sf.Ensemble.bagging(cfg, members=4, seed=3)


reference = make()
sf.train(reference, batches, **options)
dist.init_process_group("gloo")
rank, ranks = dist.get_rank(), dist.get_world_size()
model = make()
if "data" in parallel:
    data_shards = ranks if parallel == "data" else ranks // 2
    part, parts = rank % data_shards, data_shards
    batches = [b[b.shape[0] * part // parts:b.shape[0] * (part + 1) // parts] for b in batches]
history = sf.train(model, batches, parallel=parallel, member_shards=2 if parallel == "members,data" else None,
                   **options)
flat = torch.cat([t.double().reshape(-1) for t in model.state_dict().values()])
everyone = [torch.empty_like(flat) for _ in range(ranks)]
dist.all_gather(everyone, flat)
if rank == 0:
    agree = all(torch.equal(everyone[0], other) for other in everyone[1:])
    tensors = {f"reference.{n}": t.contiguous() for n, t in reference.state_dict().items()}
    tensors.update({f"parallel.{n}": t.contiguous() for n, t in model.state_dict().items()})
    tensors["ranks_agree"] = torch.tensor([int(agree)])
    tensors["history_fvu"] = torch.tensor([history[-1]["fvu"]])
    save_file(tensors, out)
dist.destroy_process_group()
