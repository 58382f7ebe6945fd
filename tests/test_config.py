import subprocess
import sys
from pathlib import Path

import pytest

from vlmfit.config import RunConfig, load_config
from vlmfit.errors import UserError

RECIPES = sorted((Path(__file__).parents[1] / "src" / "vlmfit" / "recipes").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)


def test_unknown_key_names_nearest(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model: {name: tiny:qwen2_vl}\ntrain: {learning_rate: 1e-3}\n"))
    assert "train.learning_rate" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model: {name: tiny:qwen2_vl}\ntrian: {lr: 1e-3}\n"))
    assert "did you mean 'train'" in str(e.value)


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model: {name: tiny:qwen2_vl}\ntrain: {batch_size: many}\n"))
    assert "train.batch_size" in str(e.value) and "'many'" in str(e.value)


def test_overrides_and_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "model: {name: tiny:qwen2_vl}\n"), ["train.lr=0.5", "method=full", "lora.scope=[language, vision]"])
    assert cfg.train.lr == 0.5 and cfg.method == "full" and cfg.lora.scope == ["language", "vision"]
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # validated configs are immutable
    with pytest.raises(UserError):
        load_config(write(tmp_path, "model: {name: x}\n"), ["train.lr"])


def test_bad_yaml_points_at_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model:\n  name: [unclosed\n"))
    assert "r.yaml:" in str(e.value)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmfit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


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
def test_cli_user_errors_exit_2_without_traceback(tmp_path, recipe, expect):
    r = run_cli("train", str(write(tmp_path, recipe)), "--set", f"output.dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_missing_recipe_and_help(tmp_path):
    r = run_cli("train", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "recipe file not found" in r.stderr and "Traceback" not in r.stderr
    for cmd in ("train", "eval", "demo", "models"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0 and "Usage" in h.stdout


@pytest.mark.parametrize("method", ["full", "lora", "dpo", "zo"])
def test_a_wrong_model_fails_before_any_data_is_touched(tmp_path, method):
    # The data source does not exist either: the error must be about the model, found first, for every recipe kind.
    recipe = write(tmp_path, f"model: {{name: tiny:qwen2-vl}}\nmethod: {method}\ndata: {{source: {tmp_path}/missing.jsonl}}\n")
    r = run_cli("train", str(recipe), "--set", f"output.dir={tmp_path}")
    assert r.returncode == 2 and "did you mean 'tiny:qwen2_vl'" in r.stderr and "missing.jsonl" not in r.stderr, r.stderr


def test_recipes_fail_fast_through_the_python_api_too(tmp_path):
    from vlmfit.train.dpo import train_dpo
    from vlmfit.train.sft import train_sft
    from vlmfit.train.zo import train_zo

    for train, method in ((train_sft, "lora"), (train_dpo, "dpo"), (train_zo, "zo")):
        cfg = load_config(base={"model": {"name": "./no/such/model"}, "method": method,
                                "data": {"source": str(tmp_path / "missing.jsonl")}, "output": {"dir": str(tmp_path)}})
        with pytest.raises(UserError, match="does not exist") as e:
            train(cfg)
        assert e.value.where == "model.name"
