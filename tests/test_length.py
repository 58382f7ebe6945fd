"""max_length policy: checked on every example before training; never a silent cut through an image."""

import datasets
import pytest
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.chat.schema import chat_example
from vlmfit.errors import UserError
from vlmfit.models.load import load
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.train.sft import apply_length_policy, train_sft

from helpers import digit_image

QUIET = Console(quiet=True)


def cfg(tmp_path, **train):
    sets = ["model.name=tiny:qwen2_vl", "method=full", f"output.dir={tmp_path}", "data.train_limit=16", "data.eval_limit=4",
            "train.max_steps=1"] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(base={"model": {"name": "x"}}, overrides=sets)


def test_recipe_cutting_an_image_fails_before_training(tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(UserError, match="truncated through an image") as e:
        train_sft(cfg(tmp_path, max_length=12).model_copy(update={"output": cfg(out).output}), QUIET)
    assert "rows 0, 1, 2" in str(e.value) and "overlong: drop" in str(e.value)
    assert not out.exists() or not any(out.iterdir())  # no run directory: nothing started


def test_truncation_that_would_remove_the_answer_is_refused(tmp_path):
    with pytest.raises(UserError, match="lose their whole answer"):
        train_sft(cfg(tmp_path, max_length=30), QUIET)


def test_drop_policy_counts_and_reports(tmp_path):
    loaded = load("tiny:qwen2_vl")
    rows = [chat_example("What digit is this?", "one", [digit_image(i)]) for i in range(3)]
    rows.insert(1, chat_example("What digit is this?", "two " * 12, [digit_image(9)]))  # long answer
    ds = datasets.Dataset.from_list(rows)
    coll = VisionChatCollator(loaded.processor, loaded.family, max_length=40)
    kept, report = apply_length_policy(ds, coll, cfg(tmp_path, max_length=40, overlong="drop"), QUIET)
    assert len(kept) == 3 and report["dropped"] == 1 and report["dropped_rows"][0]["row"] == 1
    assert "> max_length 40" in report["dropped_rows"][0]["reason"]
    assert len(kept) + report["dropped"] == len(ds)
    # With truncation instead, the long row is cut inside its text: allowed, and counted.
    kept, report = apply_length_policy(ds, coll, cfg(tmp_path, max_length=40, overlong="truncate"), QUIET)
    assert len(kept) == 4 and report["truncated"] == 1
