"""Command-line entry point: ``cryorecon <command> ...``.

Each command lives in ``cryorecon.commands.<name>`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (a callable taking the parsed args and returning an
exit code). Errors derived from :class:`cryorecon.errors.CryoreconError` print one line to
stderr and exit with their own code; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import CryoreconError

COMMANDS = [
    "simulate",
    "backproject",
    "fsc",
    "postprocess",
    "align",
    "info",
    "reconstruct",
    "report",
    "demo",
    "export",
    "symmetry_align",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryorecon",
        description="Ab-initio cryo-EM 3D reconstruction (Punjani, Brubaker & Fleet 2017).",
    )
    parser.add_argument("--version", action="version", version=f"cryorecon {__version__}")
    _add_verbosity(parser, default=False)
    # -q/-v also work after the command name; SUPPRESS keeps the top-level value when absent.
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser = sub.add_parser

    def add_parser_with_common(*a, **kw):
        kw.setdefault("parents", [common])
        return add_parser(*a, **kw)

    sub.add_parser = add_parser_with_common
    for name in COMMANDS:
        importlib.import_module(f"cryorecon.commands.{name}").register(sub)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only errors; no progress bars"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug messages"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import progress

    progress.configure(quiet=args.quiet, verbose=args.verbose)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except CryoreconError as exc:
        print(f"cryorecon {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        from .runstate import SignalStop

        SignalStop.interrupt_delivered()
        print(f"cryorecon {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """The reader of stdout went away (``cryorecon fsc ... | head -1``): quiet exit, as Unix
    tools do (128 + SIGPIPE), with stdout pointed at /dev/null so the exit flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
