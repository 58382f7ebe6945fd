"""Per-family facts about VLMs, as data: chat turn markers, image/video tokens, module prefixes of the towers,
wrapper classes around nn.Linear, how many image tokens and features an image becomes, resolution knobs, and known
hyperparameter advice. Adding a family = adding one entry here (and one tiny-model test)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmfit.errors import UserError, nearest

# model_type values of dual encoders (no chat, labels or generation): they train only by prompt tuning (method zo).
DUAL_ENCODER_TYPES = ("clip",)


def require(config, key: str, model: str = ""):
    """config.<key>, or a UserError naming the key and the model: the planner never guesses a missing value."""
    value = getattr(config, key, None)  # a probe by design: which keys a config has is what this checks
    if value is None:
        kind = type(config).__name__
        raise UserError(f"the model config has no '{key}' ({kind}{f' of {model}' if model else ''})", where="model.name",
                        hint="vlmfit reads this key to count image tokens / layer shapes; a config of an architecture it "
                        "does not know may lack it (see vlmfit.models.families)")
    return value


@dataclass(frozen=True)
class ImageRule:
    """How many tokens an image becomes, for the planner (memory/vision.py does the arithmetic). The numbers are
    the processor defaults the hub checkpoints ship (preprocessor_config.json), so the plan sees what the real
    processor would produce."""

    kind: str  # "dynamic" (Qwen smart_resize), "fixed" (one square resize), "soft_tokens" (Gemma 4), "tiles" (Idefics3)
    min_pixels: int = 0  # processor defaults for "dynamic"
    max_pixels: int = 0
    video_max_pixels: int = 0  # per frame, for videos (Qwen's video processors use a lower cap)
    soft_tokens: int = 0  # Gemma 4 default max_soft_tokens
    video_soft_tokens: int = 0  # Gemma 4 tokens per video frame
    longest_edge_tiles: int = 4  # Idefics3: images are resized to this many tiles on the longest edge
    tokens_key: str | None = None  # "fixed": the config key holding the tokens per image (else one per patch)
    cls_position: bool = False  # "fixed": the encoder keeps a CLS position besides the patches (CLIP towers)
    note: str = ""


# How many image features the model's vision side produces for one processed example, from the config and the
# processor's output alone (no weights needed, so it works on the meta device). `vlmfit doctor` checks that the
# image tokens in input_ids match what the model will put there.
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


# Resolution knobs: the recipe key each kind of processor takes, and the caps `vlmfit plan --fit` tries.
RESOLUTION_KEYS = {"pixels": "max_pixels", "soft_tokens": "max_soft_tokens"}


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
    # Which image-resolution knobs the processor has: "pixels" (min/max pixels, Qwen), "soft_tokens" (Gemma 4),
    # and the caps the auto-fit tries, largest first (None = the processor's default).
    resolution: str | None = None
    resolution_caps: tuple[int, ...] = ()
    image_rule: ImageRule = ImageRule("fixed")
    image_features: Callable | None = None  # (config, processor batch) -> image features the model produces
    advice: tuple[str, ...] = field(default_factory=tuple)
    # Hyperparameters known to go wrong above a limit: ((train.<key>, limit), ...) and what to use instead.
    train_limits: tuple[tuple[str, float], ...] = ()
    train_limits_hint: str = ""
    # Padding-free packing (train.packing): "mrope" (per-example 3-D positions from the model's own rope index),
    # "positions" (per-example 1-D positions), or None with the reason in `packing_note` (padded batches instead).
    # Set only where tests/test_packing.py shows packed == one-at-a-time, losses and gradients.
    packing: str | None = None
    packing_note: str = ""
    # The pixel tensors carry a batch dimension before the images (Idefics3: [batch, images, C, H, W]).
    images_per_row: bool = False
    # Per-position tensors the processor returns besides input_ids and attention_mask, each with the value that pads
    # it (0: text). chat/rows.py pads, packs and splits these along the sequence (with input_ids, attention_mask and
    # vlmfit's labels); every other tensor of an encoding is per image, tile or video. tests/test_packing.py checks
    # them against each family's processor output.
    sequence_inputs: tuple[tuple[str, int], ...] = ()
    # Video frames the vision tower folds into one temporal patch (Qwen: 2, its processor repeats the last frame to
    # fill one); sampling a multiple of it wastes no compute on a repeated frame (see video_frame_multiple).
    temporal_patch: int = 1
    # Norm classes that scale by their weight in fp32 (Gemma's RMSNorm: x * (1 + w) in float) rather than in the
    # input dtype: the planner counts an fp32 copy of their input (memory/shape.py, memory/activations.py).
    fp32_norms: tuple[str, ...] = ()
    # Frozen-tower image features can be handed back through `mm_encoder_outputs` (models/features.py): set only
    # where tests/test_features.py shows the same loss and gradients. Not Qwen3-VL (its deepstack features are
    # not in that input), SmolVLM (features per tile, not per image) or Gemma 4 (not verified).
    feature_cache: bool = False
    # Some parameters get no gradient in a step whatever the batch (Gemma 4's audio tower on image data): DDP must
    # look for unused parameters each step (ddp_find_unused_parameters), or it waits for their gradients forever.
    ddp_unused_parameters: bool = False
    # The model's forward soft-caps the LM head's output with the text config's final_logit_softcapping
    # (logits / cap, tanh, * cap; Gemma 4, PaliGemma 2). models/loss.py applies the same transform when it runs the
    # head itself, chunk by chunk; tests/test_loss.py checks it against each family's own full-logits loss. Gemma 3's
    # forward applies none, whatever its config says.
    softcaps_logits: bool = False
    # Modules vlmfit's data never runs (Gemma 4's audio tower: vlmfit trains on images and video) and frozen lookup
    # tables with no matmul (Gemma 3n / 4's per-layer embeddings): kept in host memory on a GPU run
    # (models/placement.py, model.unused_towers / model.per_layer_embeddings); the planner leaves them off the device.
    unused_towers: tuple[str, ...] = ()
    host_tables: tuple[str, ...] = ()
    # Prefixes of the added tokens the processor writes around an image's tiles (Idefics3 / SmolVLM's
    # `<row_1_col_1>`, `<global-img>`): multimodal markers RL generation must never sample (models/rollout.py).
    tile_markers: tuple[str, ...] = ()


_QWEN = dict(
    assistant_start="<|im_start|>assistant\n",
    turn_end="<|im_end|>",
    image_token="<|image_pad|>",
    video_token="<|video_pad|>",
    vision_prefixes=("model.visual.",),
    projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
    language_prefixes=("model.language_model.",),
    # mm_token_type_ids: without it M-RoPE cannot place the image tokens (transformers raises for Qwen2-VL and up)
    required_inputs=("pixel_values", "image_grid_thw", "mm_token_type_ids"),
    sequence_inputs=(("mm_token_type_ids", 0),),
    temporal_patch=2,
    resolution="pixels",
    resolution_caps=(1003520, 602112, 401408, 200704, 100352),  # 1280 / 768 / 512 / 256 / 128 tokens
    image_features=_qwen_features,
    packing="mrope",
)
_QWEN_FEATURES = dict(_QWEN, feature_cache=True)
# Qwen2/2.5-VL: one LLM token per 28x28 px after smart_resize, the encoder sees 4x that (2x2 merge);
# hub preprocessor_config: min_pixels 3136, max_pixels 12845056; video frames capped at 768 tokens.
_QWEN2_RULE = ImageRule("dynamic", 3136, 12845056, 768 * 28 * 28, note="1 token / 28x28 px; encoder 4x")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), **_QWEN_FEATURES, image_rule=_QWEN2_RULE),
        Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), **_QWEN_FEATURES, image_rule=_QWEN2_RULE),
        # Qwen3-VL: patch 16, merge 2 -> one token per 32x32 px; size.shortest_edge 65536, longest_edge 16777216.
        Family("qwen3_vl", ("qwen3_vl",), ("Qwen3VLProcessor",), **_QWEN,
               image_rule=ImageRule("dynamic", 65536, 16777216, 768 * 32 * 32, note="1 token / 32x32 px; encoder 4x")),
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
            # Longest edge resized to 4 tiles of vision image_size, split into tiles (+1 global image when split);
            # each tile = (image_size/patch)^2 patches, pixel-shuffled by scale_factor^2 into tokens.
            image_rule=ImageRule("tiles", longest_edge_tiles=4, note="tiles of image_size px (+1 global)"),
            image_features=_idefics3_features,
            packing="positions",
            images_per_row=True,
            tile_markers=("<row_", "<global-img>", "<fake_token_around_image>"),
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
            sequence_inputs=(("token_type_ids", 0),),
            fp32_norms=("Gemma3RMSNorm",),
            # Every image is resized to 896x896 (4096 patches of 14 px), pooled to mm_tokens_per_image (256).
            image_rule=ImageRule("fixed", tokens_key="mm_tokens_per_image", note="fixed 256 tokens; encoder 4096 patches at 896 px"),
            image_features=_fixed_per_image(lambda c: c.mm_tokens_per_image),
            feature_cache=True,
            packing_note="packed examples score differently from the same examples alone (transformers 5.24; "
            "its image tokens attend bidirectionally, a mask the packed path does not reproduce exactly)",
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
            resolution_caps=(280, 140, 70),
            required_inputs=("pixel_values", "mm_token_type_ids"),
            sequence_inputs=(("mm_token_type_ids", 0),),
            fp32_norms=("Gemma4RMSNorm",),
            # Patch 16, pooling 3; pixels are padded to max_soft_tokens*9 patches, so the encoder always runs that
            # many positions. Default 280 soft tokens per image, 70 per video frame.
            image_rule=ImageRule("soft_tokens", soft_tokens=280, video_soft_tokens=70, note="max_soft_tokens, encoder 9x"),
            image_features=_gemma4_features,
            softcaps_logits=True,
            unused_towers=("model.audio_tower", "model.embed_audio"),
            host_tables=("model.language_model.embed_tokens_per_layer",),
            advice=(
                "Gemma 4 LoRA has shown exploding gradient norms (transformers#45676): clip at max_grad_norm 0.1 "
                "with lr ~5e-5.",
            ),
            train_limits=(("lr", 1e-4), ("max_grad_norm", 0.1)),
            train_limits_hint="gradient norms explode with LoRA here, use train.lr: 5.0e-5 and train.max_grad_norm: 0.1",
            packing_note="packed examples score differently from the same examples alone in transformers 5.24",
            ddp_unused_parameters=True,
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
            image_rule=ImageRule("fixed", cls_position=True, note="CLIP 336 px: 576 tokens (+CLS in the encoder)"),
            image_features=_fixed_per_image(_llava_per_image),
            packing="positions",
            feature_cache=True,
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
            sequence_inputs=(("token_type_ids", 0),),
            fp32_norms=("GemmaRMSNorm", "Gemma2RMSNorm"),  # PaliGemma on Gemma, PaliGemma 2 on Gemma 2
            prompt_style="prefix_suffix",
            label_method="suffix",
            image_rule=ImageRule("fixed", note="(image_size/patch)^2 tokens"),
            image_features=_fixed_per_image(lambda c: (c.vision_config.image_size // c.vision_config.patch_size) ** 2),
            advice=("PaliGemma is a single-turn prefix-LM: one question, one answer per example.",),
            packing="positions",
            feature_cache=True,
            softcaps_logits=True,
        ),
    ]
}

# Module-name keywords that place a module of an unknown family (checked in this order).
GENERIC_PARTS = (
    ("projector", ("multi_modal_projector", "connector", "merger", "mm_projector", "embed_vision")),
    ("vision", ("vision", "visual", "image_encoder")),
    ("language", ("language_model", "text_model", "model.layers", "model.embed_tokens")),
)


def video_frame_multiple() -> int:
    """The frame count every family's video tower takes without a repeated frame: what sampling uses where the model
    is not known yet (`vlmfit prepare` and the built-in sets write one dataset for every model)."""
    return math.lcm(*(f.temporal_patch for f in FAMILIES.values()))


def generic_family(model_type: str, processor=None) -> Family:
    """The one family for a model vlmfit has no table for: labels by prefix rendering (the processor's own chat
    template), parts by module-name keywords (GENERIC_PARTS), no image-token rule beyond one token per patch; the
    per-position inputs and fp32 norms of every known family (an unknown VLM may be built on any of their models)."""
    # probes by design: an unknown processor may lack any of these (a text-only tokenizer, no image token)
    tok = getattr(processor, "tokenizer", None)
    return Family(
        name=f"generic:{model_type}",
        model_types=(model_type,),
        processor_classes=(type(processor).__name__,) if processor is not None else (),
        assistant_start="",
        turn_end=(tok.eos_token or "") if tok is not None else "",
        image_token=getattr(processor, "image_token", None) or "<image>",
        video_token=getattr(processor, "video_token", None),
        label_method="prefix",
        sequence_inputs=tuple(dict.fromkeys(kv for f in FAMILIES.values() for kv in f.sequence_inputs)),
        fp32_norms=tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.fp32_norms)),
        softcaps_logits=True,  # a config's cap is applied by the forwards of the architectures that have the key
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
        near = nearest(name, FAMILIES)
        raise UserError(
            f"unknown model family '{name}'",
            hint=(f"did you mean '{near}'? " if near else "") + f"known families: {', '.join(FAMILIES)}",
        )
    return FAMILIES[name]
