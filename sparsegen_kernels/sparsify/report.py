"""The coverage report: :func:`sparsify_report`.

The model is copied and run once on an example input. Each traced unit runs as a ``torch.fx`` interpreter over its
graph, which records the shapes at every activation -> conv chain; the code that could not be traced runs as it
is, under a ``TorchFunctionMode`` that follows activation outputs into the convolutions they reach, so that chains
hidden in untraced code are counted (and named) too. MACs are multiply-accumulates per forward of the example
input: a dense conv counts ``N * Cout * Ho * Wo * Cin * kh * kw`` (transposed: ``N * Cin * H * W * Cout * kh * kw``),
a sparse one ``survivors * Cout * taps`` (taps: 16 for an upsample + 3x3 conv, whose fold the kernels run; kh * kw
otherwise).
"""
from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..geometry import group_geometry
from ..modules import SparseUpsampleConv2d
from .graph import Signature, make_plan, none_params
from .sites import FUNCTION_ACTS, OTHER_FUNCTION_ACTS, UPSAMPLE, bind, main_input, pass_through, reparam_memo
from .spec import per_site, resolve_k
from .switch import has_switch, switch_sites


@dataclass
class SiteRow:
    name: str
    what: str
    calls: int = 0
    dense_macs: int = 0  # the dense convs behind it
    sparse_macs: int = 0  # what the sparse kernels run there
    kept: str = ""  # "4 of 16 per channel"


@dataclass
class DenseRow:
    name: str  # the activation (a site name, or "<module>: F.relu" in untraced code)
    what: str
    reason: str
    calls: int = 0
    dense_macs: int = 0


@dataclass
class SparsifyReport:
    """What :func:`~sparsegen_kernels.sparsify` does to a model, measured on an example input.

    ``sites``: the sparsified sites (per site: dense and sparse MACs); ``left_dense``: every activation -> conv chain
    that stays dense, with the reason; ``failures``: the submodules that stopped a trace. ``coverage`` is the share
    of the conv MACs behind an activation that the sparse kernels now run.
    """

    model: str
    k: Any
    mode: Optional[str]
    inputs: str = ""  # the example input's shapes
    sites: list = field(default_factory=list)
    left_dense: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    conv_macs: int = 0  # every conv of the forward
    error: Optional[str] = None  # the sparsified model failed on the example input
    note: Optional[str] = None  # a module with its own sparse path: what sparsify does instead

    @property
    def behind_activation_macs(self) -> int:
        return sum(r.dense_macs for r in self.sites) + sum(r.dense_macs for r in self.left_dense)

    @property
    def sparsified_macs(self) -> int:
        return sum(r.dense_macs for r in self.sites)

    @property
    def sparse_macs(self) -> int:
        return sum(r.sparse_macs for r in self.sites)

    @property
    def coverage(self) -> float:
        total = self.behind_activation_macs
        return self.sparsified_macs / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"sparsify report for {self.model} on {self.inputs or 'the example input'} (k={self.k!r}"
                 + (f", mode={self.mode!r}" if self.mode else "") + "); MACs per forward"]
        if self.note:
            return "\n".join(lines + [self.note])
        lines.append(f"sites ({len(self.sites)}):" if self.sites else "sites: none")
        width = max([len(r.name) for r in self.sites + self.left_dense] + [4])
        for r in self.sites:
            lines.append(f"  {r.name:<{width}}  {r.what}")
            lines.append(f"  {'':<{width}}  dense {_macs(r.dense_macs)} MACs -> sparse {_macs(r.sparse_macs)} MACs"
                         f" ({r.kept}, {r.calls} call{'s' if r.calls != 1 else ''})")
        if self.left_dense:
            lines.append(f"left dense ({len(self.left_dense)} activation -> conv chain"
                         f"{'s' if len(self.left_dense) != 1 else ''}):")
            for r in self.left_dense:
                lines.append(f"  {r.name:<{width}}  {r.what}: {_macs(r.dense_macs)} MACs")
                lines.append(f"  {'':<{width}}  why: {r.reason}")
        if self.failures:
            lines.append(f"not traced ({len(self.failures)}):")
            lines += [f"  {f.describe()}" for f in self.failures]
        lines.append(f"conv MACs behind an activation: {_macs(self.behind_activation_macs)}; sparsified: "
                     f"{_macs(self.sparsified_macs)} ({100 * self.coverage:.1f}%), run by the sparse kernels as "
                     f"{_macs(self.sparse_macs)}")
        lines.append(f"all conv MACs: {_macs(self.conv_macs)} ("
                     f"{_macs(max(0, self.conv_macs - self.behind_activation_macs))} not behind an activation)")
        if self.error:
            lines.append(f"the sparsified model failed on the example input: {self.error}")
        return "\n".join(lines)


def _macs(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------------
# MACs of one conv call
# ---------------------------------------------------------------------------------------------------
def _conv_call_macs(node: fx.Node, module: Optional[nn.Module], args, kwargs, out) -> tuple[int, int, int]:
    """``(dense MACs, Cout, taps of one input entry)`` of a conv call."""
    if module is not None:
        kh, kw = module.kernel_size
        if isinstance(module, SparseUpsampleConv2d):
            return out.numel() * module.in_channels * 9, module.out_channels, 16
        if isinstance(module, nn.ConvTranspose2d):
            x = args[0]
            n_in = x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] if hasattr(x, "shape") else 0
            return n_in * (module.out_channels // module.groups) * kh * kw, module.out_channels, kh * kw
        return out.numel() * (module.in_channels // module.groups) * kh * kw, module.out_channels, kh * kw
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    kh, kw = w.shape[2:]
    if node.target is torch.conv_transpose2d:
        x = args[0]
        return x.numel() * w.shape[1] * kh * kw, out.shape[1], kh * kw
    return out.numel() * w.shape[1] * kh * kw, out.shape[1], kh * kw


class _Recorder:
    """Everything the run of the copy records."""

    def __init__(self, chosen: dict):
        self.chosen = chosen
        self.sites: dict = {}  # name -> SiteRow
        self.dense: dict = {}  # (name, what) -> DenseRow
        self.conv_macs = 0
        self.tags: dict = {}  # id(tensor) -> (tensor, label): activation outputs and what keeps them
        self.suppress = False  # inside a traced node: the interpreter accounts for it
        self.owner: list = [""]  # the path of the untraced module whose code is running

    def tag(self, t, label) -> None:
        if isinstance(t, torch.Tensor):
            self.tags[id(t)] = (t, label)

    def label(self, t) -> Optional[str]:
        e = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return e[1] if e is not None and e[0] is t else None

    def dense_chain(self, name: str, what: str, reason: str, macs: int) -> None:
        r = self.dense.setdefault((name, what, reason), DenseRow(name, what, reason))
        r.calls += 1
        r.dense_macs += macs


class _Mode(TorchFunctionMode):
    """Follows activation outputs through untraced code into the convs they reach."""

    PASS = (torch.nn.functional.interpolate, torch.nn.functional.pad, torch.nn.functional.dropout,
            torch.nn.functional.dropout2d, torch.Tensor.contiguous, torch.Tensor.clone)

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.rec
        if rec.suppress:
            return out
        if func in FUNCTION_ACTS or func in OTHER_FUNCTION_ACTS or func in (torch.Tensor.relu, torch.Tensor.relu_):
            name = getattr(func, "__name__", str(func))
            rec.tag(out, f"{rec.owner[-1]}:{name}")
        elif func in self.PASS and args:
            lab = rec.label(args[0])
            if lab is not None:
                rec.tag(out, lab)
        elif func in (torch.conv2d, torch.conv_transpose2d) and args:
            macs, _, _ = _conv_call_macs(_FakeNode(func), None, args, kwargs, out)
            rec.conv_macs += macs
            lab = rec.label(args[0])
            if lab is not None:
                where = f"'{rec.owner[-1]}'" if rec.owner[-1] else "the top module"
                rec.dense_chain(lab, f"-> F.{func.__name__} in {where}",
                                f"{where} could not be traced (see below): its code runs as it is", macs)
        return out


class _FakeNode:
    def __init__(self, target):
        self.target = target


def _interpreter_forward(unit, rec: _Recorder):
    """A forward for ``unit.module`` that interprets its (dense) graph and records the chains."""
    module = unit.module
    sig = Signature(module)
    nones_of = none_params(module)

    def forward(*args, **kwargs):
        arguments = sig.bind(module, args, kwargs)
        an = unit.analysis((module.training, frozenset(p for p in nones_of if arguments[p] is None)))
        values, extra = sig.in_graph_order(arguments)
        if an is None or extra:  # a trace that failed, or **kwargs an interpreter cannot pass: run as it is
            return type(module).forward(module, *args, **kwargs)
        return _Interp(module, an, unit, rec).run(*values)

    return forward


class _Interp(fx.Interpreter):
    def __init__(self, module, an, unit, rec: _Recorder):
        super().__init__(module, garbage_collect_values=True, graph=an.graph)
        self.an, self.unit, self.rec = an, unit, rec
        self.chain_of = {c.conv: (s, c) for s in an.sites.values() for c in s.chains}
        self.convs = set(an.convs)
        self.opaque = set(unit.opaque)
        self.shape: dict = {}  # site name -> activation output shape of this run

    def run_node(self, n: fx.Node):
        rec = self.rec
        args, kwargs = (), {}
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        opaque = module is not None and id(module) in self.opaque
        saved = rec.suppress
        rec.suppress = not opaque
        try:
            out = super().run_node(n)
        finally:
            rec.suppress = saved
        if n in self.an.act_names:
            name = self.an.act_names[n]
            rec.tag(out, name)
            if isinstance(out, torch.Tensor):
                self.shape[name] = tuple(out.shape)
        elif n.op in ("call_module", "call_function", "call_method") and not opaque and args:
            lab = rec.label(main_input_value(n, args, kwargs))
            if lab is not None and pass_through(n, self._module) is not None:
                rec.tag(out, lab)
        if n in self.convs:
            self._conv(n, module, args, kwargs, out)
        return out

    def _module(self, target):
        return self.module.get_submodule(target)

    def _conv(self, n, module, args, kwargs, out) -> None:
        rec = self.rec
        macs, cout, taps = _conv_call_macs(n, module, args, kwargs, out)
        rec.conv_macs += macs
        if n not in self.chain_of:
            lab = rec.label(args[0]) if args else None
            if lab is not None:
                rec.dense_chain(lab, f"-> conv '{n.target if module is not None else n.name}'",
                                f"the activation is outside the traced forward of '{self.unit.path or 'the model'}'",
                                macs)
            return
        s, c = self.chain_of[n]
        if c.kind is None:
            rec.dense_chain(s.name, f"{s.act.label} -> {c.conv_desc}", c.reason, macs)
            return
        if s.name not in rec.chosen:
            rec.dense_chain(s.name, f"{s.act.label} -> {c.conv_desc}", "not chosen (the dict k leaves it out)", macs)
            return
        spec, mode = rec.chosen[s.name]
        mode = mode or "spatial"
        N, C, H, W = self.shape[s.name]
        G, size = group_geometry(mode, C, H, W)
        kk = resolve_k(spec, size)
        taps = 16 if c.kind == UPSAMPLE else taps
        row = rec.sites.setdefault(s.name, SiteRow(s.name, s.describe()))
        row.calls += 1
        row.dense_macs += macs
        row.sparse_macs += N * G * kk * cout * taps
        row.kept = f"{kk} of {size} per {_GROUP[mode]}"


_GROUP = {"spatial": "channel", "channel": "position", "global": "sample"}


def main_input_value(n: fx.Node, args, kwargs):
    """The value of the node's main input among its evaluated arguments."""
    x = main_input(n)
    if x is None:
        return None
    if n.op == "call_function":
        a = bind(n.target, args, kwargs)
        if a is not None:
            return a.get("input")
    return args[0] if args else kwargs.get("input")


def sparsify_report(model: nn.Module, example_input, k=0.25, mode: Optional[str] = None, *,
                    verbose: bool = True, file=None) -> SparsifyReport:
    """What :func:`~sparsegen_kernels.sparsify` ``(model, k, mode)`` sparsifies, measured on ``example_input``.

    Prints (unless ``verbose=False``) and returns a :class:`SparsifyReport`: per site, where it is, the dense MACs of
    the convs behind it and the MACs the sparse kernels run there; per activation -> conv chain left dense, the
    reason; the submodules that stopped a trace, where and why; and the coverage, the share of the conv MACs behind
    an activation that the sparse kernels now run. ``example_input`` is the input tensor, or a tuple of the
    forward's positional arguments. The model is not changed (it runs on a copy, without gradients); pass the dense
    model.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    report = SparsifyReport(type(model).__name__, k, mode, ", ".join(map(str, shapes)))
    if has_switch(model):
        report.note = (f"{type(model).__name__} has its own sparse path: sparsify switches it on (layer: shape, mode, "
                       f"k) {dict(switch_sites(model))}")
        if verbose:
            print(report, file=file or sys.stdout)
        return report
    twin = copy.deepcopy(model, reparam_memo(model))
    plan = make_plan(twin, both_modes=False)
    report.failures = list(plan.failures)
    names = []
    for unit in plan.units:
        for n, s in unit.sites().items():
            if s.ok and n not in names:
                names.append(n)
    chosen = per_site(k, mode, names, "sparsify_report") if names else {}
    rec = _Recorder(chosen)
    for unit in plan.units:
        unit.module.forward = _interpreter_forward(unit, rec)
    for f in plan.failures:  # the code of these runs as it is: name it as the owner of what it calls
        m = twin.get_submodule(f.path)
        m.register_forward_pre_hook(lambda mod, inp, p=f.path: rec.owner.append(p))
        m.register_forward_hook(lambda mod, inp, out: rec.owner.pop() and None)
    try:
        with torch.no_grad(), _Mode(rec):
            twin(*args)
    except Exception as e:  # the dense model itself failed: nothing was measured
        report.error = f"the model failed on the example input: {type(e).__name__}: {e}"
    order = {n: i for i, n in enumerate(names)}
    report.sites = sorted(rec.sites.values(), key=lambda r: order.get(r.name, len(order)))
    report.left_dense = list(rec.dense.values())
    report.conv_macs = rec.conv_macs
    if names and report.error is None:
        report.error = _check_sparse_run(model, args, k, mode)
    if verbose:
        print(report, file=file or sys.stdout)
    return report


def _check_sparse_run(model: nn.Module, args, k, mode) -> Optional[str]:
    """Run the sparsified model once (on a copy): None, or the error it raised."""
    from . import sparsify

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sparse = sparsify(copy.deepcopy(model, reparam_memo(model)), k, mode, inplace=True)
            with torch.no_grad():
                sparse(*args)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None
