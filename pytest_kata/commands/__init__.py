"""CLI subcommands: one module each, discovered by :mod:`pytest_kata.cli`."""
