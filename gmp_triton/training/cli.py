"""Subcommands of ``gmp-triton`` (filled in by this package)."""


def add_parsers(subcommands) -> None:
    """Register this package's subcommands; each sets ``run`` to a function of ``args``."""
