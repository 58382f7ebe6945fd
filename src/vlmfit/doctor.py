"""`vlmfit doctor`: pre-flight a recipe without training. Loads the processor and the model on the meta device,
tokenizes a sample of the data and reports what training would see, with a verdict per check, and whether the run
would reuse each cache (prepared data, encoded examples) and why not."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vlmfit import cache
from vlmfit.chat.collate import IGNORE_INDEX, LABEL_METHODS, VisionChatCollator
from vlmfit.chat.rows import EncodedCache, example_key, processor_fingerprint
from vlmfit.config import RunConfig
from vlmfit.data.prepare import prepared_status
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.models.families import Family
from vlmfit.models.load import check_model, family_for, load_processor
from vlmfit.models.meta import meta_model_of
from vlmfit.models.targets import resolve_for


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    targets: dict | None = None
    rendering: Text | None = None

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def as_dict(self) -> dict:
        return {
            "ok": not self.failed,
            "checks": [c.__dict__ for c in self.checks],
            "examples": self.examples,
            "lora_targets": self.targets,
        }


def run_doctor(cfg: RunConfig, samples: int = 8) -> Report:
    rep = Report()
    ref, _ = check_model(cfg.model.name, cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    processor = load_processor(ref, cfg.model.revision, cfg.model)  # with the recipe's resolution caps, as training
    model = meta_model_of(ref, cfg.model.revision)
    family = family_for(model.config.model_type, processor, cfg.model.name)
    n_params = sum(p.numel() for p in model.parameters())
    rep.add("model", "ok", f"{type(model).__name__}, {n_params:,} parameters (built on the meta device: no weights loaded)")
    try:
        coll = VisionChatCollator(processor, family, loss_on=cfg.train.loss_on)
    except UserError as e:
        rep.add("labels", "fail", e.render())
        return rep
    rep.add("labels", "warn" if coll.label_method == "prefix" else "ok",
            f"family {family.name}: labels by {coll.label_method} ({LABEL_METHODS[coll.label_method]}), loss on {cfg.train.loss_on} tokens")

    prepared = _prepared(cfg)  # before load_splits prepares the data
    train_ds = load_splits(cfg).train
    sample = [train_ds[i] for i in range(min(samples, len(train_ds)))]
    _check_examples(rep, coll, model.config, family, sample, cfg)
    _check_targets(rep, model, family, cfg)
    if cfg.train.lr_groups:
        rates = ", ".join(f"{part} {rate:g}" for part, rate in cfg.train.lr_groups.items())
        rep.add("learning rates", "ok", f"{rates}; every other trained parameter {cfg.train.lr:g} (train.lr_groups)")
    for advice in family.advice:
        rep.add("advice", "warn", advice)
    over = [(key, getattr(cfg.train, key), limit) for key, limit in family.train_limits if getattr(cfg.train, key) > limit]
    if over:
        rep.add("hyperparameters", "warn", f"{family.name}: " + ", ".join(f"train.{k} {v:g} > {lim:g}" for k, v, lim in over)
                + f"; {family.train_limits_hint}")
    rep.add("prepared data", "ok", prepared)
    rep.add("encoded examples", "ok", _encoded(processor, family, sample, cfg))
    return rep


def _check_examples(rep: Report, coll: VisionChatCollator, config, family: Family, sample: list[dict], cfg: RunConfig) -> None:
    features_of = family.image_features
    mismatches, broken = 0, 0
    limit = cfg.train.max_length
    for row, ex in enumerate(sample):
        try:
            batch = coll([ex])
        except UserError as e:
            broken += 1
            rep.examples.append({"row": row, "error": e.render()})
            rep.add(f"example {row}", "fail", e.render())
            continue
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        media = torch.isin(ids, torch.tensor(sorted(coll.media_ids)))
        n_media = int(media.sum())
        expected = features_of(config, batch) if features_of else None
        trained = int((labels != IGNORE_INDEX).sum())
        info = {"row": row, "tokens": len(ids), "image_tokens": n_media, "image_features": expected,
                "trained_tokens": trained, "masked_tokens": len(ids) - trained}
        if expected is not None and expected != n_media:
            mismatches += 1
            info["problem"] = "image tokens != image features"
        if limit is not None and len(ids) > limit:
            media_end = int(media.nonzero().max()) + 1 if n_media else 0
            first_trained = int((labels != IGNORE_INDEX).nonzero().min())
            if cfg.train.overlong == "drop":
                info["problem"] = f"{len(ids)} tokens > max_length {limit}: would be dropped"
            elif media_end > limit:
                info["problem"] = f"max_length {limit} cuts through an image (image ends at token {media_end})"
            elif first_trained >= limit:
                info["problem"] = f"max_length {limit} removes the whole answer"
        rep.examples.append(info)
        if rep.rendering is None:
            rep.rendering = render_labels(coll.processor.tokenizer, ids, labels, media)
    good = [e for e in rep.examples if "error" not in e]
    if features_of is None:
        rep.add("image tokens", "warn", f"no feature formula for {family.name}: image tokens not checked against the model")
    elif mismatches:
        rep.add("image tokens", "fail", f"{mismatches} of {len(good)} examples have image tokens != image features")
    elif good:
        rep.add("image tokens", "ok", f"image tokens equal the model's image features in all {len(good)} sampled examples")
    if good and not broken:
        rep.add("loss tokens", "ok", f"{sum(e['trained_tokens'] for e in good)} trained / "
                f"{sum(e['masked_tokens'] for e in good)} masked tokens over {len(good)} examples")
    cut = [e for e in good if "problem" in e and "max_length" in e["problem"]]
    if limit is None:
        rep.add("truncation", "ok", "max_length is null: nothing is ever truncated")
    elif any("through an image" in e["problem"] or "whole answer" in e["problem"] for e in cut):
        rep.add("truncation", "fail", f"{len(cut)} sampled examples exceed max_length {limit}: " + cut[0]["problem"])
    elif cut:
        rep.add("truncation", "warn", f"{len(cut)} sampled examples exceed max_length {limit} ({cfg.train.overlong})")
    else:
        longest = max((e["tokens"] for e in good), default=0)
        rep.add("truncation", "ok", f"longest sampled example {longest} tokens <= max_length {limit}")


def _prepared(cfg: RunConfig) -> str:
    """Whether the run would reuse the cached preparation of data.source, and why not."""
    if cfg.data.source.startswith("builtin:"):
        return "not cached: built-in data is generated as it loads"
    if (Path(cfg.data.source).expanduser() / "prepare_report.json").is_file():
        return "not cached: data.source is a prepared directory, read as is"
    status = prepared_status(cfg.data)
    return "hit — the same data, settings, code and libraries" if status.why is None else f"miss — {status.why}"


def _encoded(processor, family: Family, sample: list[dict], cfg: RunConfig) -> str:
    """Whether the run's encoded-example cache holds the sampled examples under this processor and these settings."""
    if cfg.method in ("dpo", "grpo", "zo"):
        return f"not cached: method {cfg.method} encodes as it goes"
    if not cfg.train.processor_cache:
        return "not cached (train.processor_cache: false)"
    chat = VisionChatCollator(processor, family, loss_on=cfg.train.loss_on, max_length=cfg.train.max_length)  # as training's
    encoded = EncodedCache(cache.cache_dir("encoded"), processor_fingerprint(chat))
    hits = sum(example_key(ex) in encoded for ex in sample)
    if hits == len(sample):
        return f"hit — all {hits} sampled examples are encoded"
    if encoded.dir.is_dir():
        return f"miss — {len(sample) - hits} of {len(sample)} sampled examples are not encoded yet (new or changed examples)"
    return ("miss — nothing is encoded under this tokenizer, processor, family facts, settings, vlmfit code and library "
            "versions (one of them changed, or this model never trained here)")


def _check_targets(rep: Report, model, family: Family, cfg: RunConfig) -> None:
    tuned = {"dpo": cfg.dpo.tuning, "grpo": cfg.grpo.tuning}.get(cfg.method)
    uses_lora = cfg.method in ("lora", "qlora", "zo") or tuned == "lora"
    if not uses_lora:
        rep.add("trainable", "ok", f"method {cfg.method}" + (f" ({cfg.method}.tuning full)" if tuned else "")
                + ": every parameter trains")
        return
    try:
        res = resolve_for(model, family, cfg.lora)
    except UserError as e:
        rep.add("lora targets", "fail", e.render())
        return
    rep.targets = res.as_dict()
    groups = ", ".join(f"{p}: {g['lora_modules']} LoRA / {g['full_modules']} full" for p, g in res.groups.items())
    rep.add("lora targets", "ok", f"{len(res.modules)} LoRA modules ({groups})")
    vision = res.groups.get("vision", {})
    covered = bool(vision.get("lora_modules") or vision.get("full_modules"))
    rep.add("vision tower", "ok" if covered else "warn",
            "adapted" if covered else "frozen (lora.scope has no 'vision'): fine for familiar images, "
            "add vision to lora.scope when the images differ from what the model was trained on")
    for note in res.skipped:
        rep.add("lora targets", "warn", f"skipped {note}")


def render_labels(tok, ids: torch.Tensor, labels: torch.Tensor, media: torch.Tensor) -> Text:
    """One example as text: green = carries loss, dim = masked, magenta = image tokens (runs collapsed)."""
    out, i, ids_l = Text(), 0, ids.tolist()
    while i < len(ids_l):
        if media[i]:
            j = i
            while j < len(ids_l) and media[j]:
                j += 1
            out.append(f"{tok.convert_ids_to_tokens(ids_l[i])}×{j - i}", style="magenta")
            i = j
            continue
        piece = tok.decode([ids_l[i]], skip_special_tokens=False)
        out.append(piece, style="bold green" if labels[i] != IGNORE_INDEX else "dim")
        i += 1
    return out


def print_report(rep: Report, console: Console) -> None:
    if rep.rendering is not None:
        console.print("[bold]example 0[/] ([bold green]green[/] = trained, [dim]dim[/] = masked, [magenta]magenta[/] = image tokens):")
        console.print(rep.rendering)
    if rep.examples:
        t = Table(title="sampled examples")
        for col in ("row", "tokens", "image tokens", "image features", "trained", "masked", "problem"):
            t.add_column(col)
        for e in rep.examples:
            if "error" in e:
                t.add_row(str(e["row"]), "-", "-", "-", "-", "-", e["error"].splitlines()[0])
            else:
                feats = "?" if e["image_features"] is None else str(e["image_features"])
                t.add_row(str(e["row"]), str(e["tokens"]), str(e["image_tokens"]), feats, str(e["trained_tokens"]),
                          str(e["masked_tokens"]), e.get("problem", ""))
        console.print(t)
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    t = Table(title="checks")
    t.add_column("check")
    t.add_column("status")
    t.add_column("detail")
    for c in rep.checks:
        t.add_row(c.name, Text(c.status, style=style[c.status]), c.detail)
    console.print(t)
    console.print("[bold red]doctor: problems found[/]" if rep.failed else "[bold green]doctor: ready to train[/]")
