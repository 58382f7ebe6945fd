import os

# Tests never touch the network: tiny models are built locally and data ships in PyPI packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite's tiny CLIP is pretrained for 1,500 steps instead of 3,000 (its own cache folder): ~70 s to build cold
# instead of ~135 s; 0.75 upright zero-shot accuracy instead of 0.92 (chance 0.10).
os.environ.setdefault("VLMFIT_TINY_CLIP_STEPS", "1500")


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


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """A few real digits as a prepared dataset directory: loads in milliseconds, unlike building builtin:mnist."""
    import datasets

    from vlmfit.data.builtin import load_builtin

    out = tmp_path_factory.mktemp("digits")
    mnist = load_builtin("mnist")
    datasets.DatasetDict({"train": mnist["train"].select(range(16)), "test": mnist["test"].select(range(8))}).save_to_disk(str(out))
    (out / "prepare_report.json").write_text("{}")
    return out
