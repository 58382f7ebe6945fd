"""Activation memory of one transformer block per token, re-derived for the layers transformers actually builds
(pre-norm, RMSNorm/LayerNorm computed in fp32, SwiGLU/GeGLU or fc1-act-fc2 MLP, GQA) under sdpa/flash attention.

What autograd keeps (checked with saved-tensor hooks on the real classes; tests/test_memory.py and the benchmark
compare against measurement):
- a norm keeps its fp32 input for the variance (4 B/feature) and, when its weight trains, the normalised tensor;
- flash / memory-efficient attention keeps q and k after RoPE, v, the output and an fp32 log-sum-exp per head
  (no s x s matrix; the o_proj input is a view of the attention output);
- a gated MLP keeps the gate output (activation input), the activation output and the up output; a plain MLP keeps
  the fc1 output;
- a frozen linear keeps nothing for its input (autograd saves the input only to form the weight gradient); a
  trained one keeps its input; a LoRA layer keeps the input of lora_A: its own copy when PEFT casts it (fp32 adapters
  under autocast) or when dropout makes one, plus the dropout mask (bool on CUDA, a float tensor on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmfit.memory.shape import LayerShape


@dataclass(frozen=True)
class Dtypes:
    stream: int  # bytes of the residual stream (the embedding output dtype: fp32 after a k-bit upcast)
    compute: int  # bytes of matmul / attention outputs (2 under bf16/fp16 autocast or a 16-bit model)
    adapter_copy: int  # bytes of the copy a LoRA layer saves for lora_A (0: no copy, the input is shared)
    mask: int  # bytes per element of a dropout mask
    expand_kv: bool  # sdpa repeats K/V to all heads (CUDA with a padding mask) instead of native GQA


def layer_bytes(layer: LayerShape, mode: str, dt: Dtypes, lora: set[str] = frozenset(), r: int = 0,
                dropout: float = 0.0) -> float:
    """Bytes saved for backward per token of one block. mode: full | lora | through (frozen, gradients pass) | none."""
    if mode == "none":
        return 0.0
    sb, cb = dt.stream, dt.compute
    saved = 0.0
    for width in layer.norms:
        saved += 4 * width  # fp32 input kept for the variance
        if mode == "full" and not layer.layernorm:  # LayerNorm's backward recomputes from mean/rstd instead
            saved += (4 if layer.fp32_scale else sb) * width
    saved += 4 * layer.head_norms * (2 if mode == "full" else 1)
    kv = layer.q_dim if dt.expand_kv else layer.kv_dim
    v = layer.q_dim if dt.expand_kv else layer.v_dim
    saved += cb * (2 * layer.q_dim + kv + v) + 4 * layer.heads  # q, k, v, output, log-sum-exp
    saved += cb * layer.mlp_dim * (3 if layer.gated else 1)
    if mode == "full":
        saved += 2 * sb * layer.hidden  # the two norm outputs feed trained q/k/v and gate/up
        saved += cb * layer.mlp_dim  # the down projection's input
    elif mode == "lora":
        shared: set[str] = set()
        for name, role, fan_in, _ in layer.linears:
            if name not in lora:
                continue
            saved += cb * r  # lora_A output, kept by lora_B
            if dt.adapter_copy:
                saved += dt.adapter_copy * fan_in + (dt.mask * fan_in if dropout else 0)
            elif dropout:
                saved += (sb + dt.mask) * fan_in
            else:
                if role == "o":
                    continue  # the o_proj input is a view of the attention output, already counted
                group = "attn_in" if role in ("q", "k", "v", "qkv") else "mlp_in" if role in ("gate", "up") else name
                if group not in shared:  # one tensor feeds q/k/v (and gate/up): saved once
                    shared.add(group)
                    saved += (cb if role == "down" else sb) * fan_in
    return saved


def checkpoint_bytes(layer: LayerShape, dt: Dtypes) -> float:
    """Per token kept by a checkpointed block between forward and backward: its input hidden state."""
    return dt.stream * layer.hidden


def working_bytes(layer: LayerShape, dt: Dtypes) -> float:
    """Per token, the gradients in flight while one block runs backward (MLP-wide grads plus the stream grad)."""
    return 2 * dt.compute * layer.mlp_dim + 2 * dt.stream * layer.hidden


def logits_bytes(vocab: int, dt: Dtypes, softcap: bool) -> float:
    """Per token at the loss: fp32 log-softmax kept for backward, its gradient and the logits gradient (12 B/entry),
    or the fp32 upcast + the 16-bit logits during forward if larger; softcapping keeps its tanh output too."""
    per = max(12, dt.compute + 8) + (dt.compute if softcap else 0)
    return per * vocab


def lean_logits_bytes(vocab: int, dt: Dtypes, softcap: bool, labelled: int, chunk: int) -> float:
    """The fused head + loss (vlmfit.models.loss) for `labelled` positions: in one chunk it is the full-logits loss
    of those positions only; in several, each chunk is recomputed in backward, so one chunk's logits, upcast and
    gradient are alive at a time, whatever `labelled` is."""
    return logits_bytes(vocab, dt, softcap) * min(labelled, chunk)
