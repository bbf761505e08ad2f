"""saefast train as a user runs it: a SIGINT, SIGTERM or kill -9 loses at most one interval and ``--resume`` gives
the uninterrupted run's model bit for bit; ``--resume`` means what it says; every flag is checked before any compute;
the files are readable by others (the umask); ``--version``. (Harvest and sharpen: tests/cli/test_interrupts.py.)"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from helpers import state_equal

import saefast as sf
from saefast.cli import main
from saefast.data.store import write_store
from saefast.version import __version__

SLOW_RUN = ["--latents", "256", "--k", "8", "--steps", "150", "--batch-size", "256", "--lr", "3e-3",
            "--checkpoint-every", "5", "--no-progress"]
"""Long enough (a few seconds) that a signal sent after the first checkpoint always arrives mid-run."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(48, 64, generator=g)
    path = tmp_path_factory.mktemp("store") / "acts"
    write_store(path, (torch.randn(4096, 48, generator=g).relu() ** 2) @ basis, shard_tokens=1024)
    return path


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(["train", "--data", str(store), "--out", str(run), *SLOW_RUN]) == 0
    return sf.load(run), json.loads((run / "history.json").read_text())


def _start(store, run) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saefast", "train", "--data", str(store), "--out", str(run),
                             *SLOW_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(process: subprocess.Popen, run, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "config.json").is_file():
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_prints_the_resume_command_and_resume_gives_the_same_model(store, uninterrupted, tmp_path,
                                                                                 signum):
    full, full_history = uninterrupted
    run = tmp_path / "run"
    process = _start(store, run)
    _wait_for_checkpoint(process, run)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err  # one line, no traceback
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"saefast train: stopped by {name}; checkpoint at step ")
    assert f"of 150 saved in {run}; resume with: saefast train --data {store} --out {run}" in lines[0]
    assert lines[0].endswith("--no-progress --resume")
    step = json.loads((run / "config.json").read_text())["train_state"]["step"]
    assert 5 <= step < 150 and f"checkpoint at step {step} of 150" in lines[0]  # the step the signal let finish
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"

    resume = lines[0].split("resume with: ", 1)[1].split()[1:]  # run exactly what it says
    assert main(resume) == 0
    state_equal(sf.load(run), full)
    assert json.loads((run / "history.json").read_text()) == full_history
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_kill_9_loses_at_most_one_interval(store, uninterrupted, tmp_path):
    full, _ = uninterrupted
    run = tmp_path / "run"
    process = _start(store, run)
    _wait_for_checkpoint(process, run)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    step = json.loads((run / "config.json").read_text())["train_state"]["step"]
    assert step % 5 == 0 and 5 <= step < 150  # the last periodic checkpoint survives, whole
    assert main(["train", "--data", str(store), "--out", str(run), *SLOW_RUN, "--resume"]) == 0
    state_equal(sf.load(run), full)


def _train(store, run, *extra):
    return main(["train", "--data", str(store), "--out", str(run), "--latents", "32", "--k", "4", "--steps", "6",
                 "--batch-size", "256", "--no-progress", *extra])


def test_resume_means_what_it_says(store, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(store, tmp_path / "misspelt", "--resume") == 2
    assert "--resume: there is no checkpoint to resume in" in capsys.readouterr().err
    assert not (tmp_path / "misspelt").exists()  # and nothing was trained

    assert _train(store, run) == 0
    record = (run / "run.json").read_bytes()
    assert _train(store, run, "--resume", "--steps", "9") == 2  # never records steps it did not train
    assert "finished all its 6 steps; it cannot be extended to steps=9" in capsys.readouterr().err
    assert (run / "run.json").read_bytes() == record
    assert _train(store, run, "--resume", "--lr", "0.01") == 2
    assert "lr: 0.001 in the checkpoint, 0.01 now" in capsys.readouterr().err
    assert _train(store, run, "--resume", "--latents", "40") == 2
    assert "config.n_latents: 32 in the checkpoint, 40 now" in capsys.readouterr().err
    assert _train(store, run, "--resume", "--data-seed", "3") == 2
    assert "data_seed: 0 in the run, 3 now" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--latents", "0"], "--latents must be a whole number >= 1, got 0"),
        (["--steps", "-3"], "--steps must be a whole number >= 1, got -3"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--checkpoint-minutes", "-1"], "--checkpoint-minutes must be >= 0"),
        (["--members", "3"], "--members applies to --kind bagging or boosting"),
        (["--kind", "bagging", "--activation", "relu", "--k", "4"], "--k applies to --activation topk or batchtopk"),
        (["--device", "cuda"], "device 'cuda' is not available"),
        (["--device", "cuda:7"], "device 'cuda:7' is not available"),
        (["--device", "gpu"], "unknown device 'gpu'"),
    ],
)
def test_every_flag_is_checked_before_any_compute(store, tmp_path, extra, message):
    if "cuda" in " ".join(extra) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "saefast", "train", "--data", str(store), "--out", str(run),
                             "--steps", "2", "--no-progress", *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not run.exists()


def test_device_errors_are_one_line_in_every_command(store, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for args in (["eval", "--model", str(tmp_path), "--data", str(store)], ["harvest", "--out", str(tmp_path / "h")],
                 ["bench", "--preset", "tiny"]):
        result = subprocess.run([sys.executable, "-m", "saefast", *args, "--device", "cuda"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"saefast {args[0]}: error: device 'cuda' is not available: this torch ({torch.__version__}) was built "
            "without CUDA; use --device cpu or install a CUDA build of torch"]


def test_out_must_be_new_empty_or_a_run_of_ours(store, tmp_path, capsys):
    assert _train(store, store) == 2
    assert "is the activation store itself" in capsys.readouterr().err
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert _train(store, foreign) == 2
    assert "is not empty and holds no saefast run" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["cat.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(store, empty) == 0


def test_files_are_written_with_the_users_umask(store, tmp_path):
    previous = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert _train(store, run) == 0
        written = write_store(tmp_path / "store", torch.randn(10, 3))
    finally:
        os.umask(previous)
    files = [path for path in [*run.iterdir(), *written.path.iterdir()] if path.is_file()]
    assert files and {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o644}


def test_write_store_keeps_the_input_dtype_unless_told():
    x = torch.randn(20, 4, dtype=torch.float32) * 1e-3 + 1  # bf16 would round these
    for dtype, expected in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                            (torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16)):
        with tempfile.TemporaryDirectory() as tmp:
            store = write_store(tmp, x.to(dtype))
            assert store.dtype == expected
            assert torch.equal(store.read(0, 20, dtype=None), x.to(dtype).to(expected))
    with tempfile.TemporaryDirectory() as tmp:
        assert write_store(tmp, x, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_version():
    result = subprocess.run([sys.executable, "-m", "saefast", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"saefast {__version__}"
