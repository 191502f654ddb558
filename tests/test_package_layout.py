"""The layout of the model package: every module imports, the import graph has no cycle, the subpackages
depend on each other in the direction the data flows, the packages keep to their side (``sparsegen_kernels``
never imports ``sparsegen``, ``sparsegen`` never imports ``benchmarks``), and what the README documents
resolves: the dotted names, the top-level names and the command lines."""
import ast
import importlib
import os
import re
import shlex

import pytest

import sparsegen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Which subpackages of sparsegen each one may import: the data flows from left to right,
# data / model -> train -> readout -> cli. The package's own __init__ and __main__ may import any of them.
LAYERS = {
    "data": set(),
    "model": set(),
    "train": {"data", "model"},
    "readout": {"data", "model", "train"},
    "cli": {"data", "model", "train", "readout"},
}


def _modules(package: str) -> dict:
    """``{module name: path}`` of every ``.py`` file under the package folder ``package``."""
    out = {}
    root = os.path.join(REPO, package)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(folder, f)
    return out


def _bound_names(statements) -> set:
    """The names a module body binds (imports, definitions, assignments), inside if/try/with blocks too."""
    out = set()
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        for field in ("body", "orelse", "finalbody", "handlers"):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out |= _bound_names(getattr(node, field, []))
    return out


def _imports(name: str, path: str, modules: dict) -> set:
    """The absolute names of the modules that module ``name`` (file ``path``) imports, anywhere in its body
    (an import inside a function counts: it is still a dependency). ``from pkg import x`` names ``pkg`` when
    ``pkg/__init__.py`` binds ``x``, else the submodule ``pkg.x`` (a ``.py`` file, or a compiled extension such
    as ``sparsegen_kernels._C``, which imports nothing back)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules or (base in modules and a.name not in _bound_in(modules[base])):
                    out.add(sub)
                else:
                    out.add(base)
    return out


def _bound_in(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        return _bound_names(ast.parse(f.read(), path).body)


def _graph(package: str) -> dict:
    """``{module: modules of the same package it imports}``."""
    modules = _modules(package)
    return {m: {t for t in _imports(m, p, modules) if t in modules and t != m} for m, p in modules.items()}


def _cycle(graph: dict):
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_every_module_of_sparsegen_imports():
    names = sorted(_modules("sparsegen"))
    assert {"sparsegen.cli", "sparsegen.model.generator", "sparsegen.train.trainer", "sparsegen.readout.report",
            "sparsegen.data.parts"} <= set(names)
    for name in names:
        importlib.import_module(name)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_has_no_cycle():
    graph = _graph("sparsegen")
    assert len(graph) > 10
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_subpackages_import_in_the_direction_of_the_data():
    bad = []
    for m, targets in _graph("sparsegen").items():
        src = m.split(".")[1] if m.count(".") else ""
        if src in ("", "__main__"):
            continue  # the package's front door
        assert src in LAYERS, f"{m}: a new subpackage needs its place in LAYERS"
        for t in targets:
            dst = t.split(".")[1] if t.count(".") else ""
            if dst != src and dst not in LAYERS[src]:
                bad.append(f"{m} imports {t}")
    assert not bad, "; ".join(sorted(bad))


@pytest.mark.parametrize("package, forbidden", [("sparsegen", "benchmarks"), ("sparsegen", "tests"),
                                                ("sparsegen_kernels", "sparsegen"),
                                                ("sparsegen_kernels", "benchmarks")])
def test_packages_keep_to_their_side(package, forbidden):
    modules = _modules(package)
    bad = sorted(f"{m} imports {t}" for m, p in modules.items() for t in _imports(m, p, modules)
                 if t.split(".")[0] == forbidden)
    assert not bad, "; ".join(bad)


# ---- what the README documents ---------------------------------------------------------------------------
def _readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def _resolve(dotted: str):
    """The object a dotted name such as ``sparsegen.train.langevin.langevin_infer`` names."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_dotted_names_in_the_readme_resolve():
    # sparsegen.X.Y, but not file names (csrc/sparsegen.cpp) nor the op namespace (torch.ops.sparsegen.*)
    names = sorted(set(re.findall(r"(?<![\w./])sparsegen(?:\.[A-Za-z_]\w*)+", _readme())))
    assert "sparsegen.readout.andor" in names and len(names) >= 5
    for name in names:
        _resolve(name)


def test_top_level_names_resolve():
    documented = ["SparseGenerator", "EnergyCritic", "Trainer", "RunConfig", "TrainConfig", "ModelConfig",
                  "model_config", "MODEL_CONFIGS", "langevin_infer", "load_run", "load_dataset", "critic_loss"]
    for name in documented + list(sparsegen.__all__):
        assert getattr(sparsegen, name) is not None, name
    # the names the README's model section shows without the package prefix
    model = _readme().split("## The model (`sparsegen`)", 1)[1].split("\n## ", 1)[0]
    shown = {m for span in re.findall(r"`([^`]+)`", model) for m in re.findall(r"^([A-Z]\w*)\b", span)}
    assert {"SparseGenerator", "EnergyCritic"} <= shown
    assert shown <= set(sparsegen.__all__)


def _command_lines(text: str) -> list:
    """The ``sparsegen ...`` command lines (comments removed) of the README's and the Makefile's commands."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^(?:torchrun .*?-m |\$\(PY\) -m )?sparsegen (.*)$", line)
        if m:
            out.append(shlex.split(m.group(1)))
    return out


def test_command_lines_of_the_readme_and_the_makefile_parse():
    from sparsegen.cli import build_parser

    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        make = f.read()
    demo = re.search(r"^DEMO_TRAIN := (.*)$", make, re.M).group(1)
    lines = _command_lines(_readme()) + _command_lines(make.replace("$(DEMO_TRAIN)", demo))
    assert {"train", "sample", "reconstruct", "andor", "eval", "report"} <= {a[0] for a in lines}
    parser = build_parser()
    for argv in lines:
        args = parser.parse_args(argv)
        assert args.command == argv[0]
