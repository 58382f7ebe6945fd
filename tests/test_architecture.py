"""The one-way architecture of ../shared/DESIGN.md, checked on the source: every vlmfit import (function-local ones
included) goes down the layers, the package root (`import vlmfit`) is above them all, nothing outside train/ and
cli.py imports vlmfit.train, no package import cycles, and no module but cache.py names a cache path."""

import ast
from pathlib import Path

import vlmfit

SRC = Path(vlmfit.__file__).parent

# Layers, top to bottom: a module may import its own package and anything of a lower layer, never a sibling of
# its own layer or anything above (DESIGN.md, "The map").
LAYERS = [
    {"__main__"},  # `python -m vlmfit`: the CLI, for launchers
    {"cli"},
    {"train"},
    {"serve"},  # serves what export writes (an adapter run merged first)
    {"evaluate", "memory", "doctor", "launch", "export"},
    {"report"},
    {"rundir"},
    {"data"},
    {"chat"},
    {"models"},
    {"config", "cache"},
    {"errors"},
]
# The package root (vlmfit/__init__.py) is the facade users import: it imports every layer, so a module that imports
# it (`import vlmfit`, `from vlmfit import UserError`) is an arrow back up. It ranks above every layer.
ROOT = "vlmfit"
RANK = {ROOT: -1} | {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
SUBMODULES = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}


def _package(module: str) -> str | None:
    """vlmfit.models.load -> models; vlmfit and vlmfit.<a name of the root's, not a module> -> ROOT."""
    parts = module.split(".")
    if parts[0] != "vlmfit":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBMODULES else ROOT


def imports_of(source: str):
    """(own line, imported package) for every vlmfit import in one module's source."""
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module + "." + a.name for a in node.names] if node.module == "vlmfit" else [node.module]
        for name in names:
            if (pkg := _package(name)) is not None:
                yield node.lineno, pkg


def imports():
    """(importing file, its package, imported package) for every `import vlmfit...` / `from vlmfit... import`."""
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue
        own = rel.parts[0].removesuffix(".py")
        for line, pkg in imports_of(path.read_text()):
            if pkg != own:
                yield f"{rel}:{line}", own, pkg


def test_every_package_has_a_layer():
    packages = SUBMODULES - {"__init__"}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS (and to DESIGN.md's map)"


def test_nothing_inside_the_package_imports_its_root():
    bad = [f for f, own, pkg in imports() if pkg == ROOT]
    assert not bad, f"these import the package root (vlmfit/__init__.py), an arrow back up: {bad}"


def test_the_checker_sees_imports_of_the_root():
    found = [pkg for _, pkg in imports_of("import vlmfit\nfrom vlmfit import __version__, cache\nimport vlmfit.chat.rows\n"
                                          "def f():\n    from vlmfit import UserError\n")]
    assert found == [ROOT, ROOT, "cache", "chat", ROOT]


def test_nothing_outside_train_and_cli_imports_train():
    bad = [f for f, own, pkg in imports() if pkg == "train" and own not in ("train", "cli")]
    assert not bad, f"these import vlmfit.train: {bad}"


def test_imports_go_down_the_layers():
    bad = [f"{f}: {own} -> {pkg}" for f, own, pkg in imports() if RANK[pkg] <= RANK[own]]
    assert not bad, "imports that go up or sideways:\n" + "\n".join(bad)


def test_no_package_import_cycles():
    graph: dict[str, set[str]] = {}
    for _, own, pkg in imports():
        graph.setdefault(own, set()).add(pkg)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert not cycles, f"packages in an import cycle: {cycles}"


def test_the_checker_sees_function_local_imports():
    # The checker must not be blind to imports inside functions (most of vlmfit's heavy imports are there).
    found = {(own, pkg) for _, own, pkg in imports()}
    assert ("cli", "train") in found and ("train", "evaluate") in found


CACHE_NAMES = {"prepared", "encoded", "evals", "builtin", "tiny"}


def cache_paths_in(source: str):
    """(line, what) for each cache path a module's code names: the env var, a `.cache` path, or a cache's
    sub-directory joined onto a path (`root / "encoded"`, `.joinpath("evals")`). Docstrings and description / help /
    hint texts are prose, not paths."""
    tree = ast.parse(source)
    prose = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            prose.add(id(node.body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("description", "help", "hint"):
            prose.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            text = node.value
            if "VLMFIT_CACHE" in text or text.strip("/~") == ".cache" or "/.cache" in text or text.startswith(".cache/"):
                yield node.lineno, repr(text)
        joined = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            joined = [node.right]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
            joined = node.args
        for part in joined:
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and part.value.strip("./") in CACHE_NAMES:
                yield part.lineno, f"/ {part.value!r}"


def test_only_cache_py_names_a_cache_path():
    bad = [f"{path.relative_to(SRC)}:{line}: {what}" for path in sorted(SRC.rglob("*.py")) if path.name != "cache.py"
           for line, what in cache_paths_in(path.read_text())]
    assert not bad, "cache paths outside cache.py (use vlmfit.cache.cache_dir):\n" + "\n".join(bad)


def test_the_cache_path_checker_sees_paths_not_prose():
    code = '''"""Results under $VLMFIT_CACHE/evals."""
import os
home = os.environ.get("VLMFIT_CACHE")
old = Path.home() / ".cache" / "vlmfit" / "prepared"
enc = root / "encoded"
ev = root.joinpath(".evals", "x")
field = Field(1, description="kept in $VLMFIT_CACHE/encoded")
name = "tiny"
'''
    assert sorted(line for line, _ in cache_paths_in(code)) == [3, 4, 4, 5, 6]
