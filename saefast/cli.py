"""The ``saefast`` command line. Every subcommand has ``--help``; bad input exits with status 2 and one line."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps is not None:
        config.steps = args.steps
    if args.members is not None:
        config.members = args.members
    print("saefast demo — SYNTHETIC data (sparse combinations of a known dictionary); real activations come "
          "with the harvester", flush=True)
    report = run_demo(config, args.out, progress=not args.no_progress)
    print(format_table(report["rows"]))
    print(f"wrote {args.out}/results.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``saefast`` command."""
    parser = argparse.ArgumentParser(prog="saefast", description="Train and apply ensembles of sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a single SAE, a bagging and a boosting ensemble and compare them")
    demo.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    demo.add_argument("--quick", action="store_true", help="a small, fast run")
    demo.add_argument("--steps", type=int, help="optimizer steps per model (per stage for boosting)")
    demo.add_argument("--members", type=int, help="ensemble size")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn bad input into a one-line error with exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, CheckpointError, FileNotFoundError) as err:
        print(f"saefast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
