"""Training paths: every family trains a step (LoRA and full), a short SFT run lowers the loss and writes a
complete run directory, and `vlmfit eval` on that directory reproduces the recorded accuracy."""

import json
import sys

import pytest
import torch
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.data.builtin import load_builtin
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.targets import part_of
from vlmfit.models.tiny import TINY_FAMILIES
from vlmfit.chat.collate import VisionChatCollator
from vlmfit.models.targets import make_trainable
from vlmfit.train.sft import make_trainer, train_sft
from vlmfit.rundir import RunDir

QUIET = Console(quiet=True)
FAMS = [f for f in TINY_FAMILIES if f in FAMILIES]


def cfg_for(tmp_path, family, method, **extra):
    sets = [f"model.name=tiny:{family}", f"method={method}", f"output.dir={tmp_path}", "train.max_steps=2",
            "train.batch_size=2", "data.train_limit=8", "data.eval_limit=4", "train.lr=1e-2", "train.warmup_ratio=0"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(base={"model": {"name": "x"}}, overrides=sets)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMS)
def test_lora_step_changes_adapters_only(tmp_path, family):
    cfg = cfg_for(tmp_path, family, "lora", **{"lora.scope": "[language,vision,projector]"})
    loaded = load(cfg.model.name)
    model = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)[0]
    before = snapshot(model)
    data = load_builtin("mnist")["train"].select(range(8))
    trainer = make_trainer(model, loaded, VisionChatCollator(loaded.processor, loaded.family), data, cfg, RunDir(tmp_path))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora and changed <= lora, f"frozen params changed: {sorted(changed - lora)[:5]}"
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora)
    # Adapters in the language model and the vision tower both learned (lora_B starts at zero, so it must move).
    parts = {part_of(n.removeprefix("base_model.model.").split(".lora_")[0], loaded.family) for n in changed if "lora_B" in n}
    assert {"language", "vision"} <= parts, parts


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma4"])
def test_full_step_changes_every_tower(tmp_path, family):
    cfg = cfg_for(tmp_path, family, "full")
    loaded = load(cfg.model.name)
    model = make_trainable(loaded.model, loaded.family, cfg.method, cfg.lora)[0]
    before = snapshot(model)
    data = load_builtin("mnist")["train"].select(range(8))
    make_trainer(model, loaded, VisionChatCollator(loaded.processor, loaded.family), data, cfg, RunDir(tmp_path)).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    parts = {part_of(n, loaded.family) for n in changed}
    assert {"language", "vision", "projector"} <= parts


RUN_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "loss.png", "eval_before.json", "eval_after.json",
             "report.md", "summary.json", "processor/processor_config.json")


def logged_losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def eval_again(vlmfit, run):
    """`vlmfit eval RUN_DIR`: reloads the saved weights from disk and re-scores the test split."""
    code, _, err = vlmfit("eval", run)
    assert code == 0, err
    return json.loads(sorted(run.glob("eval_2*.json"))[-1].read_text())


def test_short_full_sft_run_lowers_loss_and_writes_run_dir(tmp_path, vlmfit):
    cfg = cfg_for(tmp_path, "qwen2_vl", "full", **{"train.max_steps": 30, "train.batch_size": 8, "data.train_limit": 240,
                                                   "train.lr": 3e-3, "train.logging_steps": 5, "output.name": "run"})
    run = train_sft(cfg, QUIET)
    for f in RUN_FILES + ("model/model.safetensors", "model/config.json", "model/processor_config.json"):
        assert (run / f).is_file(), f
    losses = logged_losses(run)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    env = json.loads((run / "environment.json").read_text())
    import psutil
    import transformers

    from importlib.metadata import version

    assert env["packages"]["transformers"] == transformers.__version__ and env["packages"]["torch"] == version("torch")
    assert env["cpu_count"] == psutil.cpu_count(logical=True) and env["python"] == sys.version.split()[0]
    assert load_config(run / "config.yaml") == cfg  # the resolved config round-trips
    again, after = eval_again(vlmfit, run), json.loads((run / "eval_after.json").read_text())
    for mode in ("constrained", "generate"):
        assert again[mode]["accuracy"] == after[mode]["accuracy"]


def test_lora_run_saves_adapter_that_reloads(tmp_path, vlmfit):
    cfg = cfg_for(tmp_path, "smolvlm", "lora", **{"train.max_steps": 12, "train.batch_size": 4, "data.train_limit": 48,
                                                  "train.lr": 2e-2, "train.logging_steps": 3, "output.name": "run"})
    run = train_sft(cfg, QUIET)
    for f in RUN_FILES + ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (run / f).is_file(), f
    assert not (run / "model").exists()  # LoRA runs ship the adapter, not a copy of the base weights
    losses = logged_losses(run)
    assert losses[-1] < losses[0]
    again, after = eval_again(vlmfit, run), json.loads((run / "eval_after.json").read_text())
    # Base + saved adapter, reloaded in a new process, scores exactly as the in-memory model did after training.
    assert again["constrained"] == {**after["constrained"], "seconds": again["constrained"]["seconds"]}
    assert again["generate"]["samples"] == after["generate"]["samples"]
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["total_params"]


def test_length_grouped_batches_pad_less_and_still_see_every_example_once(tmp_path, digits):
    """train.group_by_length: token counts vary with image size (Qwen: 1 image token at 28 px, 16 at 112 px); the
    Trainer's length-grouped sampler over vlmfit's measured lengths pads less than random batches, and one epoch
    still holds every example exactly once."""
    import datasets

    from vlmfit.chat.collate import ROW
    from vlmfit.chat.length import apply_length_policy
    from vlmfit.train.trainer import with_row_ids

    base = datasets.load_from_disk(str(digits))["train"]
    base = base.select([i % len(base) for i in range(64)])  # the sampler sorts within megabatches of batch x len // 4
    ds = base.map(lambda ex, i: {"images": [im.resize((28 + 84 * (i % 2),) * 2) for im in ex["images"]]}, with_indices=True)
    padding = {}
    for grouped in (False, True):
        cfg = cfg_for(tmp_path, "qwen2_vl", "lora", **{"train.group_by_length": str(grouped).lower(), "train.batch_size": 4})
        loaded = load(cfg.model.name)
        model, _ = make_trainable(loaded.model, loaded.family, "lora", cfg.lora)
        collator = VisionChatCollator(loaded.processor, loaded.family)
        train = with_row_ids(apply_length_policy(ds, collator, cfg, QUIET)[0])  # as train_sft prepares it
        assert ("length" in train.column_names) == grouped
        trainer = make_trainer(model, loaded, collator, train, cfg, RunDir(tmp_path))
        batches = list(trainer.get_train_dataloader())
        rows = sorted(r for b in batches for r in b[ROW].tolist())
        assert rows == sorted(train[ROW]) == list(range(len(ds)))  # every example once (a built-in set: rows by index)
        masks = [b["attention_mask"] for b in batches]
        padding[grouped] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert padding[True] < 0.5 * padding[False], padding
