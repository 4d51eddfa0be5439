"""The ``gmp-triton`` command: each subcommand's parser lives with the code it runs."""

import argparse
import sys

from .benchmarking import cli as benchmarking_cli
from .training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmp-triton",
        description="Fused global-max-pool + L2-norm embedding head: train, evaluate, benchmark.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.add_parsers(subcommands)
    benchmarking_cli.add_parsers(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
