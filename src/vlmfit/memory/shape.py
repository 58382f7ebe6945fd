"""What the planner knows about a model without its weights: the real class built on the meta device, its exact
parameter count per part, which linears bitsandbytes would quantize, and the per-layer shapes that set activations.

Layer shapes are read from the instantiated modules (q/k/v/o and MLP linears, norms), not re-derived from config
keys, so family quirks (GQA, Gemma 4's shared K=V full-attention layers, double-wide MLPs, fused qkv) count as built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from vlmfit.errors import UserError
from vlmfit.models.families import Family, family_of_model_type, generic_family, require
from vlmfit.models.meta import meta_model, quantizable
from vlmfit.models.targets import part_of

PARTS = ("vision", "projector", "language", "embeddings")  # embeddings: token embeddings and the LM head


@dataclass
class LayerShape:
    """One transformer block, as the activation formulas need it (feature sizes per token)."""

    hidden: int
    q_dim: int  # heads * head_dim of the queries (= attention output width)
    kv_dim: int  # width of K (and of V unless V reuses K)
    v_dim: int
    heads: int
    mlp_dim: int  # intermediate width
    gated: bool  # SwiGLU / GeGLU (gate * up) vs a plain fc1 -> act -> fc2
    norms: list[int]  # widths of the norms on the residual stream (2 for Llama, 4 for Gemma)
    head_norms: int  # q/k/v norms over head_dim (Qwen 3, Gemma): total width normalised
    fp32_scale: bool  # the norm multiplies its weight in fp32 (Gemma) rather than in the input dtype (Llama)
    layernorm: bool  # nn.LayerNorm (SigLIP, CLIP, Qwen2-VL vision) rather than an RMSNorm
    linears: list[tuple[str, str, int, int]]  # (module name, role, in_features, out_features)


@dataclass
class ModelShape:
    config: object
    model_type: str
    family: Family  # the family table, or the generic family for a model vlmfit has no table for
    model: nn.Module  # the meta-device model (no storage): used to resolve LoRA targets exactly
    params: dict[str, int]  # per part
    linears: dict[str, tuple[str, int, int, int, bool]]  # name -> (part, weight numel, bias numel, out, quantized)
    other_params: dict[str, int]  # per part: parameters outside quantizable linears (norms, embeddings, convs, ...)
    text_layers: list[LayerShape]
    vision_layers: list[LayerShape]
    vocab: int
    hidden: int
    logit_softcap: bool
    cache: dict = field(default_factory=dict, repr=False)  # LoRA resolutions, reused across a fit search

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def largest_param(self) -> int:
        return max((p.numel() for p in self.model.parameters()), default=0)

    def largest_linear(self) -> int:
        return max((v[1] for v in self.linears.values()), default=0)


def _part(name: str, family: Family, embeddings: set[str]) -> str:
    if name in embeddings:
        return "embeddings"
    return part_of(name, family) or "embeddings"


def _embedding_modules(model: nn.Module, family: Family) -> set[str]:
    """Token embedding tables of the language side (input, per-layer inputs) and the output embeddings (LM head);
    position embeddings of a vision tower stay in the vision part."""
    out = {n for n, m in model.named_modules()
           if isinstance(m, nn.Embedding) and m.weight.shape[0] > 1000 and part_of(n, family) in ("language", None)}
    head = model.get_output_embeddings()  # a PreTrainedModel's (meta_model builds one): None without an LM head
    out |= {n for n, m in model.named_modules() if head is not None and m is head}
    return out


def _layer_lists(model: nn.Module, family: Family, embeddings: set[str]) -> dict[str, nn.ModuleList]:
    """The longest ModuleList of blocks in the language model and in the vision tower."""
    best: dict[str, tuple[int, nn.ModuleList]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or not any(True for _ in mod[0].parameters()):
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        part = _part(name + ".0", family, embeddings)
        if part in ("language", "vision") and len(mod) > best.get(part, (0, None))[0]:
            best[part] = (len(mod), mod)
    return {k: v[1] for k, v in best.items()}


_ATTN_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o", "qkv": "qkv",
               "dense": "o", "proj": "o"}
_MLP_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "fc1": "up", "fc2": "down",
              "linear_fc1": "up", "linear_fc2": "down"}


def _role(name: str) -> str:
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "linear" else parts[-1]  # inner linear of a wrapper (Gemma4ClippableLinear)
    in_attn = any(p in ("attn", "self_attn", "attention") for p in parts)
    if in_attn and leaf in _ATTN_ROLES:
        return _ATTN_ROLES[leaf]
    return _MLP_ROLES.get(leaf, "other")


def layer_shape(layer: nn.Module, family: Family, prefix: str = "", model: str = "") -> LayerShape:
    linears = [(f"{prefix}{n}", _role(n), m.in_features, m.out_features)
               for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    by = {}
    for _, role, i, o in linears:
        by.setdefault(role, (i, o))
    hidden = (by.get("q") or by.get("qkv") or by.get("up") or (linears[0][2], 0))[0]
    if "qkv" in by:
        q = kv = v = by["qkv"][1] // 3
    else:
        q = by.get("q", (0, hidden))[1]
        kv = by.get("k", (0, q))[1]
        v = by["v"][1] if "v" in by else kv  # Gemma 4 full-attention layers reuse K as V
    # The attention module's own head count, else its config's: never a guess (attention scores scale with it).
    # Probes by design: the planner reads blocks of any architecture, and each names these attributes its own way.
    heads = next((getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None)
                  for m in layer.modules() if hasattr(m, "head_dim") and hasattr(m, "config")), None)
    if not heads:
        cfg = next((m.config for m in layer.modules() if hasattr(m, "config")), None)
        if cfg is None:
            raise UserError(f"cannot tell the attention heads of {type(layer).__name__} (no config on its modules)",
                            where="model.name", hint=f"the planner does not know this architecture{f' ({model})' if model else ''}")
        heads = getattr(cfg, "num_heads", None) or require(cfg, "num_attention_heads", model)
    mlp = by.get("up", by.get("gate", (0, 4 * hidden)))[1]
    norms, head_norms, fp32_scale, layernorm = [], 0, False, False
    for _, m in layer.named_modules():
        cls = type(m).__name__
        if "Norm" in cls and not list(m.children()):
            w = getattr(m, "weight", None)  # a norm without a learned scale (elementwise_affine=False) has none
            width = int(w.shape[0]) if w is not None else None
            if width == hidden or (width is None and not norms):
                norms.append(hidden)
            else:
                head_norms += q if not head_norms else kv  # q_norm over the queries, k/v norms over the keys
            fp32_scale = fp32_scale or cls in family.fp32_norms
            layernorm = layernorm or isinstance(m, nn.LayerNorm)
    return LayerShape(hidden, q, kv, v, int(heads), mlp, "gate" in by, norms, head_norms, fp32_scale, layernorm,
                      linears)


def model_shape(config, name: str = "") -> ModelShape:
    """Build the model on the meta device and read everything the estimate needs from it. `name` (the model
    reference) goes into the message when the config lacks a key the planner needs."""
    model = meta_model(config)
    family = family_of_model_type(config.model_type) or generic_family(config.model_type)
    embeddings = _embedding_modules(model, family)
    params = dict.fromkeys(PARTS, 0)
    other = dict.fromkeys(PARTS, 0)
    owner = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), (mname, mod, pname))
    linears = {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        mname, mod, pname = owner[id(p)]
        part = _part(mname, family, embeddings)
        params[part] += p.numel()
        if type(mod) is nn.Linear and mname not in embeddings:
            part_, w, b, o, q = linears.get(mname, (part, 0, 0, mod.out_features, quantizable(mname, mod, family, model)))
            linears[mname] = (part_, w + (p.numel() if pname == "weight" else 0), b + (p.numel() if pname == "bias" else 0), o, q)
        else:
            other[part] += p.numel()
    lists = _layer_lists(model, family, embeddings)
    prefix = {id(m): n for n, m in model.named_modules()}
    text = [layer_shape(lay, family, prefix[id(lay)] + ".", name) for lay in lists.get("language", [])]
    vision = [layer_shape(lay, family, prefix[id(lay)] + ".", name) for lay in lists.get("vision", [])]
    tc = config.get_text_config()
    return ModelShape(
        config=config, model_type=config.model_type, family=family, model=model, params=params, linears=linears,
        other_params=other, text_layers=text, vision_layers=vision, vocab=int(require(tc, "vocab_size", name)),
        hidden=int(require(tc, "hidden_size", name)),
        # Only Gemma-style configs define it; absent means the head's logits are not soft-capped (not a guess).
        logit_softcap=bool(getattr(tc, "final_logit_softcapping", None)),
    )
