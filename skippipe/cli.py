"""The ``skippipe`` command line: one subcommand per module in ``skippipe.commands``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``. User mistakes raise
:class:`~skippipe.errors.UserError` and end here as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from skippipe.errors import RunFailed, UserError, VerificationFailed

COMMANDS = {
    "train": "train a model (launcher=inprocess, local or ray)",
    "plan": "allocate nodes and route microbatches; compare the four methods",
    "simulate": "simulate a plan file on a topology and cost model",
    "verify": "check a run's ledger and checkpoints, or compare two runs",
    "eval": "validation loss with the full model and with stages dropped",
    "plot": "draw a run's loss curves, Gantt charts and coverage",
    "join": "add a node to a run training on a Ray cluster",
    "export": "write a finished run's model as a Hugging Face checkpoint",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line and exit 2, like every other user error."""

    def error(self, message: str):  # noqa: D401
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="skippipe", description="SkipPipe: partial and reordered pipeline training")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"skippipe.commands.{name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The arguments, with options anywhere: ``plan CFG --json key=v`` as ``plan CFG key=v --json``
    (argparse stops filling positionals at the first option; the words after it go to the config
    while it is unset, then to the overrides)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(word.startswith("-") for word in extra):
        if getattr(args, "config", "set") is None and "=" not in extra[0]:
            args.config, extra = extra[0], extra[1:]
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse(argv)
        return int(args._module.run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except VerificationFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
