"""`vlmfit doctor`: a healthy recipe passes; a broken one reports each problem and exits non-zero."""

import json

from rich.console import Console

from vlmfit.config import load_config
from vlmfit.chat.schema import chat_example
from vlmfit.doctor import Report, _check_examples, print_report, run_doctor
from vlmfit.models.meta import meta_model_of
from vlmfit.models.load import load

from helpers import digit_image




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


def test_broken_recipe_reports_each_problem_and_exits_nonzero(vlmfit):
    code, out, err = vlmfit("doctor", "recipes/digits-lora.yaml", "--samples", "3", "--json",
                            "--set", "train.max_length=12", "--set", "lora.targets=[no_such_layer]")
    assert code == 1, err
    rep = json.loads(out)
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
    warns = [c for c in rep.checks if c.name == "hyperparameters"]
    assert len(warns) == 1 and warns[0].status == "warn"
    assert "train.lr 0.0002 > 0.0001" in warns[0].detail and "train.max_grad_norm 1 > 0.1" in warns[0].detail
    assert "max_grad_norm: 0.1" in warns[0].detail
    within = run_doctor(load_config(base={"model": {"name": "tiny:gemma4"}, "method": "lora"},
                                    overrides=["lora.scope=[vision]", "train.lr=5e-5", "train.max_grad_norm=0.1"]), samples=1)
    assert not [c for c in within.checks if c.name == "hyperparameters"]  # the advice stays, no limit warning


def test_targets_check_follows_what_actually_trains():
    # qlora and LoRA-tuned DPO adapt the resolved targets; full DPO trains everything
    lora_checks = {"lora targets": "ok", "vision tower": "warn"}  # digits-lora adapts the language model only
    for sets, expect in ((["method=qlora"], lora_checks), (["method=dpo", "dpo.tuning=lora"], lora_checks),
                         (["method=dpo", "dpo.tuning=full"], {"trainable": "ok"})):
        rep = Report()
        cfg = load_config("recipes/digits-lora.yaml", sets)
        from vlmfit.doctor import _check_targets
        from vlmfit.models.load import family_for, load_processor, resolve_reference

        ref = resolve_reference(cfg.model.name)
        model = meta_model_of(ref)
        _check_targets(rep, model, family_for(model.config.model_type, load_processor(ref), cfg.model.name), cfg)
        assert {c.name: c.status for c in rep.checks} == expect, sets


def test_memory_check_names_each_option_that_would_save_memory(vlmfit):
    """Against a budget the plan exceeds, doctor fails the memory check and lists the same-math options with what
    each saves (the ones the recipe already uses are not suggested); within the budget it passes."""
    code, out, err = vlmfit("doctor", "recipes/digits-lora.yaml", "--samples", "2", "--json", "--gpu", "512MiB",
                            "--set", "train.gradient_checkpointing=[language]", "--set", "lora.scope=[language,vision]")
    assert code == 1, err
    memory = {c["name"]: c for c in json.loads(out)["checks"]}["memory"]
    assert memory["status"] == "fail" and "does not fit" in memory["detail"]
    assert "train.activation_offload with vision" in memory["detail"]
    assert "with language" not in memory["detail"]  # checkpointed already: nothing to offload there
    code, out, err = vlmfit("doctor", "recipes/digits-lora.yaml", "--samples", "2", "--json", "--gpu", "80GiB")
    memory = {c["name"]: c for c in json.loads(out)["checks"]}["memory"]
    assert memory["status"] == "ok" and "fits" in memory["detail"], memory
