"""The max_length policy, applied before training starts: measure every example, then drop the overlong ones
(counted, with reasons) or check that truncating them cuts only text and keeps part of the answer."""

from __future__ import annotations

from rich.console import Console

from vlmfit.chat.schema import ROW
from vlmfit.config import RunConfig
from vlmfit.errors import UserError


def apply_length_policy(train_ds, collator, cfg: RunConfig, console: Console):
    """(the training examples to use, the policy's report for the run summary). `collator` is a VisionChatCollator
    or a PreferenceCollator (both measure examples untruncated). Fails before training, not during. The one pass
    that measures the examples also gives train.group_by_length its "length" column (the Trainer's
    length-grouped sampler reads it)."""
    limit = cfg.train.max_length
    if limit is None and not cfg.train.group_by_length:
        return train_ds, {"limit": None}
    with console.status(f"measuring {len(train_ds)} examples" + (f" against max_length={limit}" if limit else "")):
        stats = collator.measure([train_ds[i] for i in range(len(train_ds))], cfg.train.batch_size)
    if cfg.train.group_by_length:
        train_ds = train_ds.add_column("length", [s["length"] for s in stats])
    if limit is None:
        return train_ds, {"limit": None}
    # rows named by the user's source row (train/trainer.py with_row_ids puts it there), else by position
    row = train_ds[ROW] if ROW in train_ds.column_names else list(range(len(train_ds)))
    over = [i for i, s in enumerate(stats) if s["length"] > limit]
    report = {"limit": limit, "policy": cfg.train.overlong, "overlong": len(over), "longest": max(s["length"] for s in stats)}
    if not over:
        return train_ds, report
    if cfg.train.overlong == "drop":
        keep = sorted(set(range(len(train_ds))) - set(over))
        report["dropped"] = len(over)
        report["dropped_rows"] = [{"row": row[i], "reason": f"{stats[i]['length']} tokens > max_length {limit}"} for i in over[:100]]
        console.print(f"[yellow]dropped {len(over)} of {len(train_ds)} examples longer than max_length={limit}[/]")
        if not keep:
            raise UserError(f"every training example is longer than max_length={limit}", where="train.max_length")
        return train_ds.select(sorted(keep)), report
    bad = [i for i in over if stats[i]["media_end"] > limit]
    if bad:
        raise UserError(
            f"{len(bad)} training examples would be truncated through an image at max_length={limit} "
            f"(source rows {', '.join(str(row[i]) for i in bad[:10])}{', ...' if len(bad) > 10 else ''}; longest {report['longest']} tokens)",
            where="train.max_length",
            hint="raise train.max_length (or set it to null), lower the image resolution, or set train.overlong: drop",
        )
    lost = [i for i in over if stats[i]["first_trained"] >= limit]
    if lost:
        raise UserError(
            f"{len(lost)} training examples would lose their whole answer when truncated at max_length={limit} "
            f"(source rows {', '.join(str(row[i]) for i in lost[:10])})",
            where="train.max_length",
            hint="raise train.max_length or set train.overlong: drop",
        )
    report["truncated"] = len(over)
    console.print(f"[yellow]{len(over)} examples will be truncated to {limit} tokens (inside text only)[/]")
    return train_ds, report
