"""Experiment trackers (train.report_to) through transformers' own integrations, local-first: no account and no
network needed, the logs inside the run directory (tracking/) unless the user's environment already points a tracker
elsewhere (their TRACKIO_DIR, WANDB_MODE / WANDB_DIR, MLFLOW_TRACKING_URI, TENSORBOARD_LOGGING_DIR win).

Each tracker is configured by the environment variables its transformers callback (or the tracker itself) reads:
- tensorboard: event files in tracking/tensorboard (TENSORBOARD_LOGGING_DIR); `tensorboard --logdir` shows them;
- trackio: its SQLite database for project "vlmfit" in tracking/trackio (TRACKIO_DIR); `TRACKIO_DIR=... trackio show`;
- wandb: offline mode (WANDB_MODE=offline), files in tracking/wandb; `wandb sync` uploads them later;
- mlflow: a SQLite store, tracking/mlflow.db (MLFLOW_TRACKING_URI; mlflow 3 refuses new file stores), experiment
  "vlmfit"; `mlflow ui --backend-store-uri sqlite:///.../mlflow.db`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from vlmfit.config import RunConfig
from vlmfit.errors import UserError
from vlmfit.rundir import RunDir

PROJECT = "vlmfit"
# tracker -> (module it needs, the pinned package that provides it)
PACKAGES = {"trackio": ("trackio", "trackio==0.43.0"), "tensorboard": ("tensorboard", "tensorboard==2.21.0"),
            "wandb": ("wandb", "wandb==0.31.0"), "mlflow": ("mlflow", "mlflow-skinny==3.17.2")}
# what vlmfit itself set in this process: a later run in the same process replaces those, never the user's own
_OURS: dict[str, str] = {}


def require_trackers(cfg: RunConfig) -> None:
    """Every tracker in train.report_to is installed (checked before any model or data is loaded)."""
    missing = [t for t in cfg.train.report_to if importlib.util.find_spec(PACKAGES[t][0]) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
                        where="train.report_to",
                        hint=f"pip install 'vlmfit[track]' (or {' '.join(PACKAGES[t][1] for t in missing)}), or remove "
                             "them from train.report_to")


def _setdefault(name: str, value: str) -> str:
    """Set `name` unless the user set it; returns the value in force."""
    current = os.environ.get(name)
    if current is None or _OURS.get(name) == current:
        os.environ[name] = _OURS[name] = value
        return value
    return current


def track_locally(cfg: RunConfig, run: RunDir) -> dict[str, str]:
    """Point each tracker of train.report_to at the run directory (unless the user's environment says otherwise)
    and return, per tracker, where its logs go, in words (for the summary and the report)."""
    where: dict[str, str] = {}
    base = run.tracking
    for tracker in cfg.train.report_to:
        if tracker == "tensorboard":
            where[tracker] = _setdefault("TENSORBOARD_LOGGING_DIR", str(base / "tensorboard"))
        elif tracker == "trackio":
            wanted = _setdefault("TRACKIO_DIR", str(base / "trackio"))
            loaded = sys.modules.get("trackio.utils")  # trackio reads TRACKIO_DIR once, when first imported
            where[tracker] = str(loaded.TRACKIO_DIR if loaded is not None else wanted) + f" (project {PROJECT})"
        elif tracker == "wandb":
            mode = _setdefault("WANDB_MODE", "offline")
            _setdefault("WANDB_PROJECT", PROJECT)
            where[tracker] = _setdefault("WANDB_DIR", str(base)) + f" (wandb mode {mode})"
        elif tracker == "mlflow":
            _setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT)
            where[tracker] = _setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(base / 'mlflow.db').resolve()}")
    if where:
        base.mkdir(parents=True, exist_ok=True)
    return where


def tracker_arguments(cfg: RunConfig, run: RunDir) -> dict:
    """The TrainingArguments of the trackers: which callbacks, and the run's name and project in them."""
    return dict(report_to=list(cfg.train.report_to) or "none", run_name=Path(run.path).name, project=PROJECT)
