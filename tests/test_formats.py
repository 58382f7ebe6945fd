"""Issue 18: the standard VLM dataset formats. The same chat rows in every container (JSONL, Parquet file, Parquet
shards, save_to_disk Dataset and DatasetDict) and every image encoding (path, bytes, {"bytes", "path"} dict, decoded
datasets Image, one image or a list) prepare to identical canonical rows; hub spellings of messages (ShareGPT,
"<image>" strings, TRL's plain strings, prompt/completion) map to the typed rows; builtin sources prepare; a source
with no usable row is one clear error. (Hub ids go through the same datasets reader; they need the network, so
they are not exercised here.)"""

import io
import json
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlmfit.config import DataConfig
from vlmfit.data.prepare import prepare
from vlmfit.errors import UserError

from helpers import digit_image

N = 20
MESSAGE = datasets.List({"role": datasets.Value("string"),
                         "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})})


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def n_images(i: int) -> int:
    return 2 if i % 5 == 0 else 1  # some rows compare two digits


def typed_messages(i: int) -> list[dict]:
    user = [{"type": "image", "text": None}] * n_images(i) + [{"type": "text", "text": f"Which digit is this? ({i})"}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": f"digit {i % 10}"}]}]


def images_of(i: int) -> list:
    return [digit_image(i * 37 + k) for k in range(n_images(i))]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """The rows' images as PNG files in a folder that every file-based container sits in."""
    root = tmp_path_factory.mktemp("formats")
    (root / "img").mkdir()
    names = {}
    for i in range(N):
        names[i] = []
        for k, img in enumerate(images_of(i)):
            name = f"img/r{i}_{k}.png"
            img.save(root / name)
            names[i].append(name)
    return root, names


def encode(encoding: str, i: int, names: dict, unwrap: bool = True):
    """Row i's image column value in one encoding; with unwrap, a single image is not wrapped in a list."""
    if encoding == "path":
        values = names[i]
    elif encoding == "dict-path":
        values = [{"bytes": None, "path": n} for n in names[i]]
    elif encoding == "bytes":
        values = [png(img) for img in images_of(i)]
    elif encoding == "dict-bytes":
        values = [{"bytes": png(img), "path": None} for img in images_of(i)]
    else:
        raise AssertionError(encoding)
    return values[0] if unwrap and len(values) == 1 else values


def prepared_rows(out) -> dict:
    """source_row -> (split, messages, pixel arrays): what a canonical dataset holds, images decoded."""
    d = datasets.load_from_disk(str(out))
    return {r["source_row"]: (split, r["messages"], [np.asarray(im).tolist() for im in r["images"]])
            for split, ds in d.items() for r in ds}


def run(source, out, **kw):
    report = prepare(DataConfig(source=str(source), task="chat", **kw), out)
    assert report["kept"] == report["input_rows"] == N, report
    return report, prepared_rows(out)


@pytest.fixture(scope="module")
def reference(image_files, tmp_path_factory):
    """The rows as JSONL with lists of image paths: the format that already worked."""
    root, names = image_files
    with open(root / "ref.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({"messages": typed_messages(i), "images": names[i]}) + "\n")
    report, rows = run(root / "ref.jsonl", tmp_path_factory.mktemp("ref") / "out")
    assert sum(len(r[2]) for r in rows.values()) == sum(n_images(i) for i in range(N))
    assert report["message_formats"] == {"typed": N}
    return rows


@pytest.mark.parametrize("encoding", ["path", "dict-path"])
def test_jsonl_image_encodings(image_files, reference, tmp_path, encoding):
    root, names = image_files
    src = root / f"{encoding}.jsonl"
    src.write_text("".join(json.dumps({"messages": typed_messages(i), "images": encode(encoding, i, names)}) + "\n" for i in range(N)))
    assert run(src, tmp_path / "out")[1] == reference


@pytest.mark.parametrize("encoding", ["path", "bytes", "dict-bytes", "dict-path"])
def test_parquet_file_and_shards(image_files, reference, tmp_path, encoding):
    root, names = image_files
    # a Parquet column has one type: lists throughout (a one-image column is tested with the datasets containers)
    rows = [{"messages": typed_messages(i), "images": encode(encoding, i, names, unwrap=False)} for i in range(N)]
    pq.write_table(pa.Table.from_pylist(rows), root / f"{encoding}.parquet")
    assert run(root / f"{encoding}.parquet", tmp_path / "file")[1] == reference
    shards = root / f"shards-{encoding}"
    shutil.copytree(root / "img", shards / "img")  # paths in shards are relative to the dataset directory
    (shards / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:7]), shards / "data" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:]), shards / "data" / "part-1.parquet")
    assert run(shards, tmp_path / "shards")[1] == reference


def test_save_to_disk_dataset_with_a_list_of_decoded_images(reference, tmp_path):
    """The issue's case: TRL's / the hub's layout, a messages column beside images = List(Image())."""
    features = datasets.Features({"messages": MESSAGE, "images": datasets.List(datasets.Image())})
    rows = [{"messages": typed_messages(i), "images": images_of(i)} for i in range(N)]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "disk"))
    report, got = run(tmp_path / "disk", tmp_path / "out")
    assert report["source_kind"] == "hf_disk" and got == reference
    bad = rows[:1] + [{"messages": typed_messages(1), "images": []}]
    datasets.Dataset.from_list(bad, features=features).save_to_disk(str(tmp_path / "bad"))
    # strict mode stops at the bad row (before the fix it stopped at row 0, the images being unreadable)
    with pytest.raises(UserError, match="row 1: messages: 1 image placeholders but 0 images"):
        prepare(DataConfig(source=str(tmp_path / "bad"), task="chat", strict=True), tmp_path / "strict")


def test_save_to_disk_datasetdict_single_image_feature_and_binary(reference, tmp_path):
    """A DatasetDict (train / test) whose one-image rows use a plain Image() column and two-image rows bytes."""
    features = datasets.Features({"messages": MESSAGE, "image": datasets.Image()})
    single = [i for i in range(N) if n_images(i) == 1]
    double = [i for i in range(N) if n_images(i) == 2]
    one = datasets.Dataset.from_list([{"messages": typed_messages(i), "image": images_of(i)[0]} for i in single], features=features)
    datasets.DatasetDict({"train": one.select(range(10)), "test": one.select(range(10, len(one)))}).save_to_disk(str(tmp_path / "dd"))
    report, got = run_partial(tmp_path / "dd", tmp_path / "out", len(single))
    # prepare numbers rows in reading order; map them back to the original row ids
    assert [got[k] for k in sorted(got)] == [("train", *reference[i][1:]) for i in single]
    two = datasets.Dataset.from_list([{"messages": typed_messages(i), "images": [png(im) for im in images_of(i)]} for i in double],
                                     features=datasets.Features({"messages": MESSAGE, "images": datasets.List(datasets.Value("binary"))}))
    two.save_to_disk(str(tmp_path / "bin"))
    _, got = run_partial(tmp_path / "bin", tmp_path / "out2", len(double))
    assert [got[k] for k in sorted(got)] == [("train", *reference[i][1:]) for i in double]


def run_partial(source, out, n):
    report = prepare(DataConfig(source=str(source), task="chat", val_fraction=0.0, test_fraction=0.0), out)
    assert report["kept"] == report["input_rows"] == n, report
    return report, prepared_rows(out)


def test_a_prepared_dataset_resaved_as_one_dataset_prepares_again_without_loss(image_files, reference, tmp_path):
    root, _ = image_files
    prepare(DataConfig(source=str(root / "ref.jsonl"), task="chat"), tmp_path / "first")
    first = datasets.load_from_disk(str(tmp_path / "first"))
    whole = datasets.concatenate_datasets([first[s] for s in ("train", "validation", "test")]).sort("source_row")
    whole.remove_columns("source_row").save_to_disk(str(tmp_path / "resaved"))
    report, again = run(tmp_path / "resaved", tmp_path / "second")
    assert [v[1:] for _, v in sorted(again.items())] == [v[1:] for _, v in sorted(reference.items())]
    assert report["message_formats"] == {"typed": N}


# -- hub spellings of the messages ----------------------------------------------------------------------------
def spelled(i: int, how: str) -> dict:
    q, a = f"Which digit is this? ({i})", f"digit {i % 10}"
    if how == "placeholders":
        return {"messages": [{"role": "user", "content": "<image>\n" * n_images(i) + q}, {"role": "assistant", "content": a}]}
    if how == "sharegpt":
        return {"conversations": [{"from": "human", "value": "<image>" * n_images(i) + q}, {"from": "gpt", "value": a}]}
    if how == "plain":  # TRL: no placeholder, the images go before the first user text
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    if how == "prompt-completion":  # TRL's conversational prompt / completion columns
        m = typed_messages(i)
        return {"prompt": m[:1], "completion": m[1:]}
    raise AssertionError(how)


@pytest.mark.parametrize("how, counted", [("placeholders", "<image> placeholders"), ("sharegpt", "sharegpt"),
                                          ("plain", "plain text"), ("prompt-completion", "typed")])
def test_hub_message_spellings_map_to_the_typed_rows(image_files, reference, tmp_path, how, counted):
    root, names = image_files
    src = root / f"{how}.jsonl"
    src.write_text("".join(json.dumps({**spelled(i, how), "images": names[i]}) + "\n" for i in range(N)))
    report, got = run(src, tmp_path / "out")
    assert got == reference
    assert report["message_formats"] == {counted: N}
    assert f"chat rows read as: {counted} {N}" in (tmp_path / "out" / "prepare_report.md").read_text()


def test_spelling_problems_are_skipped_with_their_reason(image_files, tmp_path):
    root, names = image_files
    rows = [
        {"messages": [{"from": "narrator", "value": "<image>hi"}, {"from": "gpt", "value": "x"}], "images": names[1]},
        {"messages": [{"role": "user", "content": "<image><image>two?"}, {"role": "assistant", "content": "y"}], "images": names[1]},
        {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "z"}], "images": names[1]},
        {"messages": [{"role": "user", "content": "<image>only a question"}], "images": names[1]},
        {"messages": spelled(2, "sharegpt")["conversations"], "images": names[2]},  # ShareGPT turns, kept
        {"conversations": spelled(3, "sharegpt")["conversations"], "images": names[3]},
    ]
    src = root / "problems.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = prepare(DataConfig(source=str(src), task="chat"), tmp_path / "out")
    assert report["kept"] == 1 and report["skipped"] == 5
    reasons = [json.loads(l)["reason"] for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert reasons[0].startswith("unknown role 'narrator'")
    assert reasons[1] == "2 image placeholders but 1 images"
    assert reasons[2].startswith("content part of type 'video'")
    assert reasons[3] == "no assistant turn to learn from"
    assert reasons[4] == "missing column 'messages'"  # columns are the first row's


# -- builtin sources and sources that keep nothing, through the CLI -----------------------------------------
def test_prepare_accepts_builtin_sources_in_the_dataset_class_order(vlmfit, tmp_path):
    code, out, err = vlmfit("prepare", "builtin:mnist-inverted", "--task", "classification", "--out", tmp_path / "m")
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "prepare_report.json").read_text())
    assert report["input_rows"] == report["kept"] == 5000 and report["source_kind"] == "builtin"
    assert report["classes"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert list(report["per_class"]) == report["classes"] and sum(report["per_class"].values()) == 5000
    row = datasets.load_from_disk(str(tmp_path / "m"))["train"][0]
    assert row["messages"][-1]["content"][0]["text"] in report["classes"]  # a name, not a ClassLabel index
    code, out, err = vlmfit("prepare", "builtin:mnsit", "--out", tmp_path / "x")
    assert code == 2 and "did you mean 'builtin:mnist'" in err and "Traceback" not in out + err


def test_a_source_with_no_usable_row_is_one_clear_error(vlmfit, image_files, tmp_path):
    root, _ = image_files
    src = root / "all-bad.jsonl"
    src.write_text("".join(json.dumps({"messages": typed_messages(i), "images": [f"img/missing{i}.png"] * n_images(i)}) + "\n"
                           for i in range(N)))
    code, out, err = vlmfit("prepare", src, "--task", "chat", "--out", tmp_path / "o")
    text = " ".join((out + err).split())  # rich wraps long lines
    assert code == 2 and "Traceback" not in text, text
    assert f"0 of {N} rows kept" in text and f"image file not found ({N})" in text
    assert "skipped.jsonl" in text and len((tmp_path / "o" / "skipped.jsonl").read_text().splitlines()) == N
    # the failed attempt left only skipped.jsonl: once the rows are fixed, the same --out is accepted
    src.write_text((root / "ref.jsonl").read_text())
    code, out, err = vlmfit("prepare", src, "--task", "chat", "--out", tmp_path / "o")
    assert code == 0, err
    # and a recipe that trains on the bad source stops with the same message before loading any weights
    src.write_text("".join(json.dumps({"messages": typed_messages(i), "images": ["img/missing.png"] * n_images(i)}) + "\n"
                           for i in range(N)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny:qwen2_vl}}\ndata: {{source: {src}, task: chat}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    code, out, err = vlmfit("train", recipe)
    text = " ".join((out + err).split())
    assert code == 2 and f"0 of {N} rows kept" in text and "Traceback" not in text, text


def test_an_empty_split_is_reported_and_training_on_it_refused(vlmfit, image_files, tmp_path):
    root, names = image_files
    src = root / "three.jsonl"
    src.write_text("".join(json.dumps({"messages": typed_messages(i), "images": names[i]}) + "\n" for i in (1, 2, 3)))
    code, out, err = vlmfit("prepare", src, "--task", "chat", "--out", tmp_path / "p", "--set", "test_fraction=0.0",
                            "--set", "val_fraction=0.0")
    text = " ".join((out + err).split())
    assert code == 0 and "empty splits: test (" in text and "warning: empty split: test" in text, text
    assert "validation" not in text.split("empty splits:")[1].split("(")[0]  # asked for none: not a warning
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny:qwen2_vl}}\ndata: {{source: {tmp_path / 'p'}}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    code, out, err = vlmfit("train", recipe)
    text = " ".join((out + err).split())
    assert code == 2 and "empty) 'test' split" in text and "Traceback" not in text, text
