"""saefast.progress: a live tqdm bar on a terminal; in a log (standard error not a terminal) a few plain lines, no
``\\r`` redraws; nothing when disabled. End to end: ``saefast train`` with standard error to a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import types

import pytest
import torch
from tqdm import tqdm

import saefast.progress as progress
from saefast.data.store import write_store
from saefast.progress import INTERVAL, INTERVAL_ENV, PlainProgress, progress_bar, progress_interval


class FakeClock:
    """``time.monotonic`` that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=fake))  # this module's clock only
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    return fake


def test_not_a_terminal_writes_a_plain_line_every_interval_and_at_close(clock, capsys):
    bar = progress_bar(total=1000, desc="train sae", unit="step")  # capsys: standard error is not a terminal
    assert isinstance(bar, PlainProgress)
    with bar:
        for step in range(1000):
            clock.now += 0.1  # 100 s in all: a line at 30, 60 and 90 s, and one at the end
            if step % 50 == 0:
                bar.set_postfix(loss=f"{1 / (step + 1):.4f}", fvu="0.3000")
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert lines[0].startswith("train sae: 300/1000 step (30%), 10 step/s, 1m10s left, loss=")
    assert lines[0].endswith("fvu=0.3000")
    assert lines[-1].startswith("train sae: 1000/1000 step (100%), 10 step/s, 1m40s elapsed, loss=0.0011")


def test_interval_comes_from_the_environment(monkeypatch, clock, capsys):
    monkeypatch.setenv(INTERVAL_ENV, "5")
    assert progress_interval() == 5.0
    bar = progress_bar(total=100, desc="x")
    for _ in range(100):
        clock.now += 1
        bar.update()
    bar.close()
    bar.close()  # closing twice writes once
    assert len(capsys.readouterr().err.splitlines()) == 20 + 1
    monkeypatch.setenv(INTERVAL_ENV, "soon")
    with pytest.warns(UserWarning, match=INTERVAL_ENV):
        assert progress_interval() == INTERVAL


def test_iterates_with_unit_scale_and_unknown_total(clock):
    out = io.StringIO()
    items = []
    for item in progress_bar((i for i in range(3)), desc="harvest", unit="tok", unit_scale=True, file=out):
        items.append(item)
    assert items == [0, 1, 2]
    assert out.getvalue().startswith("harvest: 3 tok") and out.getvalue().count("\n") == 1
    scaled = progress_bar(total=2_000_000, unit="tok", unit_scale=True, interval=0, file=out)
    scaled.update(1_500_000)
    assert out.getvalue().splitlines()[-1].startswith("1.50M/2.00M tok (75%)")


def test_leave_false_says_nothing_for_a_short_task(clock):
    out = io.StringIO()
    assert list(progress_bar(range(4), desc="cycle 0 task", leave=False, file=out)) == [0, 1, 2, 3]
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(total=10, desc="train sae", unit="step", dynamic_ncols=True)
    try:
        assert isinstance(bar, tqdm)
        bar.update(3)
        bar.set_postfix(loss="0.1")
    finally:
        bar.close()
    assert "train sae" in terminal.getvalue()


@pytest.mark.parametrize("tty", [False, True])
def test_disabled_prints_nothing(monkeypatch, clock, capsys, tty):
    if tty:
        monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv(INTERVAL_ENV, "0")
    bar = progress_bar(total=10, desc="quiet", enabled=False)
    assert not isinstance(bar, tqdm)
    with bar:
        for _ in range(10):
            clock.now += 100
            bar.update()
    assert list(progress_bar(range(3), enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    if tty:
        assert sys.stderr.getvalue() == ""


def test_saefast_train_writes_a_few_plain_lines_to_a_log(tmp_path):
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    write_store(tmp_path / "acts", x, shard_tokens=1024, dtype=torch.float32)
    env = {**os.environ, INTERVAL_ENV: "1"}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "saefast", "train", "--data", str(tmp_path / "acts"), "--latents",
                             "32", "--k", "4", "--steps", "300", "--batch-size", "64", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # (tqdm wrote hundreds of redraws here)
    lines = result.stderr.splitlines()
    progress_lines = [line for line in lines if line.startswith("train sae: ")]
    assert progress_lines and progress_lines[-1].startswith("train sae: 300/300 step (100%)"), result.stderr
    assert len(progress_lines) <= elapsed / 1 + 2, result.stderr  # at most one a second, and the last
    assert len(lines) - len(progress_lines) <= 3, result.stderr
