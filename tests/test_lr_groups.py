"""train.lr_groups: a learning rate per part. The optimizer's groups partition the trainable parameters exactly,
a part at rate 0 ends bit-identical to where it started while the others train, and the checkpoint carries the
per-part rates (what a resume loads back)."""

import pytest
import torch
from rich.console import Console

from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.models.load import load
from vlmfit.models.targets import make_trainable, part_of
from vlmfit.train.trainer import lr_groups


def test_groups_partition_the_trainable_parameters():
    loaded = load("tiny:qwen2_vl")
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "lora": {"scope": ["language", "vision"], "train_fully": ["projector"]}})
    model, _ = make_trainable(loaded.model, loaded.family, "lora", cfg.lora)
    groups = lr_groups(model, loaded.family, {"vision": 0.0, "projector": 1e-3}, 2e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    grouped = [n for names in groups.values() for n in names]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))  # each exactly once
    assert set(groups) == {"vision", "projector", "default"} and all(groups.values())
    assert all(part_of(n.removeprefix("base_model.model."), loaded.family) == "vision" for n in groups["vision"])
    assert all("lora_" in n for n in groups["vision"]) and not any("lora_" in n for n in groups["projector"])


def test_a_part_at_rate_zero_stays_bit_identical_and_the_checkpoint_keeps_the_rates(tmp_path, digits):
    from vlmfit.train.sft import train_sft

    base = {k: v.clone() for k, v in load("tiny:qwen2_vl").model.state_dict().items()}
    cfg = load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": "full", "data": {"source": str(digits)},
                            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_steps": 2, "warmup_ratio": 0,
                                      "scheduler": "constant", "lr_groups": {"vision": 0.0, "projector": 5e-4}},
                            "eval": {"before": False, "after": False}, "output": {"dir": str(tmp_path), "name": "g"}})
    run = train_sft(cfg, Console(quiet=True))
    trained = load(str(run / "model")).model.state_dict()  # the same key names as the base loaded in memory
    family = load("tiny:qwen2_vl").family
    vision = [k for k in trained if part_of(k.rsplit(".", 1)[0], family) == "vision"]
    language = [k for k in trained if part_of(k.rsplit(".", 1)[0], family) == "language"]
    assert vision and language
    assert all(torch.equal(trained[k], base[k]) for k in vision)  # bit-identical
    assert sum(not torch.equal(trained[k], base[k]) for k in language) > len(language) // 2  # the language model trained
    opt = torch.load(run / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    rates = {g["part"]: g["lr"] for g in opt["param_groups"]}
    assert rates == {"vision": 0.0, "projector": 5e-4, "default": 1e-3}


def test_plan_and_doctor_print_the_rates(vlmfit):
    code, out, err = vlmfit("plan", "digits-lora", "--set", "train.lr_groups={vision: 0, projector: 1e-4}")
    assert code == 0 and "learning rates: vision 0, projector 0.0001" in " ".join(out.split()), err
    code, out, err = vlmfit("doctor", "digits-lora", "--set", "train.lr_groups={vision: 0}")
    assert "learning rates" in out and "vision 0" in " ".join(out.split()), err


def test_negative_rates_are_refused():
    with pytest.raises(UserError, match="cannot be negative"):
        load_config(base={"model": {"name": "tiny:qwen2_vl"}, "train": {"lr_groups": {"vision": -1.0}}})
    with pytest.raises(UserError):
        load_config(base={"model": {"name": "tiny:qwen2_vl"}, "train": {"lr_groups": {"tower": 1e-4}}})
