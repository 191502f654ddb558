"""Pieces every subcommand shares: the program name and typed option values (``type=`` of argparse)."""
from __future__ import annotations

import argparse

PROG = "sparsegen"


def _int(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


def _float(lo: float, strict: bool, what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (v > lo if strict else v >= lo) or v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = what
    return parse


positive_int = _int(1, "a positive integer")
nonneg_int = _int(0, "an integer >= 0")
positive_float = _float(0.0, True, "a positive number")
nonneg_float = _float(0.0, False, "a number >= 0")
