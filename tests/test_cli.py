"""The CLI as a user types it: typos, missing arguments, bad recipes. Run in process (vlmfit.cli.main with argv),
plus one real subprocess smoke test of the installed entry point."""

import subprocess
import sys

import pytest

from vlmfit import cli
from vlmfit.config import load_config


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("args, expect", [
    (["trian", "x.yaml"], "Did you mean 'train'"),
    (["train"], "Missing argument"),
    (["plan", "--method", "lora"], "No such option: --method"),
    (["eval"], "Missing argument"),
    (["prepare", "x", "--tsk", "vqa"], "No such option: --tsk"),
])
def test_usage_errors_are_one_clear_message_and_exit_2(vlmfit, args, expect):
    code, out, err = vlmfit(*args)
    assert code == 2 and expect in err and "Traceback" not in out + err, err


@pytest.mark.parametrize(
    "recipe, expect",
    [
        ("model: {name: tiny:qwen2_vl}\ntrain: {epoch: 1}\n", "did you mean 'epochs'"),
        ("model: {name: tiny:qwen2_vl}\ntrain: {lr: fast}\n", "train.lr"),
        ("model: {name: ./no/such/model}\n", "does not exist"),
        ("model: {name: tiny:qwen2-vl}\n", "did you mean 'tiny:qwen2_vl'"),
        ("model: {name: tiny:qwen2_vl}\ndata: {source: builtin:mnits}\n", "did you mean 'builtin:mnist'"),
    ],
)
def test_recipe_errors_exit_2_without_traceback(vlmfit, tmp_path, recipe, expect):
    code, out, err = vlmfit("train", write(tmp_path, recipe), "--set", f"output.dir={tmp_path}")
    assert code == 2 and expect in err and "Traceback" not in out + err, err


def test_missing_recipe_and_help(vlmfit, tmp_path):
    code, _, err = vlmfit("train", tmp_path / "nope.yaml")
    assert code == 2 and "recipe file not found" in err and "Traceback" not in err
    for cmd in ("train", "eval", "demo", "models", "plan", "doctor", "prepare"):
        code, out, _ = vlmfit(cmd, "--help")
        assert code == 0 and "Usage" in out


@pytest.mark.parametrize("method", ["full", "lora", "dpo", "zo"])
def test_a_wrong_model_fails_before_any_data_is_touched(vlmfit, tmp_path, method):
    # The data source does not exist either: the error must be about the model, found first, for every recipe kind.
    recipe = write(tmp_path, f"model: {{name: tiny:qwen2-vl}}\nmethod: {method}\ndata: {{source: {tmp_path}/missing.jsonl}}\n")
    code, _, err = vlmfit("train", recipe, "--set", f"output.dir={tmp_path}")
    assert code == 2 and "did you mean 'tiny:qwen2_vl'" in err and "missing.jsonl" not in err, err


def test_recipes_fail_fast_through_the_python_api_too(tmp_path):
    from vlmfit.errors import UserError
    from vlmfit.train.dpo import train_dpo
    from vlmfit.train.sft import train_sft
    from vlmfit.train.zo import train_zo

    for train, method in ((train_sft, "lora"), (train_dpo, "dpo"), (train_zo, "zo")):
        cfg = load_config(base={"model": {"name": "./no/such/model"}, "method": method,
                                "data": {"source": str(tmp_path / "missing.jsonl")}, "output": {"dir": str(tmp_path)}})
        with pytest.raises(UserError, match="does not exist") as e:
            train(cfg)
        assert e.value.where == "model.name"


def test_models_never_cuts_the_names_users_type(vlmfit, monkeypatch):
    from rich.console import Console

    from vlmfit.models.tiny import TINY_FAMILIES

    for width in (80, 60):
        monkeypatch.setattr(cli, "console", Console(width=width, force_terminal=False, color_system=None))
        code, out, _ = vlmfit("models")
        assert code == 0
        for name in (*TINY_FAMILIES, "clip"):
            assert f"tiny:{name} " in out, (width, name, out)  # whole, on one line (a cut one ends in "…")


def test_installed_entry_point_smoke(tmp_path):
    """The real `vlmfit` process: a missing recipe is one message and exit 2, with no traceback and no library noise
    (`train` imports TRL, PEFT and with them bitsandbytes, whose optional-kernel notice must stay out of the
    user's terminal) before it reads the recipe."""
    r = subprocess.run([sys.executable, "-m", "vlmfit.cli", "train", str(tmp_path / "nope.yaml")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "recipe file not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "kernels" not in r.stderr + r.stdout, r.stderr


def test_train_profile_says_where_a_step_goes(vlmfit, tmp_path):
    import json

    code, out, err = vlmfit("train", "demo", "--profile", "--set", f"output.dir={tmp_path}", "--set", "output.name=p",
                            "--set", "train.max_steps=4", "--set", "data.train_limit=32", "--set", "data.eval_limit=8",
                            "--set", "eval.before=false", "--set", "eval.modes=[constrained]")
    assert code == 0, err
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    parts = prof["median_seconds"]
    assert prof["steps_profiled"] == 3 and set(parts) == {"data", "vision forward", "language forward", "other forward",
                                                           "loss + backward", "optimizer"}
    assert parts["vision forward"] > 0 and parts["language forward"] > 0 and parts["loss + backward"] > 0
    assert parts["language forward"] < prof["median_step_seconds"]
    assert abs(sum(prof["share"].values()) - 1) < 1e-3 and "where a step's time goes" in out
    code, _, err = vlmfit("train", "zo-lora", "--profile", "--set", f"output.dir={tmp_path}")
    assert code == 2 and "--profile" in err
