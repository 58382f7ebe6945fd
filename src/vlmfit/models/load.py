"""Load a VLM and its processor from a hub id, a local HF-format directory, or `tiny:<family>` (offline zoo)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmfit.errors import UserError
from vlmfit.models.families import DUAL_ENCODER_TYPES, FAMILIES, Family, family_of_model_type, family_of_processor, generic_family


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    family: Family
    source: str  # where the weights came from (resolved directory or hub id)
    notes: list[str] = field(default_factory=list)  # what loading decided that the run should print


def resolve_reference(name: str) -> str:
    """Turn a model reference into something from_pretrained accepts, or fail with a clear message."""
    if name.startswith("tiny:"):
        from vlmfit.models.tiny import TINY_FAMILIES, tiny_clip_path, tiny_path

        fam = name.split(":", 1)[1]
        if fam == "clip":  # a dual encoder (CLIPModel) for zero-shot / prompt tuning, not a chat VLM
            return str(tiny_clip_path())
        if fam not in TINY_FAMILIES:
            from vlmfit.errors import nearest

            near = nearest(fam, (*TINY_FAMILIES, "clip"))
            raise UserError(
                f"no tiny model '{name}'",
                where="model.name",
                hint=(f"did you mean 'tiny:{near}'? " if near else "")
                + "see `vlmfit models` for the list; tiny:clip is the tiny CLIP dual encoder",
            )
        return str(tiny_path(fam))
    p = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") != 1
    if looks_local:
        if not p.is_dir():
            raise UserError(
                f"model directory '{name}' does not exist",
                where="model.name",
                hint="give a local HF-format directory (with config.json), a hub id like Qwen/Qwen2-VL-2B-Instruct, or tiny:qwen2_vl",
            )
        if not (p / "config.json").is_file():
            raise UserError(f"'{name}' has no config.json: not an HF-format model directory", where="model.name")
        return str(p)
    return name  # a hub id: from_pretrained downloads (or reads the HF cache)


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_processor(ref: str, revision: str | None = None, model_cfg=None):
    """The processor, with the recipe's image-resolution caps (model.min_pixels / max_pixels / max_soft_tokens)."""
    from transformers import AutoProcessor

    remote = bool(getattr(model_cfg, "trust_remote_code", False))
    try:
        processor = AutoProcessor.from_pretrained(ref, revision=revision, trust_remote_code=remote)
        caps = _resolution_kwargs(processor, model_cfg) if model_cfg is not None else {}
        return AutoProcessor.from_pretrained(ref, revision=revision, trust_remote_code=remote, **caps) if caps else processor
    except OSError as e:
        raise UserError(f"could not load the processor of '{ref}': {str(e).splitlines()[0]}", where="model.name",
                        hint="check the hub id and your network / HF cache (HF_HUB_OFFLINE=1 reads the cache only)") from None


def _resolution_kwargs(processor, m) -> dict:
    asked = {k: getattr(m, k) for k in ("min_pixels", "max_pixels", "max_soft_tokens") if getattr(m, k) is not None}
    if not asked:
        return {}
    family = family_of_processor(processor)
    kind = family.resolution if family else None
    if kind == "pixels" and "max_soft_tokens" not in asked:
        size = processor.image_processor.size
        return {"size": {"shortest_edge": asked.get("min_pixels", size.shortest_edge),
                         "longest_edge": asked.get("max_pixels", size.longest_edge)}}
    if kind == "soft_tokens" and set(asked) == {"max_soft_tokens"}:
        return {"max_soft_tokens": asked["max_soft_tokens"]}
    raise UserError(f"{', '.join('model.' + k for k in asked)} not supported for {family.name if family else type(processor).__name__}",
                    where="model", hint="Qwen families take min_pixels / max_pixels; Gemma 4 takes max_soft_tokens")


def _unquantizable(ref: str, revision: str | None) -> list[str]:
    """The linears kept in the compute dtype when the base is quantized (vlmfit.models.meta.quantizable), found on
    the meta device."""
    from transformers import AutoConfig

    from vlmfit.models.meta import meta_model, unquantized_linears

    config = AutoConfig.from_pretrained(ref, revision=revision)
    return unquantized_linears(meta_model(config), family_of_model_type(config.model_type) or generic_family(config.model_type))


def quantization_config(quantization: str, double_quant: bool, dtype: torch.dtype, skip: list[str]):
    """bitsandbytes settings: 4-bit NF4 (QLoRA) or 8-bit; compute in the training dtype."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_model(ref: str, dtype: str = "auto", revision: str | None = None, quantization: str = "none",
               double_quant: bool = True, trust_remote_code: bool = False, allow_pickle: bool = False) -> torch.nn.Module:
    """The weights, from safetensors only unless `allow_pickle` (then transformers reads .bin files with
    torch.load(weights_only=True)); the repository's own code only with `trust_remote_code`."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict = {"dtype": pick_dtype(dtype), "revision": revision, "trust_remote_code": trust_remote_code,
                    "use_safetensors": None if allow_pickle else True}
    if quantization != "none":
        kwargs["quantization_config"] = quantization_config(quantization, double_quant, kwargs["dtype"], _unquantizable(ref, revision))
        kwargs["device_map"] = {"": 0} if torch.cuda.is_available() else "cpu"  # bnb places the quantized weights
    try:
        model = AutoModelForImageTextToText.from_pretrained(ref, **kwargs)
        if quantization != "none":
            # A quantized base never trains; frozen from the start, bitsandbytes' in-place bias add also works in eval.
            model.requires_grad_(False)
        return model
    except OSError as e:
        if not allow_pickle and _pickle_only(ref):
            raise UserError(f"the weights of '{ref}' are pickle files (.bin / .pt) and there are no safetensors; vlmfit "
                            "loads safetensors only, since unpickling can run code", where="model.name",
                            hint="convert the weights to safetensors, or set model.allow_pickle: true for a file you trust "
                                 "(then read with torch.load(weights_only=True))") from None
        raise UserError(f"could not load the model '{ref}': {str(e).splitlines()[0]}", where="model.name",
                        hint="check the hub id and your network / HF cache (HF_HUB_OFFLINE=1 reads the cache only)") from None


def _pickle_only(ref: str) -> bool:
    p = Path(ref)
    return p.is_dir() and not any(p.glob("*.safetensors")) and (any(p.glob("*.bin")) or any(p.glob("*.pt")))


def family_for(model_type: str, processor, name: str) -> Family:
    """The family table for this model; an unknown model with a chat template still trains (prefix labelling)."""
    family = family_of_model_type(model_type) or family_of_processor(processor)
    if family is not None:
        return family
    if getattr(processor, "chat_template", None) and getattr(processor, "tokenizer", None) is not None:
        return generic_family(model_type, processor)
    raise UserError(
        f"model type '{model_type}' is not a known VLM family and its processor has no chat template",
        where="model.name",
        hint=f"known: {', '.join(FAMILIES)}; or give the processor a chat template",
    )


def model_type_of(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """config.model_type of a resolved reference (reads config.json only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"'{ref}' needs its own Python code from the model repository (an architecture transformers "
                            "does not ship), and vlmfit runs no remote code unless the recipe allows it", where="model.name",
                            hint="read that code, then set model.trust_remote_code: true; or pick a model transformers "
                                 "supports natively") from None
        raise UserError(f"could not read the config of '{ref}': {str(e).splitlines()[0]}", where="model.name",
                        hint="check the hub id and your network / HF cache (HF_HUB_OFFLINE=1 reads the cache only)") from None


def is_dual_encoder(model_type: str) -> bool:
    return model_type in DUAL_ENCODER_TYPES


def check_model(name: str, revision: str | None = None, *, chat: bool = True, trust_remote_code: bool = False) -> tuple[str, str]:
    """Resolve a model reference and read its config, before any data is touched: (reference, model_type). With
    `chat`, a dual encoder (CLIP: no chat template, labels or generation) is refused with what to do instead."""
    ref = resolve_reference(name)
    model_type = model_type_of(ref, revision, trust_remote_code)
    if chat and is_dual_encoder(model_type):
        raise UserError(f"'{name}' is a CLIP dual encoder, not a chat VLM: it has no chat template, labels or generation",
                        where="model.name", hint="train it with method: zo (prompt tuning, e.g. recipes/zo-clip.yaml); "
                        "SFT, DPO, doctor and eval need a generative VLM")
    return ref, model_type


def load_dual_encoder(name: str, revision: str | None = None, dtype: str = "auto"):
    """A CLIP model (on the GPU when there is one) and its processor, for prompt tuning and zero-shot scoring."""
    from transformers import AutoProcessor, CLIPModel

    ref = resolve_reference(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CLIPModel.from_pretrained(ref, revision=revision, dtype=pick_dtype(dtype)).to(device)
    return model, AutoProcessor.from_pretrained(ref, revision=revision)


def load(name: str, dtype: str = "auto", revision: str | None = None, model_cfg=None, quantization: str = "none") -> Loaded:
    """Model + processor + family. `model_cfg` (the recipe's model section) adds resolution caps and quantization."""
    remote, pickle = (model_cfg.trust_remote_code, model_cfg.allow_pickle) if model_cfg is not None else (False, False)
    ref, _ = check_model(name, revision, trust_remote_code=remote)
    processor = load_processor(ref, revision, model_cfg)
    quant = quantization if model_cfg is None or quantization != "none" else model_cfg.quantization
    model = load_model(ref, dtype, revision, quant, model_cfg.double_quant if model_cfg is not None else True, remote, pickle)
    family = family_for(model.config.model_type, processor, name)
    check_image_token(model, processor, family, name)
    return Loaded(model, processor, family, ref)


def load_for(cfg, name: str | None = None, dtype: str | None = None) -> Loaded:
    """The model a recipe (a RunConfig) trains: its model section (resolution caps, remote code, pickle rule) and the
    quantization its method implies. `name` loads other weights under the same section (an earlier run's); the
    revision then does not apply. `dtype` overrides model.dtype (export merges in float32)."""
    m = cfg.model
    name = name or m.name
    loaded = load(name, dtype or m.dtype, m.revision if name == m.name else None, m, cfg.quantization)
    if torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # DDP needs every parameter on one device type
        from vlmfit.models.placement import host_modules, place

        loaded.notes.extend(place(loaded.model, host_modules(loaded.model, loaded.family, m, cfg.method,
                                                             cfg.lora.train_fully if cfg.lora else ())))
    return loaded


def check_image_token(model, processor, family: Family, name: str) -> None:
    """The processor writes the image placeholder the model replaces with image features: a processor from another
    checkpoint (or an edited tokenizer) would put the features nowhere, or index past the embedding, mid-run."""
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not family.image_token:
        return
    written = tok.convert_tokens_to_ids(family.image_token)
    if written is None or written == tok.unk_token_id:
        raise UserError(f"the processor's tokenizer does not know the image token {family.image_token!r}", where="model.name",
                        hint=f"use the processor that ships with '{name}'")
    config = model.config
    expected = next((getattr(c, k) for c in (config, getattr(config, "text_config", None)) if c is not None
                     for k in ("image_token_id", "image_token_index") if getattr(c, k, None) is not None), None)
    vocab = model.get_input_embeddings().num_embeddings
    if expected is not None and expected != written or written >= vocab:
        raise UserError(f"the model replaces token id {expected} with image features (embedding of {vocab:,} tokens), but "
                        f"its processor writes {family.image_token!r} as id {written}", where="model.name",
                        hint=f"the processor and the weights come from different checkpoints: use the processor of '{name}'")
