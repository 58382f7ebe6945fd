"""A fresh machine installs what CI tested: every runtime dependency is bounded above (or pinned) in pyproject.toml
and pinned exactly in constraints.txt, which `make` installs with."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_dependency_is_bounded_and_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["dev"]
    unbounded = [s for s in specs if "==" not in s and "<" not in s]
    assert not unbounded, f"no upper bound: {unbounded}"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    missing = [s for s in specs if _name(s) not in pins]
    assert not missing, f"not in constraints.txt: {missing}"
    for s in specs:  # an exact pin in pyproject agrees with constraints.txt
        if "==" in s:
            assert s.split("==")[1] == pins[_name(s)], s
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
