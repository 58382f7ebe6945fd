"""Offline model knowledge for the planner: the shipped config.json of popular VLMs and their published sizes.

`load_model_config` turns a model reference (hub id, local dir, config.json path, tiny:<family>) into a transformers
config without touching weights; shipped hub ids work with no network at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vlmfit.errors import UserError, nearest


@dataclass(frozen=True)
class Published:
    params: float
    kind: str  # "exact": an integer stated or derived from the checkpoint; "rounded": compare at the digits shown
    scope: str  # "total" (whole checkpoint) or "language" (text model only)
    source: str

    def tolerance(self) -> float:
        """Relative tolerance: 0.5% for exact figures; for rounded ones, half a unit of the last digit shown too."""
        if self.kind == "exact":
            return 0.005
        mantissa, exp = f"{self.params:e}".split("e")  # e.g. 3.070000e+10: shown as 30.7B, i.e. to 0.1e9
        shown = mantissa.rstrip("0").rstrip(".")
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        unit = 10.0 ** (int(exp) - decimals)
        return max(0.005, 0.5 * unit / self.params)


def _configs_dir():
    return resources.files("vlmfit.memory").joinpath("configs")


@lru_cache(maxsize=1)
def catalog() -> dict:
    """The shipped index: {"models": {hub_id: {"file", "published"}}, "not_shipped": {hub_id: published}}."""
    return json.loads(_configs_dir().joinpath("index.json").read_text(encoding="utf-8"))


def shipped_ids() -> list[str]:
    return list(catalog()["models"])


def published_counts(hub_id: str) -> list[Published]:
    entry = catalog()["models"].get(hub_id) or {}
    return [Published(**p) for p in entry.get("published", [])]


def shipped_config_dict(hub_id: str) -> dict:
    entry = catalog()["models"][hub_id]
    return json.loads(_configs_dir().joinpath(entry["file"]).read_text(encoding="utf-8"))


def _config_from_dict(doc: dict, where: str):
    from transformers import AutoConfig

    if "model_type" not in doc:
        raise UserError("config.json has no model_type", where=where, hint="give the config.json of a transformers model")
    try:
        return AutoConfig.for_model(**doc)
    except (ValueError, KeyError) as e:
        raise UserError(f"transformers cannot read this config ({str(e).splitlines()[0]})", where=where,
                        hint="vlmfit pins transformers; a newer architecture may need a newer release") from None


def load_model_config(ref: str, revision: str | None = None):
    """A transformers config for `ref`, never loading weights.

    Order: a shipped hub id (offline); a local directory or config.json path; `tiny:<family>` (the tiny zoo);
    otherwise AutoConfig.from_pretrained, which fetches config.json only (or reads the HF cache).
    """
    if ref in catalog()["models"]:
        return _config_from_dict(shipped_config_dict(ref), f"shipped config of {ref}")
    if ref.startswith("tiny:"):
        from vlmfit.models.load import resolve_reference

        ref = resolve_reference(ref)  # builds the tiny model once and caches it; raises UserError on a bad name
    p = Path(ref).expanduser()
    if p.is_file():
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"not a readable JSON config ({e})", where=str(p)) from None
        return _config_from_dict(doc, str(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError("directory has no config.json: not an HF-format model directory", where=str(p))
        return _config_from_dict(json.loads((p / "config.json").read_text()), str(p / "config.json"))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as e:
        near = nearest(ref, shipped_ids())
        raise UserError(
            f"no config for model '{ref}' ({str(e).splitlines()[0][:160]})",
            where="model.name",
            hint=(f"did you mean '{near}'? " if near else "")
            + "shipped offline: " + ", ".join(shipped_ids()) + "; or give a local dir / config.json, or tiny:<family>",
        ) from None
