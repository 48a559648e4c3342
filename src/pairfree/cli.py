"""The ``pairfree`` command. Each subcommand lives in ``pairfree.commands.<name>`` and exposes
``register(subparsers)``; heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pairfree import __version__
from pairfree.errors import PairfreeError
from pairfree.logs import show_library_logs

COMMANDS = (
    "demo",
    "encode",
    "train",
    "caption",
    "evaluate",
    "compare",
    "run",
    "report",
    "serve",
    "offset",
    "import_checkpoint",
    "synthesize",
    "world",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pairfree",
        description=(
            "Train image captioners without human-paired image-caption data, caption images "
            "with them, and evaluate the captions. Run `pairfree COMMAND --help` for details."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pairfree {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pairfree.commands.{name}").register(sub)
    add_verbosity(parser)
    return parser


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on ``parser`` and every subcommand below it, so they
    work before or after the subcommand's name."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log warnings and errors only: no progress bars or lines (`caption`: "
        "no table either); results are still printed",
    )
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also debug messages")  # fmt: skip
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                add_verbosity(child)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    show_library_logs()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional at them)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    show_library_logs(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else
                      logging.INFO)  # fmt: skip
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except PairfreeError as err:
        print(f"pairfree {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pairfree ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # the file system said no (permissions, a full disk): one line
        print(f"pairfree {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
