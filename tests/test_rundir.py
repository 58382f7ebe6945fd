"""The run directory written by each method reloads through vlmfit.rundir alone (RunDir.open(...).load_trained()),
as what was trained: the same kind of weights, trained (not the base), scoring what the run recorded after training."""

import pytest
import torch
from rich.console import Console

from vlmfit.chat.collate import VisionChatCollator
from vlmfit.config import load_config
from vlmfit.data.splits import load_splits
from vlmfit.errors import UserError
from vlmfit.evaluate.classification import evaluate_classification
from vlmfit.models.clip_prompt import ClipPrompt
from vlmfit.models.load import load
from vlmfit.rundir import RunDir, RunSummary

QUIET = Console(quiet=True)


def _cfg(tmp_path, digits, sets):
    base = [f"output.dir={tmp_path}", "output.name=run", f"data.source={digits}", "data.train_limit=8", "data.eval_limit=8",
            "train.max_steps=3", "train.batch_size=4", "train.lr=2e-2", "train.warmup_ratio=0", "eval.before=false",
            "eval.modes=[constrained]"]
    return load_config(base={"model": {"name": "x"}}, overrides=base + sets)


def _train(cfg):
    if cfg.method == "dpo":
        from vlmfit.train.dpo import train_dpo

        return train_dpo(cfg, QUIET)
    if cfg.method == "zo":
        from vlmfit.train.zo import train_zo

        return train_zo(cfg, QUIET)
    from vlmfit.train.sft import train_sft

    return train_sft(cfg, QUIET)


CHAT_RUNS = {
    "full": (["model.name=tiny:qwen2_vl", "method=full"], "model"),
    "lora": (["model.name=tiny:smolvlm", "method=lora"], "adapter"),
    "qlora": (["model.name=tiny:qwen2_vl", "method=qlora"], "adapter"),
    "dpo": (["model.name=tiny:qwen2_vl", "method=dpo", "dpo.pairs_from_labels=mixed"], "adapter"),
    "zo-lora": (["model.name=tiny:qwen2_vl", "method=zo", "zo.optimizer=mezo", "zo.forward_passes=6", "zo.eval_every=6",
                 "train.batch_size=2", "zo.lr=1e-2"], "adapter"),
}


@pytest.mark.parametrize("name", list(CHAT_RUNS))
def test_chat_run_reloads_as_trained(tmp_path, digits, name):
    sets, kind = CHAT_RUNS[name]
    cfg = _cfg(tmp_path, digits, sets)
    run = RunDir.open(_train(cfg))
    summary = run.summary()
    assert isinstance(summary, RunSummary) and summary.method == cfg.method and summary.steps > 0
    trained = run.load_trained()
    assert trained.kind == kind and trained.config == cfg
    if kind == "adapter":
        lora_b = [p for n, p in trained.model.named_parameters() if "lora_B" in n]
        assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # lora_B starts at zero: these were trained
    else:
        base = load(cfg.model.name).model
        moved = [n for n, p in trained.model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
        assert moved, "the reloaded full model equals the base model"
    # The reloaded weights score the held-out split exactly as the run's own evaluation after training did.
    splits = load_splits(cfg)
    collator = VisionChatCollator(trained.processor, trained.family)
    after = run.evals()[1]
    after = after["task"] if name == "dpo" else after
    again = evaluate_classification(trained.model, collator, splits.test, splits.labels, ["constrained"], 8)
    assert again["constrained"]["accuracy"] == after["constrained"]["accuracy"]
    assert again["constrained"]["per_class"] == after["constrained"]["per_class"]


def test_zo_prompt_run_reloads_the_tuned_context(tmp_path):
    cfg = load_config(base={"model": {"name": "x"}}, overrides=[
        "model.name=tiny:clip", "model.dtype=float32", "method=zo", "data.source=builtin:mnist-noisy", "data.shots_per_class=4",
        "data.eval_limit=200", "train.batch_size=40", "zo.n_ctx=8", "zo.forward_passes=90", "zo.generations=3",
        "zo.eval_every=90", f"output.dir={tmp_path}", "output.name=run"])
    run = RunDir.open(_train(cfg))
    trained = run.load_trained()
    assert trained.kind == "prompt" and trained.family is None
    ctx = trained.prompt["context"]
    assert ctx.shape == (8, 64) and trained.prompt["context_tokens"] == 8
    splits = load_splits(cfg)
    prompt = ClipPrompt(trained.model, trained.processor, splits.labels, cfg.zo.ctx_init, None, n_ctx=cfg.zo.n_ctx)
    assert not torch.equal(prompt.ctx0, ctx.to(prompt.ctx0.device))  # tuned, not the initial prompt
    prompt.set_context(ctx)
    prompt.cache_images("test", [ex[0] for ex in splits.test["images"]], list(splits.test["label"]))
    assert abs(prompt.accuracy() - run.evals()[1]["constrained"]["accuracy"]) < 1e-6


def test_open_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        RunDir.open(tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  name: tiny:qwen2_vl\n")
    with pytest.raises(UserError, match="no saved weights"):
        RunDir.open(tmp_path).load_trained()


def _layout_names() -> dict[str, str]:
    """Every name inside a run directory, as rundir.py's layout constants declare them (NAME = "value")."""
    import ast

    import vlmfit.rundir as rundir

    tree = ast.parse(open(rundir.__file__).read())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for t in node.targets:
                if isinstance(t, ast.Name) and t.id.isupper() and t.id != "PACKAGES":
                    names[t.id] = node.value.value
    return names


def _strings_naming(tree, names: set[str], generic: set[str]):
    """(line, what) for each string literal outside docstrings that is a run-directory name, or a path with one as a
    component, and each `x / "name"` (generic words such as "model" count only there)."""
    import ast

    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in names:
            yield node.lineno, f'/ "{node.right.value}"'
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            parts = set(node.value.split("/"))
            hit = (parts & names) - generic
            if hit:
                yield node.lineno, repr(node.value)


def test_only_rundir_names_what_is_in_a_run_directory():
    """No vlmfit module but rundir.py builds a path inside a run directory: names such as summary.json or
    checkpoints/ are rundir.py's constants, and everything else goes through them (issue 28)."""
    import ast
    from pathlib import Path

    import vlmfit.rundir as rundir

    names = set(_layout_names().values())
    assert {"summary.json", "config.yaml", "tracking", "profile.json", "zo_state.json"} <= names
    generic = {n for n in names if "." not in n and n not in ("checkpoints", "tracking")}  # model, adapter, processor
    src = Path(rundir.__file__).parent
    bad = [f"{p.relative_to(src)}:{line}: {what}" for p in sorted(src.rglob("*.py")) if p != Path(rundir.__file__)
           for line, what in _strings_naming(ast.parse(p.read_text()), names, generic)]
    assert not bad, "run-directory names outside rundir.py (use its constants / RunDir methods):\n" + "\n".join(bad)


def test_the_layout_check_sees_a_leak(tmp_path):
    """The checker above is not blind: the leaks issue 28 found are caught."""
    import ast

    names = set(_layout_names().values())
    leaks = 'base = run.path / "tracking"\nrun.write_json("profile.json", s)\nx = run.read_json("summary.json")\n' \
            'ok = "no summary.json yet"\n'
    found = list(_strings_naming(ast.parse(leaks), names, {"model", "adapter", "processor"}))
    assert sorted({line for line, _ in found}) == [1, 2, 3], found
