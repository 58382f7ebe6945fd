"""The causal-LM loss and log-probabilities over the positions that carry a label only. The LM head runs on those
positions alone (transformers' `logits_to_keep` with a boolean mask: the model's own forward, so the family's head
transforms, Gemma's final logit soft-capping and tied heads included, apply exactly), and the fp32 upcast and
softmax of the cross-entropy are made one chunk at a time, recomputed in backward rather than kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**26  # logits per fp32 cross-entropy chunk (256 MiB): 256 positions of a 262k vocabulary


def chunk_for(vocab: int) -> int:
    """Labelled positions per cross-entropy chunk for this vocabulary size."""
    return max(1, CHUNK_ELEMENTS // vocab)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the positions whose logits predict a labelled token (the next one)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def labelled_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [n, vocab] at the n labelled positions, their targets [n], the row of each [n]), row-major."""
    labels = batch["labels"]
    keep = loss_positions(labels)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])
    return logits, labels[:, 1:][keep[:, :-1]], keep.nonzero()[:, 0]


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def causal_lm_loss(model, batch: dict, num_items: int | torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed token cross-entropy over the labelled positions, divided by `num_items` (the Trainer's count of
    labelled tokens in the whole global batch, so gradient accumulation sums to the big-batch loss) or by this
    batch's own count: what transformers' ForCausalLMLoss computes on full logits."""
    logits, targets, _ = labelled_logits(model, batch)
    chunk = chunk or chunk_for(logits.shape[-1])
    n = num_items if num_items is not None else max(len(targets), 1)
    n = n.to(logits.device) if torch.is_tensor(n) else n
    if len(targets) <= chunk:  # one chunk: recomputing it in backward would only keep its input alive longer
        return _nll_sum(logits, targets) / n
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(0, len(targets), chunk):
        part = (logits[i:i + chunk], targets[i:i + chunk])
        total = total + (checkpoint(_nll_sum, *part, use_reentrant=False) if logits.requires_grad else _nll_sum(*part))
    return total / n


@torch.no_grad()
def sequence_logprobs(model, batch: dict, chunk: int | None = None) -> torch.Tensor:
    """[batch] sum of log p(token) over each sequence's labelled tokens."""
    logits, targets, rows = labelled_logits(model, batch)
    chunk = chunk or chunk_for(logits.shape[-1])
    out = torch.zeros(batch["labels"].shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, len(targets), chunk):
        lp = torch.log_softmax(logits[i:i + chunk].float(), -1).gather(-1, targets[i:i + chunk, None]).squeeze(-1)
        out.index_add_(0, rows[i:i + chunk], lp)
    return out
