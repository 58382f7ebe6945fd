"""docs/python-api.md runs as written: its Python block, in a fresh process and an empty directory, trains,
evaluates, predicts and exports through vlmfit's functions, and a bad override is a UserError."""

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "python-api.md"


def test_the_python_api_page_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any("rows prepared into prepared/digits" in line for line in lines)
    assert any(line.startswith("constrained accuracy ") for line in lines)
    assert (tmp_path / "runs" / "from-python" / "summary.json").is_file()
    assert (tmp_path / "exported" / "digits" / "config.json").is_file()
    assert any(line.startswith("refused: ") and "lr" in line for line in lines), lines


def test_importing_vlmfit_pulls_in_no_torch():
    code = "import sys, vlmfit; vlmfit.UserError; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False False", out.stderr
