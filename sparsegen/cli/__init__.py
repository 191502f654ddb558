"""The ``sparsegen`` command line (also ``python -m sparsegen``); :func:`main` is the console script.

    sparsegen train --config cpu32 --data parts --iters 600 --out runs/demo     # cli/train.py
    sparsegen sample --run runs/demo --n 64                                     # cli/generate.py
    sparsegen reconstruct --run runs/demo --data faces --steps 300              # cli/generate.py
    sparsegen andor | eval | report --run runs/demo                             # cli/readout.py

Each subcommand module has ``add_subcommands(subparsers) -> {name: handler}``, with
``handler(args, parser) -> exit status``; :mod:`.options` holds what they share. Exit status: 0 on success,
1 when training stops on a non-finite loss or weight (the last good checkpoint is kept), 2 for anything the user
can fix: a bad option value, a device that is not there, data that do not load, an output path that cannot be
written, a run none of whose checkpoints loads (one line on stderr, naming the option; a traceback means a bug),
130 when interrupted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import generate, readout, train
from .options import PROG, UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole parser; each subcommand's handler is in ``args.handler`` and its parser in ``args.parser``."""
    p = argparse.ArgumentParser(prog=PROG, description="Sparsely activated generator networks (CVPR 2020): "
                                "train, sample, reconstruct, and read the AND-OR trees out of a trained run.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sample,reconstruct,andor,eval,report}")
    for module in (train, generate, readout):
        for name, handler in module.add_subcommands(sub).items():
            sub.choices[name].set_defaults(handler=handler, parser=sub.choices[name])
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sparsegen`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, args.parser)
    except UsageError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
