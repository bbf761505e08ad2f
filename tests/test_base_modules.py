"""The bottom-layer helpers the robustness of every command rests on: ``validation.changed_fields`` (naming what a
resume changed), ``devices.check_device`` (a one-line error for a device this machine lacks), ``interrupts``
(deferred signals, the periodic-save interval) and ``files.current_umask``."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from saefast.devices import check_device
from saefast.files import atomic_write_bytes, current_umask
from saefast.interrupts import Interrupted, Interval, deferred_interrupts
from saefast.validation import changed_fields


def test_changed_fields_names_nested_fields_and_both_values():
    old = {"steps": 300, "config": {"k": 32, "d_in": 576}, "gone": 1}
    new = {"steps": 350, "config": {"k": 32, "d_in": 512}, "added": 2}
    assert changed_fields(old, new) == [("steps", 300, 350), ("config.d_in", 576, 512), ("gone", 1, "<absent>"),
                                         ("added", "<absent>", 2)]
    assert changed_fields(old, dict(old)) == []


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' is not available"):
            check_device("cuda:1")
    else:
        with pytest.raises(ValueError, match="is not available: this machine has"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_deferred_interrupts_record_the_first_signal_and_a_second_one_stops_at_once():
    with deferred_interrupts() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.signum == signal.SIGTERM
        with deferred_interrupts() as inner:  # nested blocks share the request
            assert inner is request
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Interrupted, match="stopped by SIGTERM; saved it") as stop:
            request.check(saved="saved it")
        assert stop.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_interval():
    assert not Interval(0).due() and not Interval(None).due()
    interval = Interval(1e-6)
    time.sleep(0.01)
    assert interval.due()
    interval.reset()
    assert Interval(10).due() is False
    with pytest.raises(ValueError, match=">= 0 minutes"):
        Interval(-1)


def test_current_umask_and_the_mode_of_atomic_writes(tmp_path):
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_bytes(tmp_path / "f", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
