import re
from pathlib import Path

import pydantic
import pytest

from vlmfit.config import load_config
from vlmfit.errors import UserError

RECIPES = sorted((Path(__file__).parents[1] / "src" / "vlmfit" / "recipes").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe, tmp_path):
    from vlmfit.memory.catalog import shipped_ids

    cfg = load_config(recipe)
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg  # what a run directory stores reloads as the same run
    # its model is one a user can reach offline: the tiny zoo or a config vlmfit ships for planning
    assert cfg.model.name.startswith("tiny:") or cfg.model.name in shipped_ids(), cfg.model.name


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
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # validated configs are immutable
    with pytest.raises(UserError):
        load_config(write(tmp_path, "model: {name: x}\n"), ["train.lr"])


def test_bad_yaml_points_at_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model:\n  name: [unclosed\n"))
    assert "r.yaml:" in str(e.value)


@pytest.mark.parametrize("sets, message", [
    (["method=dpo", "train.loss_on=all"], "DPO compares the final replies of each pair"),
    (["method=dpo", "dpo.tuning=full", "model.quantization=4bit"], "cannot be trained in full (dpo.tuning)"),
    (["method=full", "model.quantization=8bit"], "cannot be trained in full (method)"),
    (["method=dpo", "dpo.pairs_from_labels=mixed", "data.task=preference"], "data.task is preference"),
    (["method=zo", "zo.optimizer=coop", "zo.target=lora"], "coop is backprop prompt tuning"),
    (["method=grpo", "train.loss_on=all"], "GRPO trains on sampled completions"),
    (["method=grpo", "grpo.num_generations=3", "train.batch_size=8"], "must be a multiple of grpo.num_generations (3)"),
    (["method=grpo", "grpo.tuning=full", "model.quantization=4bit"], "grpo.tuning: lora trains adapters"),
    (["method=grpo", "train.packing=true"], "not method grpo"),
])
def test_method_option_refusals_are_config_errors(sets, message):
    """Combinations a method cannot run are refused when the recipe loads (config.py), before any model or data."""
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=sets)


def test_derived_facts_are_properties_of_the_config():
    """The quantization a run trains on and whether a launch shards its weights are derived once, in config.py."""
    cfg = lambda *sets: load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=list(sets))  # noqa: E731
    assert cfg("method=qlora").quantization == "4bit"
    assert cfg("method=lora", "model.quantization=8bit").quantization == "8bit"
    assert cfg("method=lora").quantization == "none"
    assert cfg("method=dpo", "dpo.tuning=full").full_weights and not cfg("method=dpo").full_weights
    assert cfg("launch.strategy=zero3").launch.sharded and cfg("launch.strategy=fsdp").launch.sharded
    assert not cfg("launch.strategy=zero2").launch.sharded and not cfg().launch.sharded
