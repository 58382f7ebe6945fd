"""Issue 14, item 6: inputs that cannot hurt. Pickle weights and remote code are refused unless the recipe allows
them (and the remote code never runs); a PNG declaring 30,000 x 30,000 pixels and a path to ../../etc/passwd are
skipped rows, not crashes or reads; a secret in the environment is written nowhere in the run directory; arbitrary
recipes and --set values end in a clear error, never a traceback (property-based)."""

import json
import shutil
import struct
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmfit.config import DataConfig, ModelConfig, load_config
from vlmfit.errors import UserError


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tiny_dir():
    from vlmfit.models.tiny import tiny_path

    return Path(tiny_path("qwen2_vl"))


def test_pickle_weights_are_refused_unless_allowed(vlmfit, tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from vlmfit.models.load import load

    model = tmp_path / "pickled"
    shutil.copytree(tiny_dir, model)
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {model}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    code, out, err = vlmfit("train", recipe)
    assert code == 2 and "pickle files" in flat(err) and "model.allow_pickle: true" in flat(err), err
    assert not (tmp_path / "runs").exists()
    loaded = load(str(model), "float32", None, ModelConfig(name=str(model), allow_pickle=True))  # allowed: it loads
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration"


def test_remote_code_is_refused_and_never_runs(vlmfit, tiny_dir, tmp_path):
    model = tmp_path / "remote"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="my_vlm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                              "AutoModelForImageTextToText": "modeling_my.MyModel"})
    (model / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (model / "configuration_my.py").write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {model}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    for verb in (["train", recipe], ["doctor", recipe]):
        code, out, err = vlmfit(*verb)
        assert code == 2 and "needs its own Python code" in flat(err) and "model.trust_remote_code: true" in flat(err), err
    assert not marker.exists()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header declares width x height: what a decompression bomb looks like to a reader."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")


def test_a_30000_px_png_and_a_path_to_etc_passwd_are_skipped_rows(tmp_path):
    from helpers import digit_image
    from vlmfit.data.prepare import prepare

    d = tmp_path / "data"
    d.mkdir()
    (d / "bomb.png").write_bytes(png_declaring(30_000, 30_000))
    digit_image(0).save(d / "ok.png")
    rows = [{"image": "bomb.png", "question": "q", "answer": "a"},
            {"image": "../../etc/passwd", "question": "q", "answer": "a"},
            {"image": "/etc/passwd", "question": "q", "answer": "a"},
            {"image": "ok.png", "question": "q", "answer": "a"}]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare(DataConfig(source=str(d / "rows.jsonl"), task="vqa"), tmp_path / "out")
    assert report["kept"] == 1 and report["skipped"] == 3
    reasons = [json.loads(l)["reason"] for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert reasons[0].startswith("bomb.png is a decompression bomb")  # refused from its header, never decoded
    assert "escapes the dataset root" in reasons[1] and "escapes the dataset root" in reasons[2]


def test_a_secret_in_the_environment_is_written_nowhere_in_the_run(vlmfit, digits, tmp_path, monkeypatch):
    secret = "hf_vlmfitTEST0secret0value0do0not0write"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"):
        monkeypatch.setenv(var, secret)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: {{name: tiny:qwen2_vl}}
        data: {{source: {digits}, train_limit: 8, eval_limit: 4}}
        train: {{max_steps: 2, batch_size: 4, save_steps: 1, logging_steps: 1}}
        eval: {{modes: [constrained]}}
        output: {{dir: {tmp_path / 'runs'}, name: s}}
        """))
    code, out, err = vlmfit("train", recipe)
    assert code == 0, err
    files = [p for p in (tmp_path / "runs" / "s").rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files) and any(p.suffix == ".safetensors" for p in files)
    leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert not leaked


# -- property-based: arbitrary recipes and overrides --------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
keys = st.one_of(st.sampled_from(["model", "data", "train", "eval", "method", "lora", "dpo", "zo", "output", "name", "lr",
                                  "source", "epochs", "batch_size", "scope", "task"]), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_any_yaml_document_is_a_config_or_one_clear_error(tmp_path, doc):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        load_config(p)
    except UserError as e:
        assert e.render().strip()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64))
def test_any_bytes_as_a_recipe_file_are_a_config_or_one_clear_error(tmp_path, raw):
    p = tmp_path / "r.yaml"
    p.write_bytes(raw)
    try:
        load_config(p)
    except UserError as e:
        assert e.render().strip()


@settings(max_examples=300, deadline=None)
@given(items=st.lists(st.one_of(st.text(max_size=20),
                                st.builds(lambda k, v: f"{k}={v}",
                                          st.sampled_from(["train.lr", "model.name", "data", "train", "a.b.c", "", ".", "lora.r",
                                                           "eval.modes", "train.max_steps", "method"]),
                                          st.text(max_size=16))), max_size=4))
def test_any_set_overrides_are_a_config_or_one_clear_error(items):
    try:
        load_config(base={"model": {"name": "tiny:qwen2_vl"}}, overrides=items)
    except UserError as e:
        assert e.render().strip()


def test_a_processor_whose_image_token_the_model_does_not_know_is_refused_before_training(vlmfit, tiny_dir, tmp_path, digits):
    model = tmp_path / "mismatched"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    key = "image_token_id" if "image_token_id" in cfg else "image_token_index"
    cfg[key] = cfg[key] - 1  # weights that expect another token than the processor writes
    (model / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {model}}}\ndata: {{source: {digits}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    code, out, err = vlmfit("train", recipe)
    assert code == 2 and f"replaces token id {cfg[key]} with image features" in flat(err), err
    assert not (tmp_path / "runs").exists()
