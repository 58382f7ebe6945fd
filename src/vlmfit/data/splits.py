"""The splits a recipe trains and evaluates on: train / test from data.source, checked, limited
(data.train_limit / eval_limit) and optionally few-shot (data.shots_per_class), with the class labels."""

from __future__ import annotations

from dataclasses import dataclass

from vlmfit.config import RunConfig
from vlmfit.errors import UserError

PREFERENCE_COLUMNS = {"prompt", "chosen", "rejected"}


@dataclass
class Splits:
    train: object  # datasets.Dataset
    test: object
    labels: list[str] | None  # class names when the task is classification
    validation: object | None = None  # the source's validation split, when it has a non-empty one

    @property
    def is_preference(self) -> bool:
        return PREFERENCE_COLUMNS <= set(self.train.column_names)


def load_splits(cfg: RunConfig) -> Splits:
    """Train and test splits of data.source, limited as configured, and the class labels of the task."""
    from vlmfit.data.prepare import load_dataset_source

    data = load_dataset_source(cfg.data)  # prepared into $VLMFIT_CACHE/prepared (vlmfit.cache)
    for split in ("train", "test"):
        if split not in data or len(data[split]) == 0:
            raise UserError(f"dataset has no (or an empty) '{split}' split (has: {', '.join(f'{k} {len(v)}' for k, v in data.items())})",
                            where="data.source", hint="more rows, or a larger data.test_fraction")
    train, test = data["train"], data["test"]
    if cfg.data.shots_per_class:
        train = few_shot(train, cfg.data.shots_per_class, cfg.data.split_seed)
    if cfg.data.train_limit:
        train = train.select(range(min(cfg.data.train_limit, len(train))))
    val = data["validation"] if "validation" in data and len(data["validation"]) else None
    if cfg.data.eval_limit:
        test = test.select(range(min(cfg.data.eval_limit, len(test))))
        val = val.select(range(min(cfg.data.eval_limit, len(val)))) if val is not None else None
    return Splits(train, test, class_names(train), val)


def validation_split(splits: Splits, cfg: RunConfig):
    """(train, validation, where the validation examples came from): the source's validation split, or, when it has
    none (builtin data), data.val_fraction of train held out with data.split_seed (never the test split: choosing
    the best step on it would make its figures optimistic)."""
    if splits.validation is not None:
        return splits.train, splits.validation, "the source's validation split"
    fraction = cfg.data.val_fraction or 0.1
    parts = splits.train.train_test_split(test_size=fraction, seed=cfg.data.split_seed)
    val = parts["test"]
    if cfg.data.eval_limit:
        val = val.select(range(min(cfg.data.eval_limit, len(val))))
    return parts["train"], val, f"{fraction:g} of train held out (the source has no validation split)"


def class_names(ds) -> list[str] | None:
    feature = ds.features.get("label")
    return list(feature.names) if hasattr(feature, "names") else None


def require_chat(splits: Splits) -> None:
    """Supervised recipes train on chat examples, not on preference pairs."""
    if "messages" not in splits.train.column_names:
        raise UserError("this is preference data (prompt/chosen/rejected); supervised fine-tuning needs chat examples",
                        where="data.task", hint="use task classification / vqa / caption / chat for method full or lora")


def few_shot(train_ds, k: int, seed: int = 0):
    """k examples of each class, drawn with `seed` (in training order)."""
    if "label" not in train_ds.column_names:
        raise UserError("data.shots_per_class needs a classification dataset (a 'label' column)", where="data.shots_per_class")
    import numpy as np

    labels = list(train_ds["label"])
    seen: dict[int, int] = {}
    keep = []
    for i in np.random.default_rng(seed).permutation(len(labels)).tolist():
        lab = labels[i]
        if seen.get(lab, 0) < k:
            seen[lab] = seen.get(lab, 0) + 1
            keep.append(i)
    short = {lab: n for lab, n in seen.items() if n < k}
    if short:
        raise UserError(f"{len(short)} classes have fewer than {k} training examples (e.g. class {next(iter(short))}: "
                        f"{next(iter(short.values()))})", where="data.shots_per_class", hint="lower data.shots_per_class")
    return train_ds.select(sorted(keep))
