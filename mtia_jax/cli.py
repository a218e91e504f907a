"""The ``mtia-jax`` command line.

Subcommands live in the ``COMMANDS`` table (name -> :class:`Command`); add one
with :func:`register_command`, and :func:`main` dispatches through the table.

    mtia-jax chips                    # the chip catalogue as a table
    mtia-jax chips --sources mtia450  # every field of one chip with its source
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Command", "COMMANDS", "register_command", "build_parser", "main"]

PROG = "mtia-jax"


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure(parser)`` adds its arguments, ``run(args)``
    does the work and returns the exit code."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    *,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Add (or replace) subcommand ``name``."""
    COMMANDS[name] = Command(help=help, configure=configure, run=run)


class CommandError(Exception):
    """A user error a subcommand reports as ``mtia-jax: error: ...`` (exit 2)."""


# -- chips -----------------------------------------------------------------


def _configure_chips(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sources",
        metavar="NAME",
        help="print every field of chip NAME with the source of each number",
    )


def _run_chips(args: argparse.Namespace) -> int:
    from mtia_jax import chips

    if args.sources is None:
        print(chips.summary_table())
        try:
            print(f"default chip: {chips.default_name()} (set {chips.ENV_VAR} to change)")
        except ValueError as err:
            print(f"default chip: invalid {chips.ENV_VAR}: {err}")
        return 0
    try:
        spec = chips.get(args.sources)
    except ValueError as err:
        raise CommandError(str(err)) from None
    rows = spec.describe_rows()
    field_w = max(len(r[0]) for r in rows)
    value_w = max(len(r[1]) for r in rows)
    print(f"{spec.name}: {spec.generation} ({spec.vendor})")
    print(f"{'field'.ljust(field_w)}  {'value'.ljust(value_w)}  source")
    print(f"{'-' * field_w}  {'-' * value_w}  ------")
    for field, value, source in rows[3:]:  # name/generation/vendor are in the heading
        print(f"{field.ljust(field_w)}  {value.ljust(value_w)}  {source}".rstrip())
    return 0


register_command(
    "chips",
    help="list the chip catalogue (or one chip's sources)",
    configure=_configure_chips,
    run=_run_chips,
)


# -- entry point -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="JAX compiler and runtime for a software model of Meta's MTIA accelerators.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.configure(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except CommandError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, as Unix tools do.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
