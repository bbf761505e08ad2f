"""Run ``saefast <argv>`` as one rank of a torchrun job, with test-only faults (used by test_distributed.py).

* ``SAEFAST_TEST_RANK1_ARGS``: JSON ``{"--flag": "value"}`` — rank 1 runs with these values instead (a rank that
  cannot open the store, mismatched settings).
* ``SAEFAST_TEST_KILL_AT``: rank 1 writes part of its ``N``-th checkpoint shard and then SIGKILLs itself.
"""

import json
import os
import signal
import sys

import torch

torch.set_num_threads(1)

from saefast.cli import main  # noqa: E402
from saefast.models import sharded  # noqa: E402

argv = sys.argv[1:]
rank = int(os.environ["RANK"])
if rank == 1 and os.environ.get("SAEFAST_TEST_RANK1_ARGS"):
    for flag, value in json.loads(os.environ["SAEFAST_TEST_RANK1_ARGS"]).items():
        argv[argv.index(flag) + 1] = value
if rank == 1 and os.environ.get("SAEFAST_TEST_KILL_AT"):
    kill_at, written = int(os.environ["SAEFAST_TEST_KILL_AT"]), []
    write_shard = sharded.write_shard

    def dying_write_shard(root, tag, shard, model, optimizer_state):
        written.append(tag)
        if len(written) == kill_at:  # half a shard on disk, then the process is gone
            path = sharded.shard_path(root, tag, shard)
            path.mkdir(parents=True, exist_ok=True)
            (path / "model.0000000000000000.safetensors").write_bytes(b"\0" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        return write_shard(root, tag, shard, model, optimizer_state)

    sharded.write_shard = dying_write_shard
sys.exit(main(argv))
