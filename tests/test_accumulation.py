"""Gradient accumulation and packing are the same training as one big batch (torchtune's 4 x 1 == 1 x 4), on replies
of different token lengths (the `replies` fixture: 2, 4, 9 and 23 labelled tokens), where normalising the loss per
micro-batch instead of over the global batch's labelled tokens gives other losses and other weights. Each equality
is shown to have teeth: the same run with a per-micro-batch mean fails it. (On one-token replies, as the digits
alone have, that broken run logs exactly the big batch's losses.)

Tolerances, rel 1e-5 on both: the logged loss of each step, and the trained weights as one vector
(||w - w_ref|| / ||w_ref||). They differ only by fp32 summation order: measured here at most 1.5e-7 (losses) and
3.2e-7 (weights) after 3 steps, where a per-micro-batch mean moves them by 9e-3 to 1.6e-2 and 5e-3 to 1.6e-2. The
weights are compared as one vector because a tensor whose exact gradient is zero (the attention key biases: softmax
ignores a constant added to every score) gets Adam updates of rounding noise, 3e-4 relative to its own tiny norm."""

import json

import pytest
from rich.console import Console
from safetensors.torch import load_file

import vlmfit.train.trainer as trainer_module
from vlmfit.chat.collate import IGNORE_INDEX, VisionChatCollator
from vlmfit.config import load_config
from vlmfit.models.families import FAMILIES
from vlmfit.models.load import load
from vlmfit.models.packing import packing_refusal
from vlmfit.train.sft import train_sft

RTOL = 1e-5
QUIET = Console(quiet=True)


def train(data, out, batch: int, accum: int, packing: bool = False) -> tuple[list[float], dict]:
    """(logged losses, trained weights) of 3 steps of full fp32 SFT, global batch 4, same seed and data order."""
    cfg = load_config(base={"model": {"name": "x"}}, overrides=[
        "model.name=tiny:qwen2_vl", "model.dtype=float32", "method=full", f"data.source={data}", f"output.dir={out}",
        "output.name=run", f"train.batch_size={batch}", f"train.grad_accum={accum}", f"train.packing={str(packing).lower()}",
        "train.max_steps=3", "train.lr=1e-3", "train.warmup_ratio=0", "train.logging_steps=1", "train.seed=0",
        "train.precision=fp32", "eval.before=false", "eval.after=false"])
    run = train_sft(cfg, QUIET)
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return losses, load_file(str(run / "model" / "model.safetensors"))


def differences(a, b) -> tuple[float, float]:
    """(largest relative difference of a logged loss, relative difference of all weights as one vector)."""
    (la, wa), (lb, wb) = a, b
    assert len(la) == len(lb) == 3 and wa.keys() == wb.keys()
    loss = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    diff = sum(float((wa[k].double() - wb[k].double()).pow(2).sum()) for k in wb) ** 0.5
    norm = sum(float(wb[k].double().pow(2).sum()) for k in wb) ** 0.5
    return loss, diff / norm


@pytest.fixture(scope="module")
def one_big_batch(replies, tmp_path_factory):
    """Batch 4 x accumulation 1, padded: the reference every other way of cutting the global batch must equal."""
    return train(replies, tmp_path_factory.mktemp("big"), 4, 1)


def per_micro_batch_mean(monkeypatch, accum: int) -> None:
    """The bug the equality guards: each micro-batch's loss is the mean over its own labelled tokens (the loss called
    without the Trainer's global count) and the Trainer then divides by the accumulation steps: a mean of means."""
    real = trainer_module.causal_lm_loss
    monkeypatch.setattr(trainer_module, "causal_lm_loss",
                        lambda model, batch, num_items=None, chunk=None: real(model, batch, None, chunk) / accum)


def test_the_replies_label_different_token_counts(replies):
    """The property the equalities need from their data: micro-batches of one example label different numbers of
    tokens (else a per-micro-batch mean equals the global one and the equalities cannot fail)."""
    import datasets

    loaded = load("tiny:qwen2_vl")
    chat = VisionChatCollator(loaded.processor, loaded.family)
    train_split = datasets.load_from_disk(str(replies))["train"]
    counts = [int((chat([train_split[i]])["labels"] != IGNORE_INDEX).sum()) for i in range(4)]
    assert len(set(counts)) == 4, counts


@pytest.mark.parametrize("batch, accum, packing", [(1, 4, False), (2, 2, True)], ids=["1x4", "packed 2x2"])
def test_accumulation_is_the_same_training_as_one_big_batch(one_big_batch, replies, tmp_path, batch, accum, packing):
    assert packing_refusal(FAMILIES["qwen2_vl"]) is None  # packed for real, not the padded fallback
    loss, weights = differences(train(replies, tmp_path, batch, accum, packing), one_big_batch)
    assert one_big_batch[0][-1] < one_big_batch[0][0]  # it trains
    assert loss < RTOL and weights < RTOL, (loss, weights)


@pytest.mark.parametrize("batch, accum, packing", [(1, 4, False), (2, 2, True)], ids=["1x4", "packed 2x2"])
def test_a_per_micro_batch_mean_fails_the_equality(one_big_batch, replies, tmp_path, monkeypatch, batch, accum, packing):
    """The test above has teeth: the mean of micro-batch means is outside its tolerances, by orders of magnitude."""
    per_micro_batch_mean(monkeypatch, accum)
    loss, weights = differences(train(replies, tmp_path, batch, accum, packing), one_big_batch)
    assert loss > 10 * RTOL and weights > 10 * RTOL, (loss, weights)
