from pathlib import Path

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
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # validated configs are immutable
    with pytest.raises(UserError):
        load_config(write(tmp_path, "model: {name: x}\n"), ["train.lr"])


def test_bad_yaml_points_at_line(tmp_path):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, "model:\n  name: [unclosed\n"))
    assert "r.yaml:" in str(e.value)
