"""train.report_to: the config takes what TrainingArguments takes, a missing tracker is a clear error before anything
loads, the trackers log inside the run directory unless the user's environment says otherwise, and (slow) a real
run's losses appear in tensorboard, trackio, wandb (offline) and mlflow, the same as in metrics.jsonl."""

import json
import os
import subprocess
import sys

import pytest

from vlmfit.config import load_config
from vlmfit.errors import UserError
from vlmfit.rundir import RunDir
from vlmfit.train import tracking

ENV_VARS = ("TRACKIO_DIR", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
            "TENSORBOARD_LOGGING_DIR")


def cfg(*sets, method="full"):
    return load_config(base={"model": {"name": "tiny:qwen2_vl"}, "method": method}, overrides=list(sets))


@pytest.mark.parametrize("given, trackers", [("none", []), ("tensorboard", ["tensorboard"]),
                                             ("trackio,wandb", ["trackio", "wandb"]), ("[mlflow, tensorboard]", ["mlflow", "tensorboard"])])
def test_report_to_takes_none_one_or_several(given, trackers):
    assert cfg(f"train.report_to={given}").train.report_to == trackers


def test_report_to_typo_and_zo_are_config_errors():
    with pytest.raises(UserError) as e:
        cfg("train.report_to=tensorbord")
    assert "train.report_to" in str(e.value) and "'tensorboard'" in str(e.value)
    with pytest.raises(UserError) as e:
        cfg("train.report_to=none,wandb")  # none is on its own or not at all
    with pytest.raises(UserError) as e:
        cfg("train.report_to=trackio", method="zo")
    assert "metrics.jsonl" in str(e.value)


def test_a_missing_tracker_names_the_package_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError) as e:
        tracking.require_trackers(cfg("train.report_to=tensorboard,wandb"))
    assert "wandb" in e.value.what and "tensorboard" not in e.value.what and "wandb==" in e.value.hint
    tracking.require_trackers(cfg("train.report_to=tensorboard"))  # installed: no error


def test_logs_go_to_the_run_directory_unless_the_user_points_elsewhere(tmp_path, monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "_OURS", {})
    c = cfg("train.report_to=tensorboard,wandb,mlflow", f"output.dir={tmp_path}", "output.name=a")
    run = RunDir.create(c)
    where = tracking.track_locally(c, run)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run.path / "tracking" / "tensorboard") == where["tensorboard"]
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(run.path / "tracking")
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///") and str(run.path) in os.environ["MLFLOW_TRACKING_URI"]
    args = tracking.tracker_arguments(c, run)
    assert args["report_to"] == ["tensorboard", "wandb", "mlflow"] and args["run_name"] == "a"
    # a second run in the same process moves vlmfit's own settings to its directory...
    c2 = c.model_copy(update={"output": c.output.model_copy(update={"name": "b"})})
    run2 = RunDir.create(c2)
    tracking.track_locally(c2, run2)
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(run2.path / "tracking" / "tensorboard")
    # ...but what the user set stays theirs
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "mine"))
    where = tracking.track_locally(c2, run2)
    assert os.environ["WANDB_MODE"] == "online" and where["tensorboard"] == str(tmp_path / "mine")
    assert tracking.tracker_arguments(cfg(), run)["report_to"] == "none"


@pytest.mark.slow
def test_a_run_logs_its_losses_to_every_tracker(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: tiny:qwen2_vl}\nmethod: full\ndata: {train_limit: 8, eval_limit: 4}\n"
                      "train: {max_steps: 4, batch_size: 2, logging_steps: 1, report_to: [tensorboard, trackio, wandb, mlflow]}\n"
                      f"eval: {{before: false, after: false}}\noutput: {{dir: '{tmp_path}', name: run}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    # a fresh process: trackio reads TRACKIO_DIR when first imported
    done = subprocess.run([sys.executable, "-m", "vlmfit", "train", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["tracking"]) == {"tensorboard", "trackio", "wandb", "mlflow"}
    assert "tracking: tensorboard at" in (run / "report.md").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tracking" / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)

    db = run / "tracking" / "trackio" / "vlmfit.db"
    import sqlite3

    rows = [json.loads(r[0]) for r in sqlite3.connect(db).execute("select metrics from metrics order by step")]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx(losses, rel=1e-6)

    (offline,) = (run / "tracking" / "wandb").glob("offline-run-*")
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "vlmfit"]
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert [m.value for m in sorted(client.get_metric_history(mlrun.info.run_id, "loss"), key=lambda m: m.step)] == pytest.approx(losses, rel=1e-6)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()  # nothing outside the run
