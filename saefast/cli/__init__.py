"""The ``saefast`` command line: ``harvest``, ``train``, ``eval``, ``demo``, ``sharpen``, ``bench``.

Every subcommand has ``--help`` and sensible defaults; bad input exits with status 2 and a one-line error.
"""

from __future__ import annotations

import sys

from .commands import DTYPES, KINDS, TRAIN_DEFAULTS, CLIError
from .parser import build_parser

__all__ = ["DTYPES", "KINDS", "TRAIN_DEFAULTS", "CLIError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a one-line error with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, OSError, ImportError) as err:  # incl. CLIError
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"saefast {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
