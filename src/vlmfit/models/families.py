"""Per-family facts about VLMs, as data: chat turn markers, image/video tokens, module prefixes of the towers,
wrapper classes around nn.Linear, and known hyperparameter advice. Adding a family = adding one entry here."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmfit.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.model_type values that belong to this family
    processor_classes: tuple[str, ...]  # transformers processor class names of this family
    assistant_start: str  # text that opens an assistant turn in the chat template (not trained on)
    turn_end: str  # token that closes an assistant turn (trained on: the model must learn to stop)
    image_token: str  # placeholder the processor expands into one token per image feature
    video_token: str | None = None
    # Module-name prefixes (of the *ForConditionalGeneration model) per part. The projector is matched first,
    # because in Qwen it sits inside the vision module (model.visual.merger).
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()
    language_prefixes: tuple[str, ...] = ()
    # Modules that wrap an nn.Linear (PEFT cannot adapt the wrapper itself, so LoRA goes on the inner linear).
    wrapper_classes: tuple[str, ...] = ()
    # Extra model inputs the processor must hand to the model (dropping them silently changes attention).
    required_inputs: tuple[str, ...] = ()
    # "chat": the processor's chat template renders the conversation. "prefix_suffix": no chat template; the
    # processor takes a prompt and a `suffix` (the answer) and masks the prompt itself (PaliGemma).
    prompt_style: str = "chat"
    # How labels find the assistant replies: "markers" (assistant_start ... turn_end, fast) or "prefix"
    # (render the conversation prefix by prefix; works for any chat template, used for unknown families).
    label_method: str = "markers"
    # Which image-resolution knobs the processor has: "pixels" (min/max pixels, Qwen), "soft_tokens" (Gemma 4).
    resolution: str | None = None
    advice: tuple[str, ...] = field(default_factory=tuple)


_QWEN = dict(
    assistant_start="<|im_start|>assistant\n",
    turn_end="<|im_end|>",
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    vision_prefixes=("model.visual.",),
    projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_prefixes=("model.language_model.",),
    required_inputs=("pixel_values", "image_grid_thw"),
    resolution="pixels",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), **_QWEN),
        Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), **_QWEN),
        Family("qwen3_vl", ("qwen3_vl",), ("Qwen3VLProcessor",), **_QWEN),
        Family(
            "smolvlm",
            ("idefics3", "smolvlm"),
            ("Idefics3Processor", "SmolVLMProcessor"),
            assistant_start="Assistant:",
            turn_end="<end_of_utterance>",
            image_token="<image>",
            vision_prefixes=("model.vision_model.",),
            projector_prefixes=("model.connector.",),
            language_prefixes=("model.text_model.",),
            required_inputs=("pixel_values",),
        ),
        Family(
            "gemma3",
            ("gemma3",),
            ("Gemma3Processor",),
            assistant_start="<start_of_turn>model\n",
            turn_end="<end_of_turn>",
            image_token="<image_soft_token>",
            vision_prefixes=("model.vision_tower.",),
            projector_prefixes=("model.multi_modal_projector.",),
            language_prefixes=("model.language_model.",),
            required_inputs=("pixel_values", "token_type_ids"),
        ),
        Family(
            "gemma4",
            ("gemma4",),
            ("Gemma4Processor",),
            assistant_start="<|turn>model\n",
            turn_end="<turn|>",
            image_token="<|image|>",
            video_token="<|video|>",
            vision_prefixes=("model.vision_tower.", "model.audio_tower."),
            projector_prefixes=("model.embed_vision.", "model.embed_audio."),
            language_prefixes=("model.language_model.",),
            wrapper_classes=("Gemma4ClippableLinear",),
            resolution="soft_tokens",
            required_inputs=("pixel_values", "mm_token_type_ids"),
            advice=(
                "Gemma 4 LoRA has shown exploding gradient norms (transformers#45676): clip at max_grad_norm 0.1 "
                "with lr ~5e-5.",
            ),
        ),
        Family(
            "llava",
            ("llava",),
            ("LlavaProcessor",),
            assistant_start="ASSISTANT:",
            turn_end="</s>",
            image_token="<image>",
            vision_prefixes=("model.vision_tower.",),
            projector_prefixes=("model.multi_modal_projector.",),
            language_prefixes=("model.language_model.",),
            required_inputs=("pixel_values",),
        ),
        Family(
            "paligemma",
            ("paligemma",),
            ("PaliGemmaProcessor",),
            assistant_start="",
            turn_end="<eos>",
            image_token="<image>",
            vision_prefixes=("model.vision_tower.",),
            projector_prefixes=("model.multi_modal_projector.",),
            language_prefixes=("model.language_model.",),
            required_inputs=("pixel_values", "token_type_ids"),
            prompt_style="prefix_suffix",
            label_method="suffix",
            advice=("PaliGemma is a single-turn prefix-LM: one question, one answer per example.",),
        ),
    ]
}

# Module-name keywords that place a module of an unknown family (checked in this order).
GENERIC_PARTS = (
    ("projector", ("multi_modal_projector", "connector", "merger", "mm_projector", "embed_vision")),
    ("vision", ("vision", "visual", "image_encoder")),
    ("language", ("language_model", "text_model", "model.layers", "model.embed_tokens")),
)


def generic_family(processor, model_type: str) -> Family:
    """A family for a model vlmfit has no table for: labels by prefix rendering, parts by module-name keywords."""
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or "<image>"
    return Family(
        name=f"generic:{model_type}",
        model_types=(model_type,),
        processor_classes=(type(processor).__name__,),
        assistant_start="",
        turn_end=tok.eos_token or "",
        image_token=image_token,
        video_token=getattr(processor, "video_token", None),
        label_method="prefix",
    )


def family_of_model_type(model_type: str) -> Family | None:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


def family_of_processor(processor) -> Family | None:
    name = type(processor).__name__
    for fam in FAMILIES.values():
        if name in fam.processor_classes:
            return fam
    return None


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        from vlmfit.errors import nearest

        near = nearest(name, FAMILIES)
        raise UserError(
            f"unknown model family '{name}'",
            hint=(f"did you mean '{near}'? " if near else "") + f"known families: {', '.join(FAMILIES)}",
        )
    return FAMILIES[name]


# How many image features the model's vision side produces for one processed example, from the config and the
# processor's output alone (no weights needed, so it works on the meta device). Used by `vlmfit doctor` to check
# that the image tokens in input_ids match what the model will put there.
def _qwen_features(config, batch) -> int:
    merge = config.vision_config.spatial_merge_size
    grids = [batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch]
    return int(sum((g.prod(-1) // merge**2).sum() for g in grids))


def _fixed_per_image(per_image):
    def count(config, batch) -> int:
        return int(batch["pixel_values"].shape[0]) * per_image(config) if "pixel_values" in batch else 0

    return count


def _idefics3_features(config, batch) -> int:
    v = config.vision_config
    per_tile = (v.image_size // v.patch_size) ** 2 // config.scale_factor**2
    pv = batch["pixel_values"]  # (batch, tiles, C, H, W); padding tiles are all zeros
    real_tiles = int((pv.flatten(2).abs().sum(-1) > 0).sum())
    return real_tiles * per_tile


def _gemma4_features(config, batch) -> int:
    if "image_position_ids" not in batch:
        return 0
    real_patches = (batch["image_position_ids"] != -1).all(dim=-1).sum()
    return int(real_patches // config.vision_config.pooling_kernel_size**2)


def _llava_per_image(config) -> int:
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (1 if config.vision_feature_select_strategy == "full" else 0)


IMAGE_FEATURES = {
    "qwen2_vl": _qwen_features,
    "qwen2_5_vl": _qwen_features,
    "qwen3_vl": _qwen_features,
    "smolvlm": _idefics3_features,
    "gemma3": _fixed_per_image(lambda c: c.mm_tokens_per_image),
    "gemma4": _gemma4_features,
    "llava": _fixed_per_image(_llava_per_image),
    "paligemma": _fixed_per_image(lambda c: (c.vision_config.image_size // c.vision_config.patch_size) ** 2),
}
