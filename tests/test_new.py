"""`vlmfit new` writes a starter recipe that validates, fitted to a GPU budget by the planner when asked, and refuses
what it cannot write with one message."""

from vlmfit.config import load_config
from vlmfit.memory.estimate import plan_memory
from vlmfit.memory.budget import parse_budget


def test_new_writes_a_valid_recipe_fitted_to_the_budget(vlmfit, tmp_path):
    out = tmp_path / "charts.yaml"
    code, stdout, err = vlmfit("new", "--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", "builtin:charts", "--task", "vqa",
                               "--gpu", "14GiB", "--out", out)
    assert code == 0, err
    cfg = load_config(out)
    assert cfg.model.name == "Qwen/Qwen2.5-VL-3B-Instruct" and cfg.data.task == "vqa" and cfg.eval.modes == ["generate"]
    bd = plan_memory(cfg, budget=parse_budget("14GiB"))
    assert bd.verdict != "does not fit" and bd.peak <= parse_budget("14GiB")
    assert "Fitted to 14GiB by the memory planner" in out.read_text() and cfg.train.gradient_checkpointing


def test_new_without_a_budget_and_its_refusals(vlmfit, tmp_path):
    out = tmp_path / "digits.yaml"
    code, stdout, err = vlmfit("new", "--model", "tiny:qwen2_vl", "--data", "builtin:mnist", "--out", out)
    assert code == 0 and load_config(out).eval.modes == ["constrained", "generate"], err
    code, stdout, err = vlmfit("new", "--model", "tiny:qwen2_vl", "--data", "builtin:mnist", "--out", out)
    assert code == 2 and "already exists" in stdout + err
    code, stdout, err = vlmfit("new", "--model", "tiny:qwen2_vl", "--data", "builtin:mnist", "--method", "dpo",
                               "--out", tmp_path / "x.yaml")
    assert code == 2 and "not method dpo" in " ".join((stdout + err).split())  # rich wraps lines
    code, stdout, err = vlmfit("new", "--data", "builtin:mnist")
    assert code == 2 and "--model" in stdout + err
    code, stdout, err = vlmfit("new", "--model", "tiny:qwen2_vl", "--data", "builtin:mnist", "--task", "captions",
                               "--out", tmp_path / "y.yaml")
    assert code == 2 and "task" in stdout + err and not (tmp_path / "y.yaml").exists()
