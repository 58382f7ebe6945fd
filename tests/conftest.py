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


# Reply lengths in words for the `replies` fixture, one per example in turn: 2, 4, 9 and 23 labelled tokens (end of
# turn included) with the tiny Qwen2-VL, so micro-batches differ in how many tokens they label.
REPLY_WORDS = (1, 3, 7, 12)
_FILLER = "it is clearly the handwritten digit that a careful reader sees".split()


@pytest.fixture(scope="session")
def replies(digits, tmp_path_factory):
    """The `digits` dataset with replies of different lengths ("four", "it is four", ... 12 words ending in the
    digit): a per-micro-batch mean of the loss differs from the global batch's token mean only on such data."""
    import datasets

    def lengthen(ex, i):
        messages = ex["messages"]
        answer = messages[-1]["content"][0]["text"]
        messages[-1]["content"][0]["text"] = " ".join(_FILLER[:REPLY_WORDS[i % len(REPLY_WORDS)] - 1] + [answer])
        return {"messages": messages}

    out = tmp_path_factory.mktemp("replies")
    d = datasets.load_from_disk(str(digits))
    datasets.DatasetDict({"train": d["train"].map(lengthen, with_indices=True), "test": d["test"]}).save_to_disk(str(out))
    (out / "prepare_report.json").write_text("{}")
    return out
