"""Never lose a run: real SIGINT and SIGKILL sent to ``saefast harvest`` and ``saefast sharpen`` subprocesses — the
exit status, the one-line message saying what was saved and how to resume (no traceback), and a re-run (``--resume``
for sharpen) that finishes with the uninterrupted run's results.

No timing luck: the child is ``saefast.cli.main`` with a test-only gate that, at a fixed point (the forward pass
after the first harvest shard; the start of sharpen's cycle 1 task training), writes a marker file and waits for the
signal; the test sends it once the marker exists. The re-runs are the plain ``python -m saefast``. (In-process
interrupts: tests/data/test_harvest.py, tests/sharpen/test_runner.py.)"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import save_tiny_local_llama

from saefast.cli import main
from saefast.data.store import ActivationStore

TIMEOUT = 180  # seconds: generous, for a loaded machine

CHILD = """
import sys, time
from pathlib import Path

from saefast import interrupts
from saefast.cli import main

marker = Path(sys.argv[1])


def wait_for_the_signal():
    marker.write_text("waiting")
    deadline = time.monotonic() + {timeout}
    while time.monotonic() < deadline:
        if interrupts._active is not None and interrupts._active.requested:
            return
        time.sleep(0.01)
    raise SystemExit("the test sent no signal")

{gate}
sys.exit(main(sys.argv[2:]))
"""

HARVEST_GATE = """
from saefast.data.hooks import Capture
from saefast.data.store import StoreWriter

append, forward, shards = StoreWriter.append, Capture.run, []


def counted_append(self, *args, **kwargs):
    append(self, *args, **kwargs)
    shards.append(1)


def gated_forward(self, *args, **kwargs):
    if len(shards) == 1 and not marker.exists():  # the batch after the first shard: rows pending, none saved
        wait_for_the_signal()
    return forward(self, *args, **kwargs)


StoreWriter.append, Capture.run = counted_append, gated_forward
"""

SHARPEN_GATE = """
from saefast.sharpen.runner import SAECeption

fit = SAECeption._fit


def gated_fit(self, epochs, cycle, targets):
    if cycle == 1:  # cycle 0 is saved; cycle 1 is under way
        wait_for_the_signal()
    return fit(self, epochs, cycle, targets)


SAECeption._fit = gated_fit
"""


def start_gated(tmp_path, gate: str, args: list[str]) -> subprocess.Popen:
    """``saefast <args>`` in a child that stops at ``gate`` until a signal arrives; returns once it waits there."""
    marker = tmp_path / "waiting"
    marker.unlink(missing_ok=True)
    code = CHILD.format(gate=gate, timeout=TIMEOUT)
    child = subprocess.Popen([sys.executable, "-c", code, str(marker), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"the child exited ({child.returncode}) before its gate:\n{out}\n{err}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the child never reached its gate")
        time.sleep(0.02)
    return child


def stop(child: subprocess.Popen, signum: int) -> tuple[int, str, str]:
    child.send_signal(signum)
    out, err = child.communicate(timeout=TIMEOUT)
    return child.returncode, out, err


def saefast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saefast", *args], capture_output=True, text=True, timeout=TIMEOUT)


# ------------------------------------------------------------------------------------------------------
# saefast harvest
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harvest_setup(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer saved as a local model, a text file, and the store of an
    uninterrupted ``saefast harvest`` (in this process: the same code as the command)."""
    root = tmp_path_factory.mktemp("harvest")
    save_tiny_local_llama(root)

    def args(out) -> list[str]:  # 120 kept tokens a batch (4 windows of 32, less BOS and position 1): 5 a shard
        return ["harvest", "--model", str(root / "model"), "--text", str(root / "text.txt"), "--tokens", "3000",
                "--context", "32", "--batch-size", "4", "--shard-tokens", "500", "--dtype", "float32",
                "--no-progress", "--out", str(out)]

    assert main(args(root / "uninterrupted")) == 0
    return args, ActivationStore(root / "uninterrupted")


def assert_same_store(path, reference: ActivationStore) -> ActivationStore:
    store = ActivationStore(path)
    n = reference.n_tokens
    assert store.complete and store.n_tokens == n
    assert torch.equal(store.read(0, n, dtype=None), reference.read(0, n, dtype=None))
    assert torch.equal(store.read_extra("token_ids", 0, n), reference.read_extra("token_ids", 0, n))
    assert store.metadata == reference.metadata and store.state == reference.state
    return store


def manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_harvest_sigint_keeps_its_shards_says_how_to_resume_and_the_rerun_gives_the_same_store(tmp_path,
                                                                                                harvest_setup):
    args, reference = harvest_setup
    out = tmp_path / "acts"
    status, _, err = stop(start_gated(tmp_path, HARVEST_GATE, args(out)), signal.SIGINT)
    assert status == 130, err
    # the batch under way finished; the first shard (600) stays, the 120 rows pending since are harvested again
    assert [shard["tokens"] for shard in manifest(out)["shards"]] == [600]
    assert err.strip().splitlines() == [f"saefast harvest: stopped by SIGINT; 600 of 3,000 tokens in {out} (the 120 "
                                        f"harvested since the last shard come again on resume); "
                                        f"resume with: {shlex.join(['saefast', *args(out)])}"]

    again = saefast(*args(out))
    assert again.returncode == 0, again.stderr
    assert f"resuming the harvest in {out} at 600 of 3,000 tokens" in again.stderr
    assert "Traceback" not in again.stderr
    assert_same_store(out, reference)
    assert manifest(out)["shards"] == manifest(reference.path)["shards"]  # file for file, hash for hash


def test_harvest_sigkill_loses_at_most_the_pending_rows_and_the_rerun_gives_the_same_store(tmp_path, harvest_setup):
    args, reference = harvest_setup
    out = tmp_path / "acts"
    status, _, err = stop(start_gated(tmp_path, HARVEST_GATE, args(out)), signal.SIGKILL)
    assert status == -signal.SIGKILL and "saefast harvest:" not in err
    assert manifest(out)["tokens"] == 600 and not manifest(out)["complete"]  # the first shard survived

    again = saefast(*args(out))
    assert again.returncode == 0, again.stderr
    assert f"resuming the harvest in {out} at 600 of 3,000 tokens" in again.stderr
    assert_same_store(out, reference)
    assert manifest(out)["shards"] == manifest(reference.path)["shards"]  # file for file, hash for hash


# ------------------------------------------------------------------------------------------------------
# saefast sharpen
# ------------------------------------------------------------------------------------------------------


def test_sharpen_sigint_abandons_the_cycle_and_resume_gives_the_uninterrupted_results(tmp_path, capsys):
    pytest.importorskip("sklearn")
    settings = ["--cycles", "2", "--epochs", "1", "--finetune-epochs", "1", "--sae-steps", "5", "--no-progress"]
    assert main(["sharpen", "--out", str(tmp_path / "uninterrupted"), *settings]) == 0
    reference = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())

    out = tmp_path / "run"
    args = ["sharpen", "--out", str(out), *settings]
    status, printed, err = stop(start_gated(tmp_path, SHARPEN_GATE, args), signal.SIGINT)
    assert status == 130, err
    assert err.strip().splitlines() == [f"saefast sharpen: stopped by SIGINT; cycle 0 in {out}; "
                                        f"resume with: {shlex.join(['saefast', *args, '--resume'])}"]
    assert "cycle 0: test accuracy" in printed and "cycle 1:" not in printed
    assert len(json.loads((out / "history.json").read_text())["history"]) == 1
    assert not (out / "cycle_1").exists() and not (out / "results.json").exists()

    capsys.readouterr()
    assert main(args) == 2  # a run is there: continuing it must be asked for
    assert "pass --resume" in capsys.readouterr().err
    assert main(["sharpen", "--out", str(tmp_path / "nothing"), "--resume", *settings]) == 2
    assert "holds no completed sharpen cycle" in capsys.readouterr().err

    again = saefast(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"resuming the sharpen run in {out}" in again.stdout and "Traceback" not in again.stderr
    assert "cycle 0:" not in again.stdout and "cycle 2: test accuracy" in again.stdout
    assert json.loads((out / "results.json").read_text())["history"] == reference["history"]
