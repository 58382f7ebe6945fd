import os

# Tests never touch the network: tiny models are built locally and data ships in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def vlmfit(monkeypatch, capsys):
    """vlmfit(*args) -> (exit code, stdout, stderr) of `vlmfit ARGS`, run in this process (vlmfit.cli.main)."""
    from vlmfit import cli

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["vlmfit", *map(str, args)])
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
