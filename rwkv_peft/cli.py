"""``rwkv-peft``: one console script, one module per sub-command under ``rwkv_peft/commands/``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, so ``rwkv-peft --help`` stays fast.

Exit codes: 0 success, 1 the work failed (e.g. training diverged), 2 bad input (usage, recipe, checkpoint,
dataset, an output path the command cannot write), 130 interrupted. Helpers the commands share (model
arguments, output checks, streaming decode) are in ``rwkv_peft/commands/_common.py``; a command raises its
``UsageError`` for a bad argument and ``main`` prints it (exit code 2).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, RWKVPeftError  # noqa: F401 (the codes)

# name -> module; kept in the order ``--help`` lists them
COMMANDS = {
    "train": "rwkv_peft.commands.train",
    "validate": "rwkv_peft.commands.validate",
    "convert": "rwkv_peft.commands.convert",
    "merge": "rwkv_peft.commands.merge",
    "export": "rwkv_peft.commands.export",
    "generate": "rwkv_peft.commands.generate",
    "chat": "rwkv_peft.commands.chat",
    "eval": "rwkv_peft.commands.eval",
    "publish": "rwkv_peft.commands.publish",
    "bench": "rwkv_peft.commands.bench",
    "doctor": "rwkv_peft.commands.doctor",
}


def _available():
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            yield name, module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkv-peft", description="Fine-tune RWKV models: LoRA, state tuning, "
                                     "quantized bases, YAML recipes.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"rwkv-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in _available():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args._run(args) or 0)
    except RWKVPeftError as e:  # the message names the file, key or value and what is expected
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
