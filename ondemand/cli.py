"""The `ondemand` command.  Each command module exposes `register(subparsers)` and sets
`func(args) -> int` on its parser; heavy imports (torch) happen inside `func`, never here, so
`ondemand serve` stays torch-free."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ondemand.errors import OndemandError

# Command modules, in help order.  Add yours here.
COMMAND_MODULES = [
    "ondemand.commands.engine_cmds",  # infer, make-test-model
    "ondemand.commands.daemon_cmds",  # serve, submit, status, load, unload
    "ondemand.commands.cost_cmd",  # cost
    "ondemand.commands.prewarm_cmd",  # prewarm
    "ondemand.commands.token_cmd",  # token create
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ondemand",
        description="Scale-to-zero speech emotion recognition (emotion2vec+) daemon and tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except OndemandError as e:
        print(f"ondemand: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
