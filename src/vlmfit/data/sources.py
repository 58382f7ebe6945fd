"""Readers for what users arrive with: JSONL / JSON / CSV / Parquet files, image folders (one subfolder per
class), Hugging Face `save_to_disk` directories and Parquet shards, hub dataset ids and vlmfit's builtin sets.
Each yields raw rows (dicts) one at a time, so a large source is never held in memory. Rows of `datasets`
sources come with their images undecoded ({"bytes", "path"} dicts, also inside lists) and class labels as names."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vlmfit.errors import UserError


@dataclass
class Source:
    kind: str  # jsonl | json | csv | parquet | imagefolder | hf_disk | parquet_dir | hub | builtin
    location: str
    base_dir: Path  # image paths in rows are relative to this
    root: Path  # image paths must stay inside this

    def rows(self) -> Iterator[tuple[int, dict | Exception]]:
        """(row number, row) pairs; a row that cannot even be parsed comes as an exception to be reported."""
        yield from enumerate(_READERS[self.kind](self))

    def class_names(self, column: str) -> list[str] | None:
        """The names of a ClassLabel column, in their order, for sources that declare one."""
        import datasets

        if self.kind not in _DATASETS:
            return None
        for split in _DATASETS[self.kind](self):
            feature = split.features.get(column)
            return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        return None


def open_source(source: str) -> Source:
    if source.startswith("builtin:"):
        from vlmfit.data.builtin import load_builtin

        load_builtin(source.split(":", 1)[1])  # an unknown name fails here, with the names there are
        return Source("builtin", source, Path.cwd(), Path.cwd())
    p = Path(source).expanduser()
    if p.is_file():
        kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}.get(p.suffix.lower())
        if kind is None:
            raise UserError(f"unsupported file type '{p.suffix}'", where=source, hint="use .jsonl, .json, .csv, .tsv or .parquet")
        return Source(kind, str(p), p.parent, p.parent)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return Source("hf_disk", str(p), p, p)
        if any(p.rglob("*.parquet")):
            return Source("parquet_dir", str(p), p, p)
        if any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
            return Source("imagefolder", str(p), p, p)
        raise UserError("directory is not a dataset: no class subfolders, Parquet shards or save_to_disk files", where=source)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return Source("hub", source, Path.cwd(), Path.cwd())
    from vlmfit.data.builtin import BUILTIN

    raise UserError("data source not found", where=source,
                    hint="give a file, a directory, a hub dataset id (owner/name) or one of "
                         + ", ".join(f"builtin:{k}" for k in BUILTIN))


def _jsonl(src: Source):
    with open(src.location, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                yield ValueError(f"line {line_no} is empty")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield ValueError(f"line {line_no} is not valid JSON ({e.msg})")
                continue
            yield row if isinstance(row, dict) else ValueError(f"line {line_no} is not a JSON object")


def _json(src: Source):
    try:
        doc = json.loads(Path(src.location).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg}, line {e.lineno})", where=src.location) from None
    rows = doc.get("data", doc.get("rows")) if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise UserError("a JSON source must be a list of objects (or {\"data\": [...]})", where=src.location)
    for row in rows:
        yield row if isinstance(row, dict) else ValueError("not a JSON object")


def _csv(src: Source):
    with open(src.location, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, delimiter="\t" if src.location.endswith(".tsv") else ",")


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        yield from batch.to_pylist()


def _parquet(src: Source):
    yield from _parquet_file(src.location)


def _parquet_dir(src: Source):
    for path in sorted(Path(src.location).rglob("*.parquet")):
        yield from _parquet_file(str(path))


def _imagefolder(src: Source):
    root = Path(src.location)
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                yield {"image": str(f.relative_to(root)), "label": class_dir.name}


def _datasets_rows(ds):
    import datasets

    # Undecoded images (top level and inside lists): validation wants the bytes, and decodes each image once.
    # Class labels as their names: a label is what the model learns to say, not an index into a hidden list.
    names = {k: f for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    for row in ds.to_iterable_dataset().decode(False):
        for k, f in names.items():
            if isinstance(row.get(k), int) and row[k] >= 0:
                row[k] = f.int2str(row[k])
        yield row


def _disk_splits(src: Source) -> list:
    import datasets

    d = datasets.load_from_disk(src.location)
    return list(d.values()) if isinstance(d, datasets.DatasetDict) else [d]


def _hub_splits(src: Source) -> list:
    import datasets

    try:
        return list(datasets.load_dataset(src.location).values())
    except Exception as e:  # the hub client raises many types; the user needs the id and the reason
        raise UserError(f"could not load hub dataset: {str(e).splitlines()[0]}", where=src.location,
                        hint="check the id and your network (HF_DATASETS_OFFLINE=1 reads the cache only)") from None


def _builtin_splits(src: Source) -> list:
    from vlmfit.data.builtin import load_builtin

    return list(load_builtin(src.location.split(":", 1)[1]).values())


_DATASETS = {"hf_disk": _disk_splits, "hub": _hub_splits, "builtin": _builtin_splits}


def _datasets_source(src: Source):
    for split in _DATASETS[src.kind](src):
        yield from _datasets_rows(split)


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "parquet_dir": _parquet_dir,
            "imagefolder": _imagefolder, **dict.fromkeys(_DATASETS, _datasets_source)}

# Column names tried, in order, when the recipe does not name them.
AUTO_COLUMNS = {
    "image": ("image", "images", "image_path", "img", "file", "file_name", "filename", "path"),
    "video": ("video", "video_path", "clip"),
    "question": ("question", "query", "prompt", "instruction"),
    "answer": ("answer", "answers", "caption", "response", "output", "text"),
    "label": ("label", "labels", "class", "category"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
    "messages": ("messages", "conversations"),
}


def detect_column(keys: list[str], role: str, given: str | None) -> str | None:
    if given:
        return given
    lower = {k.lower(): k for k in keys}
    return next((lower[c] for c in AUTO_COLUMNS[role] if c in lower), None)
