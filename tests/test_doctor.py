"""`vlmfit doctor`: a healthy recipe passes; a broken one reports each problem and exits non-zero."""

import json
import subprocess
import sys

from rich.console import Console

from vlmfit.config import load_config
from vlmfit.chat.schema import chat_example
from vlmfit.doctor import Report, _check_examples, print_report, run_doctor
from vlmfit.models.meta import meta_model_of
from vlmfit.models.load import load

from helpers import digit_image


def doctor_cli(tmp_path, *sets):
    return subprocess.run([sys.executable, "-m", "vlmfit.cli", "doctor", "recipes/digits-lora.yaml", "--samples", "3", "--json",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=300)


def test_healthy_recipe_passes_with_exact_counts(tmp_path):
    cfg = load_config("recipes/digits-lora.yaml", ["lora.scope=[language,vision]"])
    rep = run_doctor(cfg, samples=4)
    assert not rep.failed, [c for c in rep.checks if c.status == "fail"]
    for e in rep.examples:
        assert e["image_tokens"] == e["image_features"] > 0
        assert e["trained_tokens"] == 2  # the digit word and <|im_end|>
    assert {c.name: c.status for c in rep.checks}["vision tower"] == "ok"
    console = Console(record=True, width=120)
    print_report(rep, console)
    assert "<|image_pad|>×4" in console.export_text()


def test_broken_recipe_reports_each_problem_and_exits_nonzero(tmp_path):
    r = doctor_cli(tmp_path, "train.max_length=12", "lora.targets=[no_such_layer]")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    status = {c["name"]: c for c in rep["checks"]}
    assert not rep["ok"]
    assert status["truncation"]["status"] == "fail" and "through an image" in status["truncation"]["detail"]
    assert status["lora targets"]["status"] == "fail" and "no_such_layer" in status["lora targets"]["detail"]


def test_empty_assistant_turn_and_feature_mismatch_are_failures():
    loaded = load("tiny:gemma4")
    cfg = load_config(base={"model": {"name": "tiny:gemma4"}})
    rep = Report()
    empty = chat_example("What digit is this?", "", [digit_image(0)])
    _check_examples(rep, *_collator(loaded), meta_model_of(loaded.source).config, loaded.family, [chat_example("q?", "one", [digit_image(1)]), empty], cfg)
    by_name = {c.name: c for c in rep.checks}
    assert by_name["example 1"].status == "fail" and "empty" in by_name["example 1"].detail
    assert by_name["image tokens"].status == "ok"  # Gemma 4: pooled patches == image soft tokens
    assert rep.failed


def _collator(loaded):
    from vlmfit.chat.collate import VisionChatCollator

    return (VisionChatCollator(loaded.processor, loaded.family),)


def test_gemma4_hyperparameter_warning():
    rep = run_doctor(load_config(base={"model": {"name": "tiny:gemma4"}, "method": "lora"}, overrides=["lora.scope=[vision]"]), samples=1)
    warns = [c.detail for c in rep.checks if c.name == "hyperparameters"]
    assert warns and "max_grad_norm: 0.1" in warns[0]


def test_targets_check_follows_what_actually_trains():
    # qlora and LoRA-tuned DPO adapt the resolved targets; full DPO trains everything
    for sets, expect in ((["method=qlora"], "lora targets"), (["method=dpo", "dpo.tuning=lora"], "lora targets"),
                         (["method=dpo", "dpo.tuning=full"], "trainable")):
        rep = Report()
        cfg = load_config("recipes/digits-lora.yaml", sets)
        from vlmfit.doctor import _check_targets
        from vlmfit.models.load import family_for, load_processor, resolve_reference

        ref = resolve_reference(cfg.model.name)
        model = meta_model_of(ref)
        _check_targets(rep, model, family_for(model.config.model_type, load_processor(ref), cfg.model.name), cfg)
        names = {c.name for c in rep.checks}
        assert expect in names, (sets, names)
