"""The demo end to end, as a user runs it (slow: about 2-3 minutes on 2 CPU cores). Its speed is a benchmark, not a
test (benchmarks/sft_vs_trl.py --family demo, docs/BENCHMARKS.md): here only what it learns."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_learns_digits(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlmfit.cli", "demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = list(tmp_path.iterdir())
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    assert before["n"] == after["n"] == 1000
    assert before["constrained"]["accuracy"] < 0.2  # random init: chance level
    assert after["constrained"]["accuracy"] >= 0.8 and after["generate"]["accuracy"] >= 0.8
