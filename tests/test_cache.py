"""Every cache is keyed by what its entries depend on (issue 29): the encoded-example cache by the serialized
tokenizer and processor, the family's facts, vlmfit's code and the library versions; the prepared data by the
files it reads, so a grown folder, an image overwritten in place or a rewritten annotation file prepares again,
through `vlmfit train` too; `vlmfit doctor` says per cache whether a run would hit, and why not."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from vlmfit import cache
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.chat.rows import EncodedCache, RowCollator, processor_fingerprint
from vlmfit.chat.schema import chat_example
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load_processor
from vlmfit.models.tiny import tiny_path

from helpers import digit_image

PREPARING_AGAIN = "data changed since the cached preparation: preparing again"


def test_the_cache_root_and_what_the_code_fingerprint_covers(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path))
    assert cache.cache_dir("encoded") == tmp_path / "encoded" and cache.cache_dir("tiny", "/x") == Path("/x/tiny")
    monkeypatch.delenv("VLMFIT_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "vlmfit"
    with pytest.raises(ValueError, match="unknown cache"):
        cache.cache_dir("runs")
    files = {str(p.relative_to(cache.PACKAGE)) for p in cache.code_files()}
    # what labels, encodings, preparations and metrics read; not the CLI or the recipes above every cache
    assert {"chat/collate.py", "chat/schema.py", "chat/rows.py", "models/families.py", "models/loss.py",
            "data/prepare.py", "data/validate.py", "evaluate/tasks.py", "config.py"} <= files
    assert not {f for f in files if f == "cli.py" or f.startswith("train/")}
    assert {"transformers", "tokenizers", "Pillow", "datasets", "torch", "numpy"} <= set(cache.library_versions())


# -- the encoded-example cache: one test per cause ----------------------------------------------------------------
def _encoded_twice(tmp_path, make_chat):
    """(hits, misses) of encoding two examples with a fresh collator from make_chat(), before and after nothing."""
    exs = [chat_example("What digit is this?", "seven", [digit_image(0)]),
           chat_example("Which number is shown in the picture?", "two", [digit_image(5)])]
    counts = []
    for _ in range(2):
        chat = make_chat()
        rows = RowCollator(chat, EncodedCache(tmp_path / "encoded", processor_fingerprint(chat)))
        rows(exs)
        counts.append((rows.cache.hits, rows.cache.misses))
    return counts


@pytest.fixture
def model_dir(tmp_path):
    """A copy of the tiny Qwen2-VL whose tokenizer files the test may edit."""
    out = tmp_path / "model"
    shutil.copytree(tiny_path("qwen2_vl"), out)
    return out


def _chat(model_dir, family=FAMILIES["qwen2_vl"]):
    return lambda: VisionChatCollator(load_processor(str(model_dir)), family)


def test_an_unchanged_rerun_is_all_hits(tmp_path, model_dir):
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(2, 0), (2, 0)]  # the processor loaded anew: the same key


def test_a_tokenizer_edited_at_the_same_path_and_size_encodes_again(tmp_path, model_dir):
    path = model_dir / "tokenizer.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc, indent=1))  # one layout for the file before and after the edit
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]
    merges = doc["model"]["merges"]
    i, j = next((i, j) for i in range(len(merges)) for j in range(i + 1, len(merges))
                if merges[i] != merges[j] and len(json.dumps(merges[i])) == len(json.dumps(merges[j])))
    merges[i], merges[j] = merges[j], merges[i]  # other merge priorities, the same bytes count
    size, stamp = path.stat().st_size, path.stat().st_mtime_ns
    path.write_text(json.dumps(doc, indent=1))
    os.utime(path, ns=(stamp, stamp))
    assert path.stat().st_size == size
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]


def test_a_special_token_change_encodes_again(tmp_path, model_dir):
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "pad_token": "<|im_start|>"}))  # same vocabulary, same length
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]


def test_a_family_facts_change_encodes_again(tmp_path, model_dir):
    family = FAMILIES["qwen2_vl"]
    assert _encoded_twice(tmp_path, _chat(model_dir, family)) == [(0, 2), (2, 0)]
    other = dataclasses.replace(family, assistant_start=family.assistant_start.rstrip("\n"))  # the same family name
    assert _encoded_twice(tmp_path, _chat(model_dir, other)) == [(0, 2), (2, 0)]


def test_a_library_version_change_encodes_again(tmp_path, model_dir, monkeypatch):
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]
    monkeypatch.setattr(cache, "library_versions", lambda: {"tokenizers": "0.0.1"})
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]


def test_a_code_change_encodes_again(tmp_path, model_dir, monkeypatch):
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "edited")
    assert _encoded_twice(tmp_path, _chat(model_dir)) == [(0, 2), (2, 0)]


# -- the evaluation cache -------------------------------------------------------------------------------------------
def test_evaluations_are_keyed_by_the_tokenizer_code_and_libraries(vlmfit, digits, tmp_path, model_dir, monkeypatch):
    from vlmfit.evaluate import eval as ev

    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(ev, "evaluate_chat", lambda cfg, run, console: calls.append(1) or {"n": 1})  # the key is tested

    def evaluations(*extra):
        code, _, err = vlmfit("eval", model_dir, "--set", f"data.source={digits}", *extra)
        assert code == 0, err
        return len(calls)

    assert evaluations() == 1 and evaluations() == 1
    path = model_dir / "tokenizer_config.json"
    size, stamp = path.stat().st_size, path.stat().st_mtime_ns
    path.write_text(path.read_text().replace('"pad_token": "<|endoftext|>"', '"pad_token": "<|im_start|>" '))
    os.utime(path, ns=(stamp, stamp))  # the same size and mtime: only the content says it changed
    assert path.stat().st_size == size
    assert evaluations() == 2 and evaluations() == 2
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "edited")
    assert evaluations() == 3
    monkeypatch.setattr(cache, "library_versions", lambda: {"transformers": "0.0.1"})
    assert evaluations() == 4 and evaluations() == 4


# -- the prepared data: the three stale cases, through `vlmfit train` ---------------------------------------------
def _train(vlmfit, tmp_path, source, name, *sets):
    """`vlmfit train` of a one-step recipe on `source`: (stderr, the run's summary)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: {tiny_path('qwen2_vl')}}}\nmethod: full\ndata: {{source: {source}}}\n")
    code, out, err = vlmfit("train", recipe, "--set", f"output.dir={tmp_path / 'runs'}", "--set", f"output.name={name}",
                            "--set", "train.max_steps=1", "--set", "train.batch_size=1", "--set", "eval.before=false",
                            "--set", "eval.after=false", "--set", "output.save_model=false", "--set", "data.test_fraction=0.25",
                            "--set", "data.val_fraction=0", *sets)
    assert code == 0, err
    return " ".join(err.split()), json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def _examples(summary):
    return summary["train_examples"] + summary["test_examples"]


def _digits(folder, start, n):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        digit_image(i * 7).save(folder / f"d{i}.png")


def test_a_grown_image_folder_prepares_again_through_train(vlmfit, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))
    for cls in ("even", "odd"):
        _digits(tmp_path / "folder" / cls, 0, 4)
    err, first = _train(vlmfit, tmp_path, tmp_path / "folder", "a")
    assert PREPARING_AGAIN not in err
    for cls in ("even", "odd"):  # new files in the class folders: the folder's own mtime does not change
        _digits(tmp_path / "folder" / cls, 4, 3)
    err, grown = _train(vlmfit, tmp_path, tmp_path / "folder", "b")
    assert (_examples(first), _examples(grown)) == (8, 14)
    assert f"{PREPARING_AGAIN} (6 files added)" in err


def test_an_image_overwritten_in_place_and_a_rewritten_annotation_file_prepare_again_through_train(vlmfit, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))
    _digits(tmp_path / "data" / "img", 0, 6)
    rows = [{"image": f"img/d{i}.png", "question": "Which digit?", "answer": f"digit {i}"} for i in range(6)]
    annotations = tmp_path / "data" / "qa.jsonl"
    annotations.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sets = ("--set", "data.task=vqa")
    err, _ = _train(vlmfit, tmp_path, annotations, "a", *sets)
    assert "preparing again" not in err
    digit_image(4321).save(tmp_path / "data" / "img" / "d2.png")  # other pixels under the same name
    err, _ = _train(vlmfit, tmp_path, annotations, "b", *sets)
    assert f"{PREPARING_AGAIN} (1 file changed)" in err
    stamp = annotations.stat().st_mtime_ns
    annotations.write_text(annotations.read_text().replace("digit 5", "digit 6"))  # the same size ...
    os.utime(annotations, ns=(stamp, stamp))  # ... and mtime: only the content says it changed
    err, _ = _train(vlmfit, tmp_path, annotations, "c", *sets)
    assert f"{PREPARING_AGAIN} (1 file changed)" in err


# -- doctor -----------------------------------------------------------------------------------------------------
def test_doctor_says_per_cache_whether_the_run_would_hit_and_why_not(vlmfit, tmp_path, monkeypatch):
    from vlmfit.config import DataConfig
    from vlmfit.data.prepare import load_dataset_source

    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))
    for cls in ("even", "odd"):
        _digits(tmp_path / "folder" / cls, 0, 4)
    load_dataset_source(DataConfig(source=str(tmp_path / "folder"), test_fraction=0.25))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: {tiny_path('qwen2_vl')}}}\nmethod: full\n"
                      f"data: {{source: {tmp_path / 'folder'}, test_fraction: 0.25}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")

    def doctor():
        code, out, err = vlmfit("doctor", recipe, "--samples", "2", "--json")
        assert code == 0, err
        return {c["name"]: c["detail"] for c in json.loads(out)["checks"]}

    checks = doctor()
    assert checks["prepared data"].startswith("hit")
    assert checks["encoded examples"].startswith("miss — nothing is encoded")
    assert "miss" in checks["evaluations"] and "never evaluated" in checks["evaluations"]
    _digits(tmp_path / "folder" / "odd", 4, 25)
    assert doctor()["prepared data"] == "miss — 25 files added since the cached preparation"
