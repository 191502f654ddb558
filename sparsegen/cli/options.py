"""What the subcommands share: the program name, typed option values (``type=`` of argparse), and the options
derived from the config dataclasses of :mod:`sparsegen.model.configs`.

A config field declared on one line with a comment becomes an option, with the comment as its help::

    batch_size: int = 64  # training examples per iteration (per process under DDP)
        -> --batch-size N     training examples per iteration (per process under DDP) (default 64)

The option's name is the field's with dashes (``--no-<field>`` for a bool that defaults to True, ``--<field>``
for one that defaults to False, unless ``flags`` names it otherwise); its value is converted by the field's type
(``int``, ``float``, ``str``, ``tuple`` of ints written ``1,2,3``) and checked by the dataclass's own
``check_field``, so a bad value ends in an argparse error that names the option. Fields without such a comment
(nested configs, names) are not options.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import tempfile
import textwrap
import tokenize
import typing
from typing import Any, Iterable, Mapping, Optional, Sequence

PROG = "sparsegen"


class UsageError(Exception):
    """Something the user asked for that cannot be done: :func:`sparsegen.cli.main` prints
    ``sparsegen <command>: <message>`` on one line and exits with status 2. The message starts with the option."""


def check_device(option: str, device: str) -> None:
    """A :class:`UsageError` unless ``device`` (``cpu``, ``cuda``, ``cuda:<i>``) can be used here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {device}: not a device (expected cpu, cuda or cuda:<index>)") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise UsageError(f"{option} {device}: expected cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise UsageError(f"{option} {device}: CUDA is not available ({why})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {device}: there are {torch.cuda.device_count()} CUDA device(s)")


def _probe_writable(option: str, path: str, d: str) -> None:
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def check_out_dir(option: str, path: str) -> None:
    """A :class:`UsageError` unless ``path`` is (or can be made) a directory this process can write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: exists and is not a directory")
    _probe_writable(option, path, path)


def check_out_file(option: str, path: str) -> None:
    """A :class:`UsageError` unless a file can be written at ``path`` (not a directory; its folder writable)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory; name the file to write")
    d = os.path.dirname(os.path.abspath(path))
    if os.path.exists(d) and not os.path.isdir(d):
        raise UsageError(f"{option} {path}: {d} is not a directory")
    _probe_writable(option, path, d)


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


# ---- options derived from the config dataclasses -------------------------------------------------------
def field_comments(cls: type) -> dict:
    """``{field: comment}`` of the fields of dataclass ``cls`` declared on one line with a trailing comment."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(src).body[0].body
    return {node.target.id: comments[node.lineno] for node in body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and node.lineno == node.end_lineno and node.lineno in comments}


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """The command-line option of one field of a config dataclass."""

    config: type  # the dataclass (ModelConfig, TrainConfig, RunConfig)
    field: str  # the field, also the attribute of the parsed arguments
    flag: str  # the option: "--batch-size", "--no-langevin-noise", ...
    type: type  # the field's type: int, float, str, bool or tuple
    default: Any  # the dataclass's default (the parsed default is None: "not given")
    help: str  # the field's comment
    const: Any = None  # for a bool: the value the flag sets

    def parse(self, text: str):
        """``text`` -> the field's value, checked by the dataclass (``argparse.ArgumentTypeError`` if invalid)."""
        try:
            if self.type is tuple:
                value = tuple(int(v) for v in text.split(",") if v.strip())
            else:
                value = self.type(text)
        except ValueError:
            value = text  # not even of the right type: let the dataclass say what it expects
        try:
            self.config.check_field(self.field, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {getattr(exc, 'expected', exc)}, got {text!r}") from None
        return value


def config_options(cls: type, flags: Optional[Mapping[str, str]] = None) -> list:
    """The :class:`ConfigOption` of every commented field of dataclass ``cls``, in declaration order.

    ``flags``: ``{field: option}`` where the option is not spelled after the field (a bool's flag sets the
    opposite of the field's default whatever its name).
    """
    flags = dict(flags or {})
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name not in comments:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if kind is bool:
            flag = flags.pop(f.name, "--" + ("no-" if default else "") + f.name.replace("_", "-"))
            out.append(ConfigOption(cls, f.name, flag, bool, default, comments[f.name], const=not default))
        elif kind in (int, float, str, tuple):
            flag = flags.pop(f.name, "--" + f.name.replace("_", "-"))
            out.append(ConfigOption(cls, f.name, flag, kind, default, comments[f.name]))
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line type for {kind!r}")
    if flags:
        raise ValueError(f"flags for fields {sorted(flags)} of {cls.__name__} that are not options")
    return out


#: how the usage line shows a value of each type (a str shows the field's name)
METAVARS = {int: "N", float: "X", tuple: "N,N,..."}


def add_config_options(group, options: Iterable[ConfigOption], default_note: Optional[str] = None) -> None:
    """Add ``options`` to the parser or argument group ``group``. Every parsed default is None ("not given");
    the help shows the dataclass's default, or ``default_note`` instead."""
    for o in options:
        text = o.help.replace("%", "%%")
        if o.type is bool:
            group.add_argument(o.flag, dest=o.field, action="store_const", const=o.const, default=None,
                               help=f"sets {o.field}={o.const}; {o.field}: {text}")
            continue
        if default_note is not None:
            shown = default_note
        elif o.type is tuple:
            shown = ",".join(map(str, o.default)) or "none"
        else:
            shown = o.default
        group.add_argument(o.flag, dest=o.field, type=o.parse, default=None, metavar=METAVARS.get(o.type),
                           help=f"{text} (default {shown})")


def given(args: argparse.Namespace, options: Iterable[ConfigOption]) -> dict:
    """``{field: value}`` of the ``options`` given on the command line."""
    return {o.field: getattr(args, o.field) for o in options if getattr(args, o.field, None) is not None}


def flag_of(options: Sequence[ConfigOption], field: str) -> str:
    """The option of ``field``."""
    return next(o.flag for o in options if o.field == field)
