"""Preference metrics on held-out pairs: the DPO implicit reward beta * (log pi(y|x) - log ref(y|x)) of the chosen
reply against the rejected one (accuracy and margin), and the policy's own log-prob margin, before and after DPO."""

from __future__ import annotations

import contextlib
import time

import torch

from vlmfit.evaluate.classification import eval_mode
from vlmfit.models.loss import sequence_logprobs
from vlmfit.chat.collate import IGNORE_INDEX


@torch.no_grad()
def pair_logprobs(model, pair_collator, pairs: list[dict], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected reply of each pair (the reply tokens only).

    `pair_collator` turns pairs into one batch of rows [prompt+chosen..., prompt+rejected...] with a
    `completion_mask` on the final reply: the batch the DPO trainer itself sees, so these numbers are its numbers.
    """
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = pair_collator(pairs[i : i + batch_size])
        mask = batch.pop("completion_mask")
        batch["labels"] = batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
        c, r = sequence_logprobs(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).cpu().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


@contextlib.contextmanager
def reference_of(model, ref_model=None):
    """The model DPO measures rewards against, for the duration of the block.

    - a separate frozen copy (full fine-tuning: it cannot be avoided there);
    - TRL's frozen 'ref' adapter (LoRA continued from an earlier run's adapter: the reference is that adapter);
    - otherwise the same model with its adapter disabled (a fresh LoRA: the base model, no second copy).
    """
    if ref_model is not None:
        yield ref_model
        return
    peft_config = getattr(model, "peft_config", None)
    if peft_config is None:
        raise ValueError("a model without a PEFT adapter needs an explicit ref_model")
    if "ref" in peft_config:
        active = model.active_adapter
        model.set_adapter("ref", inference_mode=True)
        try:
            yield model
        finally:
            model.set_adapter(active)
        return
    with model.disable_adapter():
        yield model


def evaluate_preference(model, pair_collator, dataset, beta: float, ref_model=None, batch_size: int = 16,
                        groups: list[str] | None = None) -> dict:
    """Reward accuracy and margins of `model` against its reference on `dataset` (prompt/chosen/rejected/images).

    A tie (margin exactly 0, as for every pair before training, when policy and reference are the same weights)
    counts as half right: a coin flip, so an untrained policy scores 50% and not 0%. `groups` (one name per pair,
    e.g. the kind of rejected answer) adds a breakdown.
    """
    was_training = model.training
    eval_mode(model)  # not model.eval(): bitsandbytes' CPU 4-bit layers must stay in training mode (see eval_mode)
    pairs = [dataset[i] for i in range(len(dataset))]
    t0 = time.perf_counter()
    try:
        pol_c, pol_r = pair_logprobs(model, pair_collator, pairs, batch_size)
        with reference_of(model, ref_model) as ref:
            ref_c, ref_r = pair_logprobs(ref, pair_collator, pairs, batch_size)
    finally:
        model.train(was_training)
    result = {"n": len(pairs), "beta": beta, **summarize(pol_c, pol_r, ref_c, ref_r, beta)}
    if groups is not None:
        result["by_group"] = {
            g: summarize(pol_c[idx], pol_r[idx], ref_c[idx], ref_r[idx], beta)
            for g in sorted(set(groups))
            for idx in [torch.tensor([i for i, x in enumerate(groups) if x == g])]
        }
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def summarize(pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float) -> dict:
    rew_c, rew_r = beta * (pol_c - ref_c), beta * (pol_r - ref_r)
    margin = rew_c - rew_r
    own = pol_c - pol_r  # what the policy prefers on its own, whatever the reference thinks
    return {
        "n": len(margin),
        "reward_accuracy": float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()),
        "reward_ties": int((margin == 0).sum()),
        "reward_margin": float(margin.mean()),
        "reward_chosen": float(rew_c.mean()),
        "reward_rejected": float(rew_r.mean()),
        "policy_accuracy": float(((own > 0).float() + 0.5 * (own == 0).float()).mean()),
        "policy_logp_margin": float(own.mean()),
        "policy_logp_chosen": float(pol_c.mean()),
        "policy_logp_rejected": float(pol_r.mean()),
    }
