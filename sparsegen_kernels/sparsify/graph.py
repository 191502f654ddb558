"""The graph path: sites found and rewritten in a ``torch.fx`` graph of a module's ``forward``.

A *unit* is a module whose ``forward`` is traced symbolically as a whole: the forwards of its submodules are traced
through (inlined), except for the leaves -- modules with a ``forward`` of ``torch.nn`` (``Conv2d``, ``ReLU``,
``BatchNorm2d``, parametrised convs ...) and the modules of this package -- which stay calls. So custom ``forward``
methods, functional calls (``F.relu``, ``F.leaky_relu``, ``F.interpolate``), activation modules passed in as
attributes and a module called at several places are all seen; each call is a node, and a site is a node.

When a submodule's ``forward`` cannot be traced (data-dependent control flow, an unsupported call), the trace is
repeated with that submodule as an opaque call, and the submodule becomes a unit of its own; a module whose own
``forward`` cannot be traced leaves its children as units. Every such failure is recorded with the place and the
error, and reported (see :func:`~sparsegen_kernels.sparsify_report`).

A unit with sites gets a new ``forward``: the code ``torch.fx`` generates for the rewritten graph, bound to the
module (its class, submodules, parameters and buffers stay as they are). Python control flow on non-tensor values
is fixed by tracing; the training flag (both values traced by ``sparsify``) and the ``None``-ness of arguments that
default to ``None`` (traced at the first call that needs it) select one of several traces. Gradient-mode switches
(``torch.no_grad()`` ...) are kept as calls of the graph.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import linecache
import os
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn

from . import runtime
from .layers import BIAS_DEFERRED, LEAVES
from .sites import (Act, describe_module_conv, foreign_hooks, function_conv_kind, is_plain_sequential, main_input,
                    module_conv_kind, node_activation, pass_through, bind, is_static)
from .sequential import is_bias_producer
from .spec import per_site

# Frames in these directories are not the user's (a failure is placed at the innermost frame outside them).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


# ---------------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------------
class TraceFailure(Exception):
    """A ``forward`` that symbolic tracing could not get through: where (a path relative to the traced module, ""
    for its own forward) and why."""

    def __init__(self, path: str, reason: str, where: str):
        super().__init__(f"{path or '<forward>'}: {reason}")
        self.path, self.reason, self.where = path, reason, where


def is_leaf(m: nn.Module) -> bool:
    """Modules whose calls stay calls in a trace: ``torch.nn`` forwards, this package's modules, and modules whose
    forward was already rewritten."""
    if isinstance(m.__dict__.get("forward"), TracedForward) or isinstance(m, LEAVES):
        return True
    if is_plain_sequential(m):
        return False
    mod = getattr(type(m).forward, "__module__", None) or ""
    return mod.startswith(("torch.nn", "torch.ao.nn"))


class _Tracer(fx.Tracer):
    """A tracer that treats chosen submodules as opaque and remembers which submodule a failure came from."""

    def __init__(self, opaque: frozenset):
        super().__init__()
        self.opaque = opaque
        self.culprit: Optional[tuple] = None  # (path, exception) of the innermost traced-through module

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self.opaque or is_leaf(m)

    def trace(self, root, concrete_args=None):
        """Symbolic tracing that keeps gradient-mode switches (``torch.no_grad()``, ``torch.enable_grad()``,
        ``torch.set_grad_enabled``) as calls of the graph: plain tracing would drop them, and a power iteration
        run under ``no_grad`` in a hand-written spectral norm would silently start to carry gradients."""
        set_grad, is_grad = torch._C._set_grad_enabled, torch.is_grad_enabled

        def record_set(mode):
            self.create_proxy("call_function", set_grad, (mode,), {})

        def record_is():
            return self.create_proxy("call_function", is_grad, (), {})

        torch._C._set_grad_enabled, torch.is_grad_enabled = record_set, record_is
        try:
            return super().trace(root, concrete_args)
        finally:
            torch._C._set_grad_enabled, torch.is_grad_enabled = set_grad, is_grad

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.culprit is None and not self.is_leaf_module(m, ""):
                try:
                    self.culprit = (self.path_of_module(m), e)
                except Exception:  # a module made on the fly inside a forward: its caller is the culprit
                    pass
            raise


def _where(exc: BaseException) -> str:
    """The innermost frame of user code in ``exc``'s traceback: ``file:line (code)``."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not os.path.abspath(f.filename).startswith((_TORCH_DIR, _PACKAGE_DIR))]
    f = user[-1] if user else (frames[-1] if frames else None)
    if f is None:
        return "?"
    return f"{os.path.basename(f.filename)}:{f.lineno}" + (f" ({f.line.strip()})" if f.line else "")


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}"
    return text if len(text) <= 240 else text[:237] + "..."


def trace(module: nn.Module, opaque: frozenset, training: bool, nones: frozenset) -> fx.Graph:
    """The graph of ``module.forward`` with every module of its subtree in ``training`` mode and the arguments in
    ``nones`` fixed to None. Raises :class:`TraceFailure`. The modules' flags are restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    tracer = _Tracer(opaque)
    try:
        for m, _ in flags:
            m.training = training
        return tracer.trace(module, concrete_args={p: None for p in nones} if nones else None)
    except Exception as e:
        path, exc = tracer.culprit if tracer.culprit is not None else ("", e)
        raise TraceFailure(path, _reason(exc), _where(exc)) from None
    finally:
        for m, t in flags:
            m.training = t


# ---------------------------------------------------------------------------------------------------
# Analysis: the activation -> conv chains of a graph
# ---------------------------------------------------------------------------------------------------
@dataclass
class Chain:
    """One path from an activation to a convolution's input."""

    conv: fx.Node
    via: list  # the nodes between them
    kind: Optional[str]  # "upsample" / "conv" / "transposed" when the sparse kernels can run it
    reason: Optional[str]  # why not, otherwise
    conv_desc: str


@dataclass
class Producer:
    """The conv right before a ReLU whose bias can move into the top-k."""

    node: fx.Node
    target: Optional[str]  # the module's path (a conv module), or None (a functional conv)
    bias: Any  # the bias node of a functional conv


@dataclass
class GSite:
    name: str
    node: fx.Node
    act: Act
    chains: list = field(default_factory=list)
    producer: Optional[Producer] = None
    keep_act: bool = False  # an in-place activation of a tensor read elsewhere: it stays, the top-k follows it

    @property
    def ok(self) -> list:
        return [c for c in self.chains if c.kind is not None]

    def describe(self) -> str:
        return f"{self.act.label} -> " + "; ".join(c.conv_desc for c in self.ok)


@dataclass
class Analysis:
    graph: fx.Graph
    sites: dict  # name -> GSite (every activation with a chain, sparsifiable or not), in graph order
    calls: Counter  # call_module target -> number of calls
    convs: list  # every conv node (for the report's totals)
    act_names: dict  # every activation node -> its name (whether or not it reaches a conv)


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix and rel else (prefix or rel)


def _site_base_name(node: fx.Node, root: nn.Module, modules) -> str:
    """A site's name before the call count: the activation module as an attribute of the module whose forward
    calls it (``"blocks.1.activation"``, even when the same object is also ``blocks.0``'s), or
    ``"<path of that module>:<function>"`` for a functional call (``"blocks.1:relu"``; ``":relu"`` at the top)."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module":
        owner_path = stack[-2] if len(stack) >= 2 else ""
        owner = modules(owner_path) if owner_path else root
        m = modules(node.target)
        attr = next((n for n, c in owner.named_children() if c is m), None)
        return _join(owner_path, attr) if attr is not None else node.target
    fn = node.target if isinstance(node.target, str) else node.target.__name__
    return f"{stack[-1] if stack else ''}:{fn}"


def _conv_of(node: fx.Node, modules, after_upsample: bool):
    """``(is a conv, kind, reason, description)`` for a node reading the activation's value as its input."""
    if node.op == "call_module":
        m = modules(node.target)
        kind, reason = module_conv_kind(m, after_upsample)
        if kind is None and reason is None:
            return False, None, None, ""
        desc = describe_module_conv(node.target, m, kind)
        if kind is not None:
            hooks = foreign_hooks(m)
            if hooks:
                kind, reason = None, f"the conv '{node.target}' has {' and '.join(hooks)}"
            elif len(node.args) != 1 or node.kwargs:
                kind, reason = None, f"the conv '{node.target}' is called with extra arguments (output_size?)"
        return True, kind, reason, desc
    kind, reason, a = function_conv_kind(node, after_upsample)
    if kind is None and reason is None:
        return False, None, None, ""
    name = "F.conv_transpose2d" if a is not None and node.target.__name__ == "conv_transpose2d" else "F.conv2d"
    what = "upsample x2 + " if after_upsample else ""
    desc = f"{what}{name} (functional, weight '{a['weight']}')" if a is not None else name
    return True, kind, reason, desc


def _find_chains(act_node: fx.Node, act: Act, modules) -> list:
    chains, seen = [], set()
    stack = [(u, [], False, None) for u in act_node.users]
    while stack:
        node, via, after_up, reason = stack.pop(0)
        prev = via[-1] if via else act_node
        if (node, prev) in seen or main_input(node) is not prev:
            continue
        seen.add((node, prev))
        is_conv, kind, why, desc = _conv_of(node, modules, after_up)
        if is_conv:
            r = act.reason or reason or why
            chains.append(Chain(node, via, None if r else kind, r, desc))
            continue
        pt = pass_through(node, modules) if node.op != "output" else None
        if pt is None:
            continue
        what, r = pt
        if what == "upsample" and after_up:
            r = "two upsamplings between them"
        for u in node.users:
            stack.append((u, via + [node], after_up or what == "upsample", reason or r))
    return chains


def _producer(site: GSite, modules) -> Optional[Producer]:
    if site.act.kind != "relu" or site.keep_act:
        return None
    p = main_input(site.node)
    if not isinstance(p, fx.Node) or len(p.users) != 1:
        return None
    if p.op == "call_module":
        m = modules(p.target)
        if is_bias_producer(m) and not foreign_hooks(m) and len(p.args) == 1 and not p.kwargs:
            return Producer(p, p.target, None)
        return None
    _, _, a = function_conv_kind(p, False)
    if a is not None and isinstance(a.get("bias"), fx.Node) \
            and is_static([v for k, v in a.items() if k not in ("input", "weight", "bias")]):
        return Producer(p, None, a["bias"])
    return None


def analyse(graph: fx.Graph, root: nn.Module, prefix: str) -> Analysis:
    """Every activation of ``graph`` (traced from ``root``, at path ``prefix``) that reaches a conv, with its chains."""
    cache: dict = {}

    def modules(target: str) -> nn.Module:
        if target not in cache:
            cache[target] = root.get_submodule(target)
        return cache[target]

    sites: dict = {}
    calls: Counter = Counter(n.target for n in graph.nodes if n.op == "call_module")
    convs = []
    seen_names: Counter = Counter()
    act_names: dict = {}
    for node in graph.nodes:
        if node.op in ("call_module", "call_function"):
            if node.op == "call_module":
                m = modules(node.target)
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                    convs.append(node)
            elif function_conv_kind(node, False) != (None, None, None):
                convs.append(node)
        act = node_activation(node, modules)
        if act is None:
            continue
        base = _site_base_name(node, root, modules)
        n = seen_names[base]
        seen_names[base] += 1
        name = (_join(prefix, base) if not base.startswith(":") else f"{prefix}{base}") + (f"@{n}" if n else "")
        act_names[node] = name
        chains = _find_chains(node, act, modules)
        if not chains:
            continue
        site = GSite(name, node, act, chains)
        if act.inplace:
            x = main_input(node)
            site.keep_act = not isinstance(x, fx.Node) or x.op in ("placeholder", "get_attr") or len(x.users) > 1
        site.producer = _producer(site, modules)
        sites[name] = site
    return Analysis(graph, sites, calls, convs, act_names)


# ---------------------------------------------------------------------------------------------------
# Rewriting
# ---------------------------------------------------------------------------------------------------
def rewrite(an: Analysis, root: nn.Module, chosen: dict, fuse_bias: bool) -> fx.Graph:
    """Rewrite ``an.graph`` in place at the chosen sites (``{name: (k, mode)}``) and return it."""
    g = an.graph
    roles: dict = {}  # conv node -> {"site": sa node or None, "kind": str or None, "bias": bool}
    site_bias: dict = {}
    for name in chosen:
        s = an.sites[name]
        for c in s.ok:
            roles.setdefault(c.conv, {"site": None, "kind": None, "bias": True}).update(site=name, kind=c.kind)
        if fuse_bias and s.producer is not None:
            roles.setdefault(s.producer.node, {"site": None, "kind": None, "bias": True})["bias"] = False
            site_bias[name] = s.producer

    # The top-k of each chosen activation.
    sa_of: dict = {}
    for name, (k, mode) in chosen.items():
        s = an.sites[name]
        A = s.node
        if s.keep_act:
            with g.inserting_after(A):
                sa = g.call_function(runtime.topk_site, (A, None, k, mode or "spatial", "none", 0.0, name))
        else:
            with g.inserting_before(A):
                bias = None
                p = site_bias.get(name)
                if p is not None:
                    bias = g.get_attr(f"{p.target}.bias") if p.target is not None else p.bias
                sa = g.call_function(runtime.topk_site, (main_input(A), bias, k, mode or "spatial", s.act.kind,
                                                         s.act.slope, name))
        sa_of[name] = sa

    # Every conv with a role: a sparse consumer, a producer without its bias, or both.
    for node, r in roles.items():
        inp = sa_of[r["site"]] if r["site"] is not None else None
        with g.inserting_before(node):
            if node.op == "call_module":
                m = root.get_submodule(node.target)
                ref = g.get_attr(node.target)
                bias = r["bias"] and not isinstance(m, BIAS_DEFERRED)
                new = g.call_function(runtime.module_conv, (ref, inp if inp is not None else node.args[0],
                                                            r["kind"] or "dense", bias))
            else:
                a = bind(node.target, node.args, node.kwargs)
                transposed = node.target.__name__ == "conv_transpose2d"
                kind = r["kind"] or ("dense_transposed" if transposed else "dense")
                new = g.call_function(runtime.functional_conv, (
                    inp if inp is not None else a["input"], a["weight"], a["bias"] if r["bias"] else None, kind,
                    a["stride"], a["padding"], a.get("output_padding", 0), a["dilation"], a["groups"],
                    r["site"] or ""))
        node.replace_all_uses_with(new)
        g.erase_node(node)

    # What the activations' other readers get: the masked dense tensor.
    erased: set = set()
    for name in chosen:
        s = an.sites[name]
        for c in s.ok:
            for v in reversed(c.via):  # the upsampling and identities between, unless something else reads them
                if v not in erased and not v.users:
                    g.erase_node(v)
                    erased.add(v)
        A, sa = s.node, sa_of[name]
        if s.keep_act:
            if len(A.users) > 1:
                with g.inserting_after(sa):
                    dense = g.call_method("to_dense", (sa,))
                A.replace_all_uses_with(dense, delete_user_cb=lambda u, sa=sa, d=dense: u is not sa and u is not d)
        else:
            if A.users:
                with g.inserting_after(sa):
                    dense = g.call_method("to_dense", (sa,))
                A.replace_all_uses_with(dense)
            g.erase_node(A)
    g.lint()
    return g


# ---------------------------------------------------------------------------------------------------
# The new forward
# ---------------------------------------------------------------------------------------------------
_counter = itertools.count()


def _compile(graph: fx.Graph, owner_name: str):
    code = graph.python_code(root_module="self")
    filename = f"<sparsified {owner_name}.forward #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 (code generated by torch.fx)
    return namespace["forward"]


def none_params(module: nn.Module) -> tuple:
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in list(sig.parameters.values())[1:] if p.kind in kinds and p.default is None)


class Signature:
    """The module's own ``forward`` signature, and how a call of it maps onto the generated code's parameters:
    ``torch.fx`` puts keyword-only parameters before ``*args`` and renames an argument fixed to None."""

    def __init__(self, module: nn.Module):
        self.sig = inspect.signature(type(module).forward)
        params = list(self.sig.parameters.values())[1:]
        P = inspect.Parameter
        self.simple = all(p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for p in params)
        self.fixed = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)] + \
            [p.name for p in params if p.kind == P.KEYWORD_ONLY]
        self.var = next((p.name for p in params if p.kind == P.VAR_POSITIONAL), None)
        self.varkw = next((p.name for p in params if p.kind == P.VAR_KEYWORD), None)

    def bind(self, owner, args, kwargs) -> dict:
        b = self.sig.bind(owner, *args, **kwargs)
        b.apply_defaults()
        return b.arguments

    def in_graph_order(self, arguments: dict) -> tuple:
        """``(positional values, keyword values)`` for the generated code (or an interpreter) from bound arguments."""
        pos = [arguments[n] for n in self.fixed]
        if self.var is not None:
            pos += list(arguments[self.var])
        return pos, (dict(arguments[self.varkw]) if self.varkw is not None else {})


class TracedForward:
    """The ``forward`` of a unit with rewritten sites: the generated code of one rewritten trace per training flag
    and per pattern of ``None`` arguments (among those that default to ``None``), bound to the module.

    Traces not made by :func:`~sparsegen_kernels.sparsify` are made at their first call, with the same ``k``;
    one that fails runs the module's own (dense) forward, with a :class:`SparsifyWarning`.
    """

    def __init__(self, owner: nn.Module, path: str, opaque: tuple, graphs: dict, spec: tuple, sites: dict):
        self.owner = owner
        self.path = path  # the unit's path in the model sparsified (site names start with it)
        self.opaque = opaque  # paths (relative to owner) of submodules traced as opaque calls
        self.graphs = graphs  # (training, nones) -> rewritten fx.Graph or None (trace failed)
        self.spec = spec  # (k, mode, fuse_bias, names of sites rewritten by swapping modules)
        self.sites = sites  # the sites rewritten here: {name: (k, mode)}
        self._init_runtime()

    @property
    def code(self) -> str:
        """The generated code of the trace for the module's present training flag (all arguments given)."""
        key = (self.owner.training, frozenset())
        if key not in self.graphs:
            self._build(key)
        g = self.graphs[key]
        return g.python_code(root_module="self").src if g is not None else "<the module's own forward>"

    def _init_runtime(self) -> None:
        self._none_params = none_params(self.owner)
        self._sig = Signature(self.owner)
        # Compiled now, not at the first call, so that torch.compile finds plain functions to trace.
        self._fns: dict = {}
        for key in self.graphs:
            self._build(key)

    def __call__(self, *args, **kwargs):
        if self._sig.simple and not kwargs and not self._none_params:  # G(z): nothing to bind
            key, gargs, gkwargs = (self.owner.training, frozenset()), args, kwargs
        else:
            arguments = self._sig.bind(self.owner, args, kwargs)
            key = (self.owner.training, frozenset(p for p in self._none_params if arguments[p] is None))
            gargs, gkwargs = self._sig.in_graph_order(arguments)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._build(key)
        if self.graphs[key] is None:  # this trace failed: the module's own forward, dense
            return fn(self.owner, *args, **kwargs)
        return fn(self.owner, *gargs, **gkwargs)

    def _build(self, key):
        if key not in self.graphs:
            self.graphs[key] = self._trace_variant(key)
        graph = self.graphs[key]
        if graph is None:
            fn = type(self.owner).forward
        else:
            src = graph.python_code(root_module="self").src
            same = [f for k, f in self._fns.items() if self.graphs.get(k) is not None
                    and getattr(f, "_sparsify_src", None) == src]
            fn = same[0] if same else _compile(graph, type(self.owner).__name__)
            fn._sparsify_src = src
        self._fns[key] = fn
        return fn

    def _trace_variant(self, key) -> Optional[fx.Graph]:
        training, nones = key
        k, mode, fuse_bias, skip = self.spec
        opaque = frozenset(id(self.owner.get_submodule(p)) for p in self.opaque)
        try:
            g = trace(self.owner, opaque, training, nones)
        except TraceFailure as f:
            warnings.warn(f"sparsify: {type(self.owner).__name__} '{self.path}' runs dense for this call "
                          f"(training={training}, None arguments {sorted(nones)}): its forward could not be traced "
                          f"at {f.where}: {f.reason}", runtime.SparsifyWarning, stacklevel=4)
            return None
        an = analyse(g, self.owner, self.path)
        names = [n for n, s in an.sites.items() if s.ok and n not in skip]
        chosen = per_site(k, mode, names, "sparsify", strict=False)
        return strip(rewrite(an, self.owner, chosen, fuse_bias))

    def __getstate__(self):
        return {"owner": self.owner, "path": self.path, "opaque": self.opaque, "graphs": self.graphs,
                "spec": self.spec, "sites": self.sites}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"<sparsified forward of {type(self.owner).__name__} '{self.path}'>"


def strip(graph: fx.Graph) -> fx.Graph:
    """Drop the tracing metadata (stack traces, module stacks) a stored graph does not need."""
    for n in graph.nodes:
        n.meta = {}
    return graph


# ---------------------------------------------------------------------------------------------------
# The plan: units, their traces and sites, and what could not be traced
# ---------------------------------------------------------------------------------------------------
@dataclass
class Failure:
    path: str  # the submodule that stopped a trace
    type_name: str
    reason: str
    where: str

    def describe(self) -> str:
        who = f"'{self.path}'" if self.path else "the top module"
        return f"{who} ({self.type_name}) stopped the trace at {self.where}: {self.reason}"


class Unit:
    """A module traced as a whole, with its opaque submodules and its traces by (training, nones)."""

    def __init__(self, module: nn.Module, path: str, opaque: dict, primary: Analysis, training: bool):
        self.module, self.path, self.opaque = module, path, opaque  # opaque: id -> relative path
        self.analyses = {(training, frozenset()): primary}
        self.primary_key = (training, frozenset())
        self.failed: dict = {}  # key -> TraceFailure

    @property
    def primary(self) -> Analysis:
        return self.analyses[self.primary_key]

    def analysis(self, key) -> Optional[Analysis]:
        if key not in self.analyses and key not in self.failed:
            try:
                g = trace(self.module, frozenset(self.opaque), key[0], key[1])
                self.analyses[key] = analyse(g, self.module, self.path)
            except TraceFailure as f:
                self.failed[key] = f
        return self.analyses.get(key)

    def sites(self) -> dict:
        """The sites of the traces made so far, the primary's first."""
        out: dict = {}
        for an in [self.primary] + [a for k, a in self.analyses.items() if k != self.primary_key]:
            for n, s in an.sites.items():
                out.setdefault(n, s)
        return out


@dataclass
class Plan:
    units: list
    failures: list
    skipped: list  # paths of modules whose forward was rewritten before (already sparsified)


def make_plan(root: nn.Module, both_modes: bool = True) -> Plan:
    """Trace ``root`` (and, where that fails, its parts) and find every site."""
    plan = Plan([], [], [])
    seen: set = set()
    failed_paths: set = set()

    def fail(path: str, m: nn.Module, f: TraceFailure) -> None:
        if path not in failed_paths:
            failed_paths.add(path)
            plan.failures.append(Failure(path, type(m).__name__, f.reason, f.where))

    def visit(m: nn.Module, path: str) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m.__dict__.get("forward"), TracedForward):
            plan.skipped.append(path)
            return
        if is_leaf(m):
            return
        opaque: dict = {}
        while True:
            try:
                g = trace(m, frozenset(opaque), m.training, frozenset())
                break
            except TraceFailure as f:
                if not f.path or f.path in opaque.values():
                    fail(path, m, f)
                    for name, child in m.named_children():
                        visit(child, _join(path, name))
                    return
                culprit = m.get_submodule(f.path)
                fail(_join(path, f.path), culprit, f)
                opaque[id(culprit)] = f.path
        unit = Unit(m, path, opaque, analyse(g, m, path), m.training)
        if both_modes:
            unit.analysis((not m.training, frozenset()))
        plan.units.append(unit)
        for rel in list(opaque.values()):
            visit(m.get_submodule(rel), _join(path, rel))

    visit(root, "")
    return plan


def install(unit: Unit, chosen: dict, spec: tuple) -> None:
    """Give ``unit.module`` the rewritten forward (its traces so far, each rewritten with the chosen sites)."""
    k, mode, fuse_bias, skip = spec
    graphs = {}
    for key, an in unit.analyses.items():
        g = copy.deepcopy(an.graph)
        an2 = analyse(g, unit.module, unit.path)
        names = [n for n, s in an2.sites.items() if s.ok and n not in skip]
        here = {n: v for n, v in chosen.items() if n in names}
        graphs[key] = strip(rewrite(an2, unit.module, here, fuse_bias))
    for key in unit.failed:
        graphs[key] = None
    opaque = tuple(unit.opaque.values())
    unit.module.forward = TracedForward(unit.module, unit.path, opaque, graphs, spec, dict(chosen))
