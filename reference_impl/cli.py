"""The ``membench`` command line.

Each subcommand lives in the module that does the work; that module offers
``configure(parser)`` and ``main(args) -> int``. Modules keep heavy imports
inside their functions so ``membench --help`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from reference_impl.errors import MembenchError

COMMANDS = {
    "dataset": ("reference_impl.datagen", "build a synthetic clinic"),
    "serve": ("reference_impl.server", "serve the clinic API"),
    "ai-stub": ("reference_impl.aistub", "serve a local stand-in of the AI vision API"),
    "run": ("benchmarks.runner", "run one benchmark scenario against a fresh server"),
    "notebooks": ("benchmarks.notebooks", "execute the notebooks and write a report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="membench",
        description="Naive and optimized clinic API patterns, measured under load.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.configure(command)
        command.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return int(args._module.main(args) or 0)
    except MembenchError as exc:
        print(f"membench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("membench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
