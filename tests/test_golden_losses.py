"""Golden losses, as torchtune's recipe tests pin them: one short recipe per method (SFT full, LoRA, QLoRA, DPO,
forward-only), trained by the real `vlmfit train` (in process), must log the same first losses (metrics.jsonl,
logging_steps 1) as tests/golden/losses.json. A silent change of the labels, the loss's scaling, how accumulated
micro-batches are normalised, DPO's loss or forward-only's update turns them red (measured below); "the loss went
down" never would.

Data: the `digits` fixture's 16 images. DPO builds its pairs from their labels; SFT and forward-only train on the
`replies` fixture (the same digits, replies of 1 to 12 words), because with one-token replies every micro-batch
labels as many tokens as the next and a per-micro-batch mean of the loss would log the golden figures too.

Tolerance: rel 1e-4 (RTOL). The figures are CPU float32 from this machine (2-core AMD EPYC, torch 2.14.1,
bitsandbytes 0.50.2 without the optional `kernels` package). Another CPU, BLAS build or thread count sums in another
order: measured here, OMP_NUM_THREADS 1 against 2 moves them by 0 to 8e-8 (relative) over 4 steps; three orders of
magnitude more leaves room for other x86 kernels (AVX2 / AVX-512) through 3-4 Adam steps. What this guards moves
them by more, measured by breaking each on purpose: a loss 0.1% too large 1.0e-3, the sign of forward-only's update
1.4e-3, DPO's beta 1% off 7.6e-3, a per-micro-batch mean of the SFT loss 7.6e-3 to 9.2e-3, the end-of-turn label
dropped from every reply 0.16 (DPO) to 0.17 (SFT).

Regenerate only when a change is meant to move the losses (and say why in its commit):

    .venv/bin/python tests/test_golden_losses.py --regenerate

It runs these tests with VLMFIT_REGENERATE_GOLDEN=1: each writes its run's losses into the file instead of comparing.
QLoRA's 4-bit layers run on this CPU (bitsandbytes' CPU backend), so its entry is regenerated with the others."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
REGENERATE = os.environ.get("VLMFIT_REGENERATE_GOLDEN") == "1"
RTOL = 1e-4

COMMON = {"model": {"name": "tiny:qwen2_vl", "dtype": "float32"}, "data": {"train_limit": 16, "eval_limit": 4},
          "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear", "scope": ["language"]},
          "eval": {"before": False, "after": False, "modes": ["constrained"], "batch_size": 4}}
# Each SFT / DPO recipe accumulates (2 x 2), so the pinned losses also pin how micro-batches are normalised.
TRAIN = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "scheduler": "cosine", "warmup_ratio": 0,
         "logging_steps": 1, "seed": 0, "precision": "fp32"}
# (recipe keys over COMMON, the data fixture it trains on)
RECIPES = {
    "sft full": ({"method": "full", "train": TRAIN}, "replies"),
    "sft lora": ({"method": "lora", "train": {**TRAIN, "lr": 1e-2}}, "replies"),
    "sft qlora": ({"method": "qlora", "train": {**TRAIN, "lr": 1e-2}}, "replies"),
    # pairs built from the digits' labels: chosen = the digit's word, rejected = a wrong one or the evasive answer
    "dpo": ({"method": "dpo", "dpo": {"tuning": "lora", "pairs_from_labels": "mixed", "beta": 1.0},
             "train": {**TRAIN, "max_steps": 3, "lr": 2e-2}}, "digits"),
    # forward-only: a record (with its loss) every 2 forward passes; the held-out evaluation of 4 examples at each
    "zo": ({"method": "zo", "zo": {"optimizer": "mezo", "forward_passes": 8, "eval_every": 2, "lr": 1e-2, "eps": 1e-2},
            "train": {"batch_size": 4, "seed": 0}}, "replies"),
}


def recipe(name: str, data: Path, out: Path) -> Path:
    """The recipe as a YAML file a user would write: COMMON, the method's own keys over it, and where to run."""
    spec = {**COMMON, **RECIPES[name][0]}
    spec["data"] = {**COMMON["data"], "source": str(data)}
    spec["output"] = {"dir": str(out), "name": "run"}
    path = out / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def logged_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("name", list(RECIPES))
def test_first_losses_are_the_golden_ones(name, tmp_path, request, vlmfit):
    keys, data = RECIPES[name]
    code, out, err = vlmfit("train", recipe(name, request.getfixturevalue(data), tmp_path))
    assert code == 0, err[-2000:]
    losses = logged_losses(tmp_path / "run")
    steps = keys["train"].get("max_steps") or keys["zo"]["forward_passes"] // keys["zo"]["eval_every"]
    assert len(losses) == steps, losses
    if REGENERATE:
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        golden[name] = losses
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
        return
    want = json.loads(GOLDEN.read_text())[name]
    assert losses == pytest.approx(want, rel=RTOL), f"{name}: logged {losses}, golden {want}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {__file__} --regenerate   (rewrites {GOLDEN})")
    os.environ["VLMFIT_REGENERATE_GOLDEN"] = "1"
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider"]))
