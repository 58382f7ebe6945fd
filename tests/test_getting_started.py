"""docs/getting-started.md, as a new user follows it: every command of its bash blocks runs in order, in an empty
directory, and succeeds; the run it trains has a report and the export loads."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute: nine commands, each a fresh process loading the stack

DOC = Path(__file__).parents[1] / "docs" / "getting-started.md"


def commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_getting_started_runs_as_written(tmp_path):
    cmds = commands()
    assert cmds[0] == "vlmfit --help" and any(c.startswith("vlmfit train") for c in cmds)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the venv's vlmfit
    for cmd in cmds:
        out = subprocess.run(shlex.split(cmd), cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, (cmd, (out.stdout + out.stderr)[-3000:])
    run = tmp_path / "runs" / "first"
    assert (run / "report.html").is_file() and (run / "model").is_dir()
    assert (tmp_path / "exported" / "first" / "config.json").is_file()
