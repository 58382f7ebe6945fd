"""`vlmfit prepare`: any supported source -> canonical dataset (chat or preference format) with seeded
train / validation / test splits, saved to disk with a report. Every input row is either kept or listed as
skipped with its reason; kept + skipped == input rows, always. Rows stream through (memory stays flat)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from vlmfit import cache
from vlmfit.config import DataConfig
from vlmfit.chat.schema import ROW, count_image_parts, image_part, text_part
from vlmfit.data.messages import canonical_messages
from vlmfit.data.sources import Source, detect_column, open_source
from vlmfit.data.validate import RowProblem, load_image, require_text
from vlmfit.errors import UserError

SPLITS = ("train", "validation", "test")
DEFAULT_PROMPTS = {
    "classification": "What is shown in this image? Answer with one of: {classes}.",
    "vqa": "{question}",
    "caption": "Describe this image.",
    "preference": "{question}",
}
SIZE_BUCKETS = (64, 128, 256, 512, 1024, 2048)


def _features(task: str, classes: list[str] | None, video: str | None = None):
    """Columns of the prepared dataset. video: None, "video" (kept as a video input) or "frames" (split into images)."""
    import datasets

    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    messages = datasets.List({"role": datasets.Value("string"), "content": content})
    cols = {"images": datasets.List(datasets.Image()), ROW: datasets.Value("int64"), "split": datasets.Value("string")}
    if task == "preference":
        cols.update(prompt=messages, chosen=messages, rejected=messages)
    else:
        cols["messages"] = messages
    if task == "classification":
        cols["label"] = datasets.ClassLabel(names=classes)
    if video == "video":
        cols["videos"] = datasets.List(datasets.List(datasets.Image()))
        cols["video_meta"] = datasets.List({"fps": datasets.Value("float64"), "duration": datasets.Value("float64"),
                                            "timestamps": datasets.List(datasets.Value("float64"))})
    elif video == "frames":
        cols["frame_timestamps"] = datasets.List(datasets.Value("float64"))
    return datasets.Features(cols)


class _Columns:
    """The source's column for each role, from the recipe or auto-detected from the first row."""

    def __init__(self, cfg: DataConfig, keys: list[str]):
        self.video = detect_column(keys, "video", cfg.video_column)
        self.image = None if self.video else detect_column(keys, "image", cfg.image_column)
        self.question = detect_column(keys, "question", cfg.question_column)
        self.label = detect_column(keys, "label", cfg.label_column)
        self.answer = detect_column(keys, "answer", cfg.answer_column)
        self.chosen = detect_column(keys, "chosen", cfg.chosen_column)
        self.rejected = detect_column(keys, "rejected", cfg.rejected_column)
        self.messages = detect_column(keys, "messages", cfg.messages_column)
        chat_pair = cfg.task == "chat" and {"prompt", "completion"} <= set(keys)
        self.prompt, self.completion = ("prompt", "completion") if chat_pair else (None, None)
        named = {k: getattr(cfg, f"{k}_column") for k in ("image", "video", "question", "label", "answer", "chosen", "rejected", "messages")}
        missing = [f"{k}_column={v!r}" for k, v in named.items() if v and v not in keys]
        if missing:
            raise UserError(f"column not in the source: {', '.join(missing)}", where="data",
                            hint=f"the source has: {', '.join(keys)}")


def _label_of(row: dict, cols: _Columns) -> str:
    return require_text(row, cols.label or cols.answer, "label")


def _scan_classes(src: Source, cols_of, cfg: DataConfig) -> list[str]:
    """Classification without data.classes: one cheap pass over the labels (no images decoded)."""
    seen, column = set(), None
    for _, row in src.rows():
        if isinstance(row, dict):
            cols = cols_of(row)
            column = cols.label or cols.answer
            try:
                seen.add(_label_of(row, cols))
            except RowProblem:
                pass
    if not seen:
        raise UserError("no labels found in the source", where="data.label_column", hint="name the label column")
    declared = src.class_names(column) if column else None
    if declared and seen <= set(declared):
        return [c for c in declared if c in seen]  # the dataset's own order (zero..nine, not eight, five, ...)
    return sorted(seen)


def _images(row: dict, cols: _Columns, src: Source, cfg: DataConfig, fixes: Counter, sizes: Counter) -> tuple[list[bytes], list[str]]:
    if cols.image is None or cols.image not in row:
        raise RowProblem(cols.image or "image", f"missing column '{cols.image or 'image'}'")
    value = row[cols.image]
    values = value if isinstance(value, list) else [value]
    out, digests = [], []
    for v in values:
        img = load_image(v, src.base_dir, src.root, cols.image, cfg.max_image_pixels)
        for f in img.fixes:
            fixes[f] += 1
        side = max(img.size)
        sizes[next((f"<={b}" for b in SIZE_BUCKETS if side <= b), f">{SIZE_BUCKETS[-1]}")] += 1
        out.append(img.data)
        digests.append(hashlib.sha1(img.data).hexdigest())
    return out, digests


def _user(n_images: int, text: str) -> dict:
    return {"role": "user", "content": [image_part() for _ in range(n_images)] + [text_part(text)]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [text_part(text)]}


def _chat_messages(row: dict, cols: _Columns, n_images: int) -> tuple[list[dict], str]:
    if cols.messages:
        raw, column = row.get(cols.messages), cols.messages
        if column not in row:  # columns come from the first row; a JSONL row may differ
            raise RowProblem(column, f"missing column '{column}'")
    elif cols.prompt and cols.completion:  # TRL's conversational prompt / completion columns
        column = f"{cols.prompt}+{cols.completion}"
        prompt, completion = row.get(cols.prompt), row.get(cols.completion)
        raw = prompt + completion if isinstance(prompt, list) and isinstance(completion, list) else None
    else:
        raise RowProblem("messages", "no messages column (nor prompt / completion message lists)")
    messages, spelling = canonical_messages(raw, n_images, column)
    placeholders = count_image_parts(messages)
    if placeholders != n_images:
        raise RowProblem(column, f"{placeholders} image placeholders but {n_images} images")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem(column, "no assistant turn to learn from")
    if any(m["role"] == "assistant" and not "".join(p["text"] or "" for p in m["content"]).strip() for m in messages):
        raise RowProblem(column, "empty assistant turn")
    return messages, spelling


def _convert(row: dict, cols: _Columns, src: Source, cfg: DataConfig, classes, prompt: str, fixes: Counter, sizes: Counter):
    """One raw row -> canonical fields and a duplicate key; RowProblem when it cannot be used."""
    if cols.video:
        return _convert_video(row, cols, src, cfg, prompt)
    images, digests = _images(row, cols, src, cfg, fixes, sizes)
    system = [{"role": "system", "content": [text_part(cfg.system)]}] if cfg.system else []
    if cfg.task == "chat":
        msgs, spelling = _chat_messages(row, cols, len(images))
        return {"messages": msgs, "images": images, "_format": spelling}, json.dumps([msgs, digests])
    if cfg.task == "classification":
        label = _label_of(row, cols)
        if label not in classes:
            raise RowProblem(cols.label or cols.answer, f"unknown class '{label}' (classes: {', '.join(classes)})")
        question = prompt.format(classes=", ".join(classes), question="")
        out = {"messages": system + [_user(len(images), question), _assistant(label)], "images": images, "label": label}
        return out, json.dumps([digests, label])
    question = require_text(row, cols.question, "question") if "{question}" in prompt else ""
    text = prompt.format(question=question, classes=", ".join(classes or []))
    if cfg.task == "preference":
        chosen = require_text(row, cols.chosen, "chosen answer")
        rejected = require_text(row, cols.rejected, "rejected answer")
        if chosen == rejected:
            raise RowProblem(cols.rejected, "chosen and rejected answers are identical")
        out = {"prompt": system + [_user(len(images), text)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)], "images": images}
        return out, json.dumps([digests, text, chosen, rejected])
    answer = require_text(row, cols.answer, "answer")
    return {"messages": system + [_user(len(images), text), _assistant(answer)], "images": images}, json.dumps([digests, text, answer])


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _convert_video(row: dict, cols: _Columns, src: Source, cfg: DataConfig, prompt: str):
    """A video row -> one example with a video input, or (data.frames_per_example) several image examples."""
    from vlmfit.data.video import sample_frames, split_frames, video_example
    from vlmfit.models.families import video_frame_multiple

    value = row.get(cols.video)
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(cols.video, "no video path")
    path = (src.base_dir / value).resolve()
    if not path.is_relative_to(src.root.resolve()):
        raise RowProblem(cols.video, f"path '{value}' escapes the dataset root {src.root}")
    if not path.is_file():
        raise RowProblem(cols.video, f"video file not found: {value}")
    try:
        # One prepared set serves every model: a frame count that fills each family's temporal patches (Qwen's pairs).
        video = sample_frames(path, fps=cfg.video_fps, max_frames=cfg.video_max_frames, multiple_of=video_frame_multiple())
    except UserError as e:
        raise RowProblem(cols.video, e.what) from None
    question = require_text(row, cols.question, "question") if "{question}" in prompt else ""
    text = prompt.format(question=question, classes="")
    answer = require_text(row, cols.answer, "answer")
    ex = video_example(text, answer, video, system=cfg.system)
    key = json.dumps([str(path), text, answer])
    if cfg.frames_per_example:
        parts = split_frames(ex, cfg.frames_per_example)
        return [{"messages": p["messages"], "images": [_png(f) for f in p["images"]], "frame_timestamps": p["frame_timestamps"]}
                for p in parts], key
    meta = {"fps": video.source_fps, "duration": video.duration, "timestamps": list(video.timestamps)}
    return {"messages": ex["messages"], "images": [], "videos": [[_png(f) for f in video.frames]], "video_meta": [meta]}, key


def _split_of(seed: int, row: int, cfg: DataConfig) -> str:
    u = random.Random(f"{seed}:{row}").random()  # per-row and seeded: stable whatever else is skipped
    return "test" if u < cfg.test_fraction else "validation" if u < cfg.test_fraction + cfg.val_fraction else "train"


def _generate(src: Source, cfg: DataConfig, classes, prompt: str, stats: dict, skipped_path: str):
    """Yield canonical rows; write each skipped row (row, column, reason) to skipped.jsonl as it goes."""
    fixes, sizes, per_split, per_class, reasons, examples, formats = (Counter() for _ in range(7))
    seen: set[bytes] = set()
    cols = None
    n_in = 0
    with open(skipped_path, "w") as skipped:
        for row_no, row in src.rows():
            n_in += 1
            try:
                if isinstance(row, Exception):
                    raise RowProblem("row", str(row))
                cols = cols or _Columns(cfg, list(row))
                out, key = _convert(row, cols, src, cfg, classes, prompt, fixes, sizes)
                digest = hashlib.sha1(key.encode()).digest()
                if digest in seen:
                    raise RowProblem("row", "duplicate of an earlier row (same images and text)")
                seen.add(digest)
            except RowProblem as p:
                if cfg.strict:
                    raise UserError(f"row {row_no}: {p.column}: {p.reason}", where=src.location,
                                    hint="fix the row, or drop data.strict to skip and report bad rows") from None
                reasons[p.reason.split(":")[0].split(" (")[0]] += 1
                skipped.write(json.dumps({"row": row_no, "column": p.column, "reason": p.reason}) + "\n")
                continue
            split = _split_of(cfg.split_seed, row_no, cfg)  # all examples of one row (video chunks) share a split
            per_split[split] += 1
            if isinstance(out, dict) and "_format" in out:
                formats[out.pop("_format")] += 1
            for example in out if isinstance(out, list) else [out]:
                examples[split] += 1
                if "label" in example:
                    per_class[example["label"]] += 1
                yield {**example, ROW: row_no, "split": split}
    stats.update(input_rows=n_in, kept=sum(per_split.values()), skipped=n_in - sum(per_split.values()),
                 per_split={s: per_split[s] for s in SPLITS}, examples_per_split={s: examples[s] for s in SPLITS}, per_class={c: per_class[c] for c in classes if c in per_class},
                 skipped_by_reason=dict(reasons.most_common()), fixes=dict(fixes), image_sizes=dict(sizes),
                 message_formats=dict(formats.most_common()))


def prepare(cfg: DataConfig, out_dir: str | Path, model: str | None = None, length_sample: int = 256) -> dict:
    """Prepare `cfg.source` into `out_dir` (a DatasetDict on disk + prepare_report.json/.md); returns the report.
    With `model`, the report also has token-length statistics under that model's processor (a sample of train)."""
    import datasets

    out = Path(out_dir)
    if out.exists() and {p.name for p in out.iterdir()} - {"skipped.jsonl"}:  # a failed attempt leaves only that
        raise UserError(f"output directory '{out}' is not empty", where="--out", hint="choose a new directory")
    src = open_source(cfg.source)
    first = next((row for _, row in src.rows() if isinstance(row, dict)), {})
    video = None
    if detect_column(list(first), "video", cfg.video_column):
        if cfg.task not in ("caption", "vqa"):
            raise UserError(f"video rows are supported for task caption or vqa, not {cfg.task}", where="data.task")
        video = "frames" if cfg.frames_per_example else "video"
    prompt = cfg.prompt or ("Describe this video." if video and cfg.task == "caption" else DEFAULT_PROMPTS.get(cfg.task, ""))
    classes = cfg.classes
    if cfg.task == "classification" and classes is None:
        first: dict = {}
        classes = _scan_classes(src, lambda row: first.setdefault("c", _Columns(cfg, list(row))), cfg)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    tmp = tempfile.mkdtemp(prefix="vlmfit-prepare-")
    try:
        ds = _from_generator(
            generator=_generate, features=_features(cfg.task, classes, video), cache_dir=tmp, fingerprint=uuid.uuid4().hex,
            # classes as a tuple: datasets shards list-valued gen_kwargs across generator runs.
            gen_kwargs={"src": src, "cfg": cfg, "classes": tuple(classes or ()), "prompt": prompt, "stats": stats,
                        "skipped_path": str(out / "skipped.jsonl")},
        ) if _has_rows(src) else None
        if ds is None or not stats.get("kept"):
            raise _nothing_kept(stats, cfg.source, out / "skipped.jsonl")
        splits = {s: ds.filter(lambda v, s=s: v == s, input_columns="split").remove_columns("split") for s in SPLITS}
        datasets.DatasetDict(splits).save_to_disk(str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"source": cfg.source, "source_kind": src.kind, "task": cfg.task, "classes": classes, "prompt": prompt, **stats}
    # train and test are what a recipe needs; an empty validation split only matters when one was asked for
    report["empty_splits"] = [s for s in SPLITS if not stats["per_split"][s] and (s != "validation" or cfg.val_fraction)]
    if model and cfg.task != "preference":
        report["tokens"] = token_lengths(model, splits["train"], length_sample)
    assert report["kept"] + report["skipped"] == report["input_rows"]  # the invariant the report promises
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "prepare_report.md").write_text(report_markdown(report, out))
    return report


def token_lengths(model: str, ds, n: int) -> dict:
    """Token lengths (after image expansion) of up to n examples under `model`'s processor: no weights loaded."""
    import numpy as np

    from vlmfit.chat.collate import VisionChatCollator
    from vlmfit.models.load import check_model, family_for, load_processor

    ref, model_type = check_model(model)
    processor = load_processor(ref)
    family = family_for(model_type, processor, model)
    stats = VisionChatCollator(processor, family).measure([ds[i] for i in range(min(n, len(ds)))])
    lengths = np.array([s["length"] for s in stats])
    return {"model": model, "sampled": len(lengths), "min": int(lengths.min()), "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}


def _from_generator(**kwargs):
    """datasets.Dataset.from_generator, with our own errors (strict mode, bad columns) passed through unwrapped."""
    import datasets

    try:
        return datasets.Dataset.from_generator(**kwargs)
    except ValueError as e:
        if "corresponds to no data" in str(e):  # the generator kept no row: the caller says why
            return None
        raise
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def _nothing_kept(stats: dict, source: str, skipped: Path) -> UserError:
    n = stats.get("input_rows", 0)
    if not n:
        return UserError("the source has no rows", where=source, hint="is it the right file or directory?")
    top = list(stats.get("skipped_by_reason", {}).items())[:3]
    reasons = "; ".join(f"{reason} ({count})" for reason, count in top)
    return UserError(f"no usable rows: 0 of {n} rows kept; top reasons: {reasons}", where=source,
                     hint=f"every skipped row with its reason is in {skipped}; fix the rows or name the columns "
                          "(--set image_column=... / messages_column=...)")


def _has_rows(src: Source) -> bool:
    return next(iter(src.rows()), None) is not None


def report_markdown(r: dict, out: Path) -> str:
    lines = [f"# Prepared `{r['source']}` ({r['source_kind']}, task {r['task']})", "",
             f"- input rows: {r['input_rows']}  kept: {r['kept']}  skipped: {r['skipped']}",
             "- splits: " + ", ".join(f"{k} {v}" for k, v in r["per_split"].items())]
    if r.get("empty_splits"):
        lines.append(f"- empty splits: {', '.join(r['empty_splits'])} (training needs rows in train and test: add rows "
                     "or raise data.test_fraction)")
    if r.get("message_formats"):
        lines.append("- chat rows read as: " + ", ".join(f"{k} {v}" for k, v in r["message_formats"].items()))
    if r.get("per_class"):
        lines.append("- per class: " + ", ".join(f"{k} {v}" for k, v in r["per_class"].items()))
    if r.get("image_sizes"):
        lines.append("- image longest side: " + ", ".join(f"{k}: {v}" for k, v in r["image_sizes"].items()))
    if r.get("tokens"):
        t = r["tokens"]
        lines.append(f"- tokens under {t['model']} ({t['sampled']} train examples): min {t['min']}, median {t['median']:g}, "
                     f"p95 {t['p95']:g}, max {t['max']}")
    if r.get("fixes"):
        lines.append("- fixed (kept): " + ", ".join(f"{k}: {v}" for k, v in r["fixes"].items()))
    if r["skipped"]:
        lines += ["", "| skipped because | rows |", "|---|---|"] + [f"| {k} | {v} |" for k, v in r["skipped_by_reason"].items()]
        lines += ["", f"Every skipped row (row, column, reason): `{out / 'skipped.jsonl'}`."]
    return "\n".join(lines) + "\n"


def load_dataset_source(data, cache_root=None):
    """`data` (a DataConfig, or a source string) -> DatasetDict. Built-in sets load directly; a directory written by
    `vlmfit prepare` loads as is; anything else is prepared first into a cache (`cache_root`, by default vlmfit's
    prepared-data cache) keyed by the data config and everything the preparation reads (prepared_status)."""
    import datasets

    cfg = data if isinstance(data, DataConfig) else DataConfig(source=data)
    if cfg.source.startswith("builtin:"):
        from vlmfit.data.builtin import load_builtin

        return load_builtin(cfg.source.split(":", 1)[1])
    src = Path(cfg.source).expanduser()
    if (src / "prepare_report.json").is_file():
        return datasets.load_from_disk(str(src))
    status = prepared_status(cfg, cache_root)
    if status.why is not None:
        if status.notice:  # on stderr: the library has no console here, and stdout may be a report
            print(status.notice, file=sys.stderr)
        if status.entry.exists():
            shutil.rmtree(status.entry)  # an interrupted earlier attempt
        prepare(cfg, status.entry)
        manifest = status.entry.parent / MANIFEST
        old = _read_manifest(manifest)
        manifest.write_text(json.dumps({**status.manifest, "entry": status.entry.name}) + "\n")
        superseded = status.entry.parent / old.get("entry", status.entry.name)
        if superseded != status.entry and superseded.is_dir():
            shutil.rmtree(superseded)  # prepared from data, code or libraries that are no longer there
    return datasets.load_from_disk(str(status.entry))


PREPARE_FORMAT = 1  # bump when what a prepared entry holds changes: old entries are then never read
MANIFEST = "manifest.json"  # beside a data config's prepared entry: what that preparation read
_ANNOTATIONS = ("jsonl", "json", "csv", "parquet")


@dataclass
class Preparation:
    """A data config's prepared entry in the cache, and whether it is current: `why` is None on a hit, else why it
    is a miss ("25 files added since the cached preparation", "never prepared")."""
    entry: Path
    manifest: dict  # what preparing now reads: config, files, code, libraries
    why: str | None = None
    notice: str | None = None  # what a run says as it prepares again ("data changed since ...: preparing again (...)")


def prepared_status(cfg: DataConfig, cache_root=None) -> Preparation:
    """Where `cfg`'s prepared copy is cached and whether it is current, from the files alone (nothing prepared).
    The entry is keyed by all the preparation reads; a manifest per data config says what changed since."""
    config = cfg.model_dump(mode="json", exclude={"train_limit", "eval_limit", "shots_per_class"})
    local = Path(cfg.source).expanduser()
    if local.exists():  # the same files however the recipe spells their path
        config["source"] = str(local.resolve())
    manifest = {"format": PREPARE_FORMAT, "config": config, "files": source_state(cfg),
                "code": cache.code_fingerprint(), "libraries": cache.library_versions()}
    home = Path(cache_root) if cache_root is not None else cache.cache_dir("prepared")
    home /= hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    entry = home / hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    if (entry / "prepare_report.json").is_file():
        return Preparation(entry, manifest)
    old = _read_manifest(home / MANIFEST)
    if not old:
        return Preparation(entry, manifest, "never prepared")

    def miss(what: str, details: str = "") -> Preparation:
        said = f" ({details})" if details else ""
        return Preparation(entry, manifest, f"{what} changed since the cached preparation{said}",
                           f"{what} changed since the cached preparation: preparing again{said}")

    if old["format"] != PREPARE_FORMAT:  # what an older manifest holds is not this one's
        return miss("the cache format")
    if files := ", ".join(_file_changes(old["files"], manifest["files"])):
        return Preparation(entry, manifest, f"{files} since the cached preparation",
                           f"data changed since the cached preparation: preparing again ({files})")
    if libraries := ", ".join(f"{k} {old['libraries'].get(k)} -> {v}" for k, v in manifest["libraries"].items()
                              if old["libraries"].get(k) != v):
        return miss("library versions", libraries)
    if old["code"] != manifest["code"]:
        return miss("vlmfit's code")
    return Preparation(entry, manifest, "the cached preparation is gone", "the cached preparation is gone: preparing again")


def source_state(cfg: DataConfig) -> dict[str, str | list[int] | None]:
    """What preparing `cfg.source` reads, by path under the source's root: each annotation file's content hash, and
    [size, mtime_ns] of every image, video and class-folder entry the rows name (None: named but absent). Stat only:
    no image is read. Built-in and hub data are not files: {}."""
    if cfg.source.startswith("builtin:"):
        return {}
    src = open_source(cfg.source)
    if src.kind == "hub":
        return {}
    root = src.root.resolve()
    state: dict[str, str | list[int] | None] = {}
    if src.kind == "hf_disk":  # save_to_disk writes whole new shards: their size and mtime say when they change
        return {str(f.relative_to(root)): cache.file_stat(f) for f in sorted(root.rglob("*")) if f.is_file()}
    if src.kind in _ANNOTATIONS:
        state[Path(src.location).name] = cache.file_digest(Path(src.location))
    elif src.kind == "parquet_dir":
        state.update({str(f.relative_to(root)): cache.file_digest(f) for f in sorted(root.rglob("*.parquet"))})
    columns = None
    for _, row in src.rows():  # an image folder's rows are its files, one per image
        if not isinstance(row, dict):
            continue
        if columns is None:  # from the first row, as the preparation picks them
            columns = [c for c in (detect_column(list(row), "image", cfg.image_column),
                                   detect_column(list(row), "video", cfg.video_column)) if c]
        for column in columns:
            value = row.get(column)
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, dict) and not v.get("bytes"):  # {bytes, path}: only a path-only image reads a file
                    v = v.get("path")
                if isinstance(v, str) and v.strip():
                    path = (src.base_dir / v).resolve()
                    if path.is_relative_to(root):  # the preparation skips the others
                        state.setdefault(str(path.relative_to(root)), cache.file_stat(path))
    return state


def _file_changes(before: dict, after: dict) -> list[str]:
    """How the files a preparation reads differ from the last one's: "25 files added", "1 file changed", ..."""
    old, new = ({k for k, v in d.items() if v is not None} for d in (before, after))
    counts = (("added", len(new - old)), ("removed", len(old - new)),
              ("changed", sum(before[k] != after[k] for k in old & new)))
    return [f"{n} file{'s' if n != 1 else ''} {verb}" for verb, n in counts if n]


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or torn: the next preparation writes it whole
        return {}
    return doc if isinstance(doc, dict) and "format" in doc else {}


def prepare_source(source: str, *, task: str = "classification", out: str | Path | None = None, strict: bool = False,
                   model: str | None = None, settings: list[str] | None = None) -> tuple[dict, Path]:
    """`vlmfit prepare` as a function: `source` read as `task`, validated row by row, written to `out` (default
    prepared/<source>-<task>); `settings`: data keys ["image_column=img", ...]. Returns (the report, the directory)."""
    from vlmfit.config import load_config

    sets = [f"data.source={source}", f"data.task={task}", f"data.strict={str(strict).lower()}"] + [f"data.{kv}" for kv in settings or []]
    cfg = load_config(base={"model": {"name": "none"}}, overrides=sets).data
    out = Path(out) if out is not None else Path("prepared") / f"{Path(source.rstrip('/')).stem or 'data'}-{task}"
    return prepare(cfg, out, model=model), out
