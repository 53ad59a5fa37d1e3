"""The package's shape: every module imports, imports go one way, no cycles, no private names across modules.

Layers, from the bottom up (a module may import its own package and the layers below it, never a sibling or a
layer above): the top-level modules (``errors``, ``geometry``, ``catalog``) <- ``engine`` <- ``models`` <-
``imaging`` <- ``analysis`` <- {``reporting``, ``slicer_logic``} <- ``cli``. The Slicer module file sits above
``slicer_logic`` and never imports ``cli``.
"""

import ast
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "SegHiResCAM")
PACKAGE = "SegHiResCAMLib"

#: rank of each top-level part; equal ranks of different parts may not import each other
RANKS = {"": 0, "errors": 0, "geometry": 0, "catalog": 0, "engine": 1, "models": 2, "imaging": 3, "analysis": 4,
         "reporting": 5, "slicer_logic": 5, "cli": 6}
#: what the engine may import besides itself and the top-level modules
ENGINE_THIRD_PARTY = {"torch", "numpy"}
#: parts that run inside Slicer's GUI process only
SLICER_ONLY = ("slicer", "qt", "ctk", "vtk", "slicer_standalone")


def module_files(top=os.path.join(SOURCE, PACKAGE)):
    """Every module of the package as (dotted name, path, is_package)."""
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, SOURCE)[:-3].split(os.sep)
                is_pkg = rel[-1] == "__init__"
                found.append((".".join(rel[:-1] if is_pkg else rel), path, is_pkg))
    return found


def imports_of(module, path, is_pkg, known):
    """(imported module, imported names, line, local name of the module or None) for every import statement in the file, at any depth."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((alias.name, [], node.lineno, alias.asname or alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            plain = []
            for alias in node.names:
                if target + "." + alias.name in known:  # a module: from . import files as io
                    out.append((target + "." + alias.name, [], node.lineno, alias.asname or alias.name))
                else:
                    plain.append(alias.name)
            if plain:
                out.append((target, plain, node.lineno, None))
    return tree, out


def part(module):
    """The layer a module belongs to: its subpackage, or "" for the top-level modules (errors, geometry, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and RANKS.get(parts[1]) != 0) else ""


def check_tree(files):
    """Every violation of the rules, as readable lines; and the import graph inside the package."""
    known = {name for name, _, _ in files}
    problems, graph = [], {name: set() for name in known}
    for module, path, is_pkg in files:
        tree, imports = imports_of(module, path, is_pkg, known)
        aliases = {}
        for target, names, line, local in imports:
            where = "%s:%d" % (os.path.relpath(path, ROOT), line)
            top = target.split(".")[0]
            if top != PACKAGE:
                if part(module) == "engine" and top not in ENGINE_THIRD_PARTY and top not in sys.stdlib_module_names:
                    problems.append("%s: the engine imports %s (torch, numpy and the standard library only)"
                                    % (where, target))
                if top in SLICER_ONLY and part(module) != "slicer_logic":
                    problems.append("%s: %s imports %s outside slicer_logic" % (where, module, target))
                continue
            if target not in known:
                problems.append("%s: imports %s, which does not exist" % (where, target))
                continue
            if target != module:
                graph[module].add(target)
            own, other = part(module), part(target)
            if own != other and RANKS.get(other, 99) >= RANKS.get(own, -1):
                problems.append("%s: %s (%s) imports %s (%s): imports go %s" % (
                    where, module, own or "top", target, other or "top",
                    "engine <- models <- imaging <- analysis <- {reporting, slicer_logic} <- cli"))
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    problems.append("%s: %s imports the private name %s of %s" % (where, module, name, target))
            if local:
                aliases[local] = target
        for node in ast.walk(tree):  # module._private through an imported module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases and aliases[node.value.id] != module):
                problems.append("%s:%d: %s uses the private name %s.%s" % (
                    os.path.relpath(path, ROOT), node.lineno, module, aliases[node.value.id], node.attr))
    return problems, graph


def cycles(graph):
    """Every strongly connected component of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


FILES = module_files()


def test_the_rules_catch_what_they_name(tmp_path):
    """The checker itself: a cycle, an upward import, a sibling import and a private name are all reported."""
    pkg = tmp_path / PACKAGE
    for sub in ("engine", "models", "reporting", "slicer_logic"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("from ..models import b\n")
    (pkg / "models" / "b.py").write_text("from ..engine import a\nfrom ..engine.a import _hidden\n")
    (pkg / "reporting" / "c.py").write_text("from ..slicer_logic import d\n")
    (pkg / "slicer_logic" / "d.py").write_text("from ..engine import a\nx = a._secret\n")
    global SOURCE
    saved, SOURCE = SOURCE, str(tmp_path)
    try:
        problems, graph = check_tree(module_files(str(pkg)))
    finally:
        SOURCE = saved
    text = "\n".join(problems)
    assert "engine.a (engine) imports SegHiResCAMLib.models.b" in text
    assert "private name _hidden" in text and "private name SegHiResCAMLib.engine.a._secret" in text
    assert "reporting.c (reporting) imports SegHiResCAMLib.slicer_logic.d" in text
    assert cycles(graph) == [["SegHiResCAMLib.engine.a", "SegHiResCAMLib.models.b"]]


def test_imports_go_one_way():
    problems, _ = check_tree(FILES)
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    _, graph = check_tree(FILES)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_slicer_module_file_never_imports_the_command_line():
    path = os.path.join(SOURCE, "SegHiResCAM.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith(PACKAGE + ".cli")], names


@pytest.mark.parametrize("module", [name for name, _, _ in FILES if part(name) != "slicer_logic"])
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_slicer_logic_module_imports_on_real_mrml():
    """slicer_logic needs ``slicer``: the real MRML of slicer-core, plus the test stand-in for the GUI parts."""
    import slicer_standalone

    slicer_standalone.setup()
    for name, _, _ in FILES:
        if part(name) == "slicer_logic":
            importlib.import_module(name)


@pytest.mark.parametrize("path", sorted(
    [p for _, p, _ in FILES] + [os.path.join(SOURCE, "SegHiResCAM.py")]
    + [os.path.join(ROOT, "Testing", f) for f in os.listdir(os.path.join(ROOT, "Testing")) if f.endswith(".py")]),
    ids=lambda p: os.path.relpath(p, ROOT))
def test_python_39_syntax(path):
    """Slicer 5.8 ships Python 3.9: no ``match``, no parenthesised context managers, no 3.10+ grammar."""
    ast.parse(open(path, encoding="utf-8").read(), path, feature_version=(3, 9))


def test_a_method_is_one_file_and_one_catalog_row():
    """Every file of engine/methods/ is one catalog row and back; the class carries the catalog's name."""
    from SegHiResCAMLib import catalog
    from SegHiResCAMLib.engine.methods import METHODS

    folder = os.path.join(SOURCE, PACKAGE, "engine", "methods")
    files = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f not in ("__init__.py", "base.py")}
    assert files == {info.implementation.split(":")[0] for info in catalog.METHODS}
    assert list(METHODS) == list(catalog.method_names())
    assert all(cls.name == name for name, cls in METHODS.items())
    assert catalog.DEFAULT_METHOD == "seg-hires-grad-cam"


@pytest.mark.parametrize("package", [name for name, _, is_pkg in FILES if is_pkg and part(name) != "slicer_logic"])
def test_no_package_hides_a_submodule_behind_a_name(package):
    """``pkg.name`` is the submodule ``name`` (a re-exported function of that name would hide it from
    ``import pkg.name as m`` and from mock.patch strings)."""
    module = importlib.import_module(package)
    folder = os.path.dirname(module.__file__)
    for entry in sorted(os.listdir(folder)):
        name = entry[:-3] if entry.endswith(".py") else entry
        if entry == "__init__.py" or not (entry.endswith(".py") or os.path.isfile(os.path.join(folder, entry, "__init__.py"))):
            continue
        importlib.import_module("%s.%s" % (package, name))
        value = getattr(module, name)
        assert isinstance(value, type(module)), "%s.%s is %r, not the submodule" % (package, name, value)
