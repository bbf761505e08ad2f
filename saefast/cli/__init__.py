"""The ``saefast`` command line: ``harvest``, ``train``, ``eval``, ``compare``, ``convert``, ``browse``, ``demo``,
``sharpen``, ``bench``.

Every subcommand has ``--help`` and sensible defaults; bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import os
import shlex
import sys

from ..distributed import DistributedError, describe, is_main, launched_by_torchrun
from ..interrupts import Interrupted
from .commands import DTYPES, KINDS, TRAIN_DEFAULTS
from .parser import build_parser
from .runs import CLIError

__all__ = ["DTYPES", "KINDS", "TRAIN_DEFAULTS", "CLIError", "build_parser", "main"]


RESUMABLE = {"train": "--resume", "sharpen": "--resume", "harvest": None}
"""Commands that continue an interrupted run, and the flag that asks for it (None: re-running resumes)."""


def resume_command(command: str, argv: list[str]) -> str:
    """The shell command that continues an interrupted ``saefast <argv>``: the same arguments, plus the command's
    resume flag where it needs one (under torchrun, the torchrun command with as many processes)."""
    flag = RESUMABLE.get(command)
    resumed = [*argv, *([flag] if flag and flag not in argv else [])]
    if launched_by_torchrun():  # the same launch: every rank must come back
        ranks, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
        where = ["--standalone"] if ranks == local else [f"--nnodes={int(ranks) // int(local)}", "..."]
        return shlex.join(["torchrun", *where, f"--nproc_per_node={local}", "-m", "saefast", *resumed])
    return shlex.join(["saefast", *resumed])


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a one-line error with exit status 2, and a SIGINT or
    SIGTERM into one line saying what was saved and how to resume, with exit status 130 or 143."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (printed, one line)
        return done.code if isinstance(done.code, int) else 2
    args.argv = argv
    try:
        return args.run(args)
    except Interrupted as stop:
        hint = f"; resume with: {resume_command(args.command, argv)}" if stop.saved and args.command in RESUMABLE \
            else ""
        if is_main():  # under torchrun every rank stops; one says so
            print(f"saefast {args.command}: {stop}{hint}", file=sys.stderr, flush=True)
        return stop.exit_status
    except (ValueError, TypeError, FileNotFoundError, KeyError, OSError, ImportError,
            DistributedError) as err:  # incl. CLIError
        message = describe(err)
        if is_main():  # a DistributedError names every failing rank: rank 0 reports it for all
            print(f"saefast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
