"""The docs stay true: the recipe reference is the schema's own text (regenerated, not edited), and every key has a
description."""

import re
from pathlib import Path

from vlmfit.config import recipe_reference

REFERENCE = Path(__file__).parents[1] / "docs" / "recipe-reference.md"


def test_recipe_reference_is_up_to_date():
    assert REFERENCE.read_text() == recipe_reference(), (
        "docs/recipe-reference.md is out of date: regenerate it with the command at its top")


def test_every_recipe_key_is_described():
    rows = [line for line in recipe_reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 120  # every section's keys, the reward entries' too
    empty = [row.split("|")[1].strip() for row in rows if not row.rstrip(" |").split("|")[-1].strip()]
    assert not empty, empty
    for key in ("`grpo.rewards[].fn`", "`train.activation_offload`", "`model.per_layer_embeddings`", "`method`"):
        assert any(row.startswith(f"| {key} ") for row in rows), key


def test_every_shipped_recipe_key_is_in_the_reference():
    import yaml

    keys = {m.group(1) for m in re.finditer(r"^\| `([^`]+)`", recipe_reference(), re.M)}
    for recipe in (Path(__file__).parents[1] / "src" / "vlmfit" / "recipes").glob("*.yaml"):
        doc = yaml.safe_load(recipe.read_text())
        for section, body in doc.items():
            for key in (body if isinstance(body, dict) else {section: None}):
                name = f"{section}.{key}" if isinstance(body, dict) else section
                assert name in keys, (recipe.name, name)
