"""The one-way architecture of ../shared/DESIGN.md, checked on the source: every vlmfit import (function-local ones
included) goes down the layers, nothing outside train/ and cli.py imports vlmfit.train, no package import cycles."""

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
    {"evaluate", "memory", "doctor", "launch", "export"},
    {"report"},
    {"rundir"},
    {"data"},
    {"chat"},
    {"models"},
    {"config"},
    {"errors"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(module: str) -> str | None:
    """vlmfit.models.load -> models; the root package (vlmfit/__init__) is the facade and not a layer."""
    parts = module.split(".")
    return parts[1] if parts[0] == "vlmfit" and len(parts) > 1 else None


def imports():
    """(importing file, its package, imported package) for every `import vlmfit...` / `from vlmfit... import`."""
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue
        own = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module + "." + a.name for a in node.names] if node.module == "vlmfit" else [node.module]
            for name in names:
                pkg = _package(name)
                if pkg is not None and pkg != own:
                    yield str(rel), own, pkg


def test_every_package_has_a_layer():
    packages = {p.name.removesuffix(".py") for p in SRC.iterdir() if (p.suffix == ".py" and p.name != "__init__.py")
                or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages <= set(RANK), f"add {sorted(packages - set(RANK))} to LAYERS (and to DESIGN.md's map)"


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
