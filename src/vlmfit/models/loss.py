"""The causal-LM loss and log-probabilities over the positions that carry a label only, with the LM head fused into
the loss: never a [positions, vocabulary] tensor, whatever the number of labelled positions.

The model's own forward runs (through every wrapper: DDP, PEFT, accelerate's hooks) with transformers'
`logits_to_keep` set to the labelled positions, so the backbone hands the head exactly the hidden states it would
score. A forward pre-hook on the head keeps those hidden states and gives the head an empty batch instead; the head
itself (the model's own module: tied or not, LoRA-wrapped or not) then runs here, one chunk of positions at a time,
followed by the family's output transform (Gemma's final logit soft-capping: `Family.softcaps_logits`) and the fp32
cross-entropy. With more than one chunk each chunk is a recomputed block (torch.utils.checkpoint): forward and
backward hold one chunk's logits, upcast and gradient, O(chunk x vocabulary). tests/test_loss.py checks loss and
gradients against each family's own full-logits loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25  # logits per chunk (128 MiB in fp32): 128 positions of a 262k vocabulary


def chunk_for(vocab: int) -> int:
    """Labelled positions per head + cross-entropy chunk for this vocabulary size."""
    return max(1, CHUNK_ELEMENTS // vocab)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the positions whose logits predict a labelled token (the next one)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def transformers_model(model):
    """The transformers model inside DDP / FSDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_softcap(model) -> float | None:
    """The soft-cap the model's own forward applies to the head's output, or None."""
    from vlmfit.models.families import family_of_model_type, generic_family

    config = transformers_model(model).config
    family = family_of_model_type(config.model_type) or generic_family(config.model_type)
    cap = getattr(config.get_text_config(), "final_logit_softcapping", None)  # a key only some architectures have
    return cap if family.softcaps_logits and cap else None


class LabelledHidden:
    """(hidden states [n, hidden] at the n labelled positions, their targets [n], the row of each [n]), row-major,
    from the model's own forward, and the head and soft-cap to score them with."""

    def __init__(self, model, batch: dict):
        labels = batch["labels"]
        keep = loss_positions(labels)
        inner = transformers_model(model)
        self.head = inner.get_output_embeddings()
        self.cap = logit_softcap(inner)
        seen: list[torch.Tensor] = []

        def take(module, args):  # the head's input, kept; the head itself computes an empty batch
            seen.append(args[0])
            return (args[0].narrow(-2, 0, 0), *args[1:])

        handle = self.head.register_forward_pre_hook(take)
        try:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "use_cache")}
            model(**inputs, logits_to_keep=keep, use_cache=False)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(f"the LM head ran {len(seen)} times in one forward (expected once)")
        self.hidden = seen[0].reshape(-1, seen[0].shape[-1])
        self.targets = labels[:, 1:][keep[:, :-1]]
        self.rows = keep.nonzero()[:, 0]
        if self.hidden.shape[0] != self.targets.shape[0]:
            raise RuntimeError(f"the model kept {self.hidden.shape[0]} positions for {self.targets.shape[0]} labels")
        self.vocab = inner.config.get_text_config().vocab_size  # sizes the chunks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head and the family's output transform on some of the hidden states, as the model's forward does."""
        logits = self.head(hidden)
        if self.cap is not None:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits


def _nll_sum(hidden: torch.Tensor, targets: torch.Tensor, scorer: LabelledHidden) -> torch.Tensor:
    return F.cross_entropy(scorer.logits(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model, batch: dict, num_items: int | torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Summed token cross-entropy over the labelled positions, divided by `num_items` (the Trainer's count of
    labelled tokens in the whole global batch, so gradient accumulation sums to the big-batch loss) or by this
    batch's own count: what transformers' ForCausalLMLoss computes on full logits."""
    s = LabelledHidden(model, batch)
    chunk = chunk or chunk_for(s.vocab)
    n = num_items if num_items is not None else max(len(s.targets), 1)
    n = n.to(s.hidden.device) if torch.is_tensor(n) else n
    if len(s.targets) <= chunk:  # one chunk: recomputing it in backward would hold the same memory, slower
        return _nll_sum(s.hidden, s.targets, s) / n
    grad = torch.is_grad_enabled() and s.hidden.requires_grad
    total = s.hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(s.hidden.split(chunk), s.targets.split(chunk)):
        total = total + (checkpoint(_nll_sum, h, t, s, use_reentrant=False) if grad else _nll_sum(h, t, s))
    return total / n


@torch.no_grad()
def sequence_logprobs(model, batch: dict, chunk: int | None = None) -> torch.Tensor:
    """[batch] sum of log p(token) over each sequence's labelled tokens."""
    s = LabelledHidden(model, batch)
    chunk = chunk or chunk_for(s.vocab)
    out = torch.zeros(batch["labels"].shape[0], dtype=torch.float32, device=s.hidden.device)
    for h, t, r in zip(s.hidden.split(chunk), s.targets.split(chunk), s.rows.split(chunk)):
        lp = torch.log_softmax(s.logits(h).float(), -1).gather(-1, t[:, None]).squeeze(-1)
        out.index_add_(0, r.to(out.device), lp)
    return out
