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
    try:
        return args.run(args)
    except OSError as error:
        # A file or folder that cannot be read or written (an --out inside a file, a full
        # disk, no permission): one line that names it, as for any other bad input.
        where = f" {error.filename!r}" if error.filename else ""
        print(
            f"gmp-triton {args.command}: error: cannot use{where}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
